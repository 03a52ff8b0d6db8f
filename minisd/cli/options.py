"""Options the commands share, declared once."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

IMAGE_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg")  # what matplotlib writes


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


def check_output(path: str | None, flag: str, suffixes: tuple[str, ...]) -> Path | None:
    """An output path that can be written, checked before any sampling starts."""
    if not path:
        return None
    out = Path(path)
    if not out.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {out.parent} does not exist; create it first")
    if out.suffix.lower().lstrip(".") not in suffixes:
        raise ValueError(f"{flag} {path}: expected a file ending in one of .{', .'.join(suffixes)}")
    if out.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    try:  # the only honest test of "can I write here" (permissions, read-only disks, root)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as err:
        raise ValueError(
            f"{flag} {path}: cannot write in the folder {out.parent} ({err.strerror}); "
            "choose a folder you can write to"
        ) from err
    return out
