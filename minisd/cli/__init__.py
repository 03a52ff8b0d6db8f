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

__all__ = ["build_parser", "entry", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage error in one line (its subcommands' parsers too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help shows the usage)\n")


def build_parser() -> argparse.ArgumentParser:
    from minisd.cli import autoencoder, conditioning, diffusion, grade, guidance, sd

    parser = _Parser(
        prog="python -m minisd", description="minisd: Stable Diffusion built up from MNIST."
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
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


def entry(argv: list[str] | None = None, main=main, name: str | None = None) -> int:
    """`python -m minisd`: `main`, failing like a Unix tool. A bad argument, file or run (the
    library's ValueError, OSError, FloatingPointError; out of memory) is one line on stderr and
    exit status 1; an interrupted run, 130 (Ctrl-C) or 143 (SIGTERM). `--debug`, anywhere on the
    line, raises instead, with the traceback. Anything else is a bug and keeps its traceback.
    main and name: another module's command line (`python -m minisd.data`), run the same way."""
    import torch

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if name is None:
        name = f"minisd {argv[0]}" if argv and not argv[0].startswith("-") else "minisd"
    try:
        main(argv)
    except KeyboardInterrupt as err:  # fit's TrainingInterrupted says where it stopped
        if debug:
            raise
        print(f"{name}: {' '.join(str(err).split()) or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(err, "signum", 2)
    except (ValueError, OSError, FloatingPointError, torch.OutOfMemoryError) as err:
        if debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"{name}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0
