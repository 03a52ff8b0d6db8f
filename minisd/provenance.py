"""Provenance: what every command line records, the command itself and every command of a
resumed run, and how a recorded command is shown without machine-specific paths."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

from minisd.checkpoint import atomic_write


def command_line(args: argparse.Namespace) -> str:
    """The command as typed, for sidecars and results files: `python -m minisd ...`."""
    return "python -m minisd " + " ".join(shlex.quote(a) for a in args.argv)


def run_commands(args: argparse.Namespace) -> list[str]:
    """All commands that made the run in args.run_dir, this one last (kept in commands.txt).

    A resumed run is made by several invocations; a sidecar lists them all.
    """
    command = command_line(args)
    if not getattr(args, "run_dir", None):
        return [command]
    log = Path(args.run_dir) / "commands.txt"
    earlier = log.read_text().splitlines() if args.resume and log.is_file() else []
    text = "\n".join([*earlier, command]) + "\n"
    atomic_write(log, lambda tmp: Path(tmp).write_text(text))  # a resumed run's list stays whole
    return [*earlier, command]


def portable_command(command: str) -> str:
    """A recorded command without machine paths: the run folder shown as RUN_DIR, any other
    absolute path relative to the repository, or by its file name when outside it.

    >>> portable_command("python -m minisd train --steps 9 --run-dir /home/me/runs/a --resume")
    'python -m minisd train --steps 9 --run-dir RUN_DIR --resume'
    >>> portable_command("python -m minisd train --export /home/me/runs/m.safetensors")
    'python -m minisd train --export m.safetensors'
    """
    command = re.sub(r"--run-dir(=|\s+)\S+", "--run-dir RUN_DIR", command)
    return re.sub(r"(?<=[\s=])/\S+", lambda m: _shown_path(m.group(0)), command)


def _shown_path(path: str) -> str:
    inside = repo_path(path)
    return inside if inside != path else Path(path).name


REPO = Path(__file__).resolve().parent.parent  # paths in sidecars and results are relative to it


def repo_path(path: str | Path) -> str:
    """A path as results files record it: relative to the repository when inside it (so the
    record holds on another clone), otherwise as given.

    >>> repo_path(REPO / "data" / "checkpoints" / "m.safetensors")
    'data/checkpoints/m.safetensors'
    """
    resolved = Path(path).resolve()
    if resolved.is_relative_to(REPO):
        return resolved.relative_to(REPO).as_posix()
    return str(path)
