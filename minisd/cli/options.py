"""Options the commands share, declared once."""

from __future__ import annotations

import argparse


def add_device_and_seed(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    """The options every command that runs a model shares: --device and (if it draws) --seed."""
    parser.add_argument(
        "--device", default=None, help="cuda, mps or cpu (default: the best one available)"
    )
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")


def check_unique(flag: str, values: list[str]) -> None:
    """A list option (--spaces, --mechanisms) names each choice at most once."""
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} lists a choice twice: {values}")
