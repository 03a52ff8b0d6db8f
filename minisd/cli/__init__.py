"""The command line, `python -m minisd COMMAND`: one module per command group.

    diffusion:    train, sample, evaluate, evaluate-text, compare-samplers
    autoencoder:  train-vae, evaluate-vae, latent-vs-pixel
    conditioning: compare-conditioning
    guidance:     generate, guidance-curve, compare-guidance, train-noisy-classifier
    sd:           sd (Stable Diffusion at full size), applications (lesson 06's measurements)
    grade:        grade (a class's submitted notebooks, re-executed and scored)

Shared options live in `options`; what a command records about itself in `minisd.provenance`.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from minisd.cli import autoencoder, conditioning, diffusion, grade, guidance, sd

    parser = argparse.ArgumentParser(
        prog="python -m minisd", description="minisd: Stable Diffusion built up from MNIST."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    diffusion.add_commands(sub)
    autoencoder.add_commands(sub)
    conditioning.add_commands(sub)
    guidance.add_commands(sub)
    sd.add_commands(sub)
    sd.add_application_commands(sub)
    grade.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    args.func(args)
