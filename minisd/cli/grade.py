"""Grading command (for instructors): a class's submitted notebooks, re-executed and scored.

    python -m minisd grade submissions/ --out grades.csv   # and grades.md beside it

It runs the students' code: for a class you do not trust, grade in a container or a throw-away
account (see the README's "For instructors").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from minisd import grading
from minisd.cli.options import check_output


def cmd_grade(args: argparse.Namespace) -> None:
    """Grade every submission; exit 1 when one could not be graded at all."""
    out = check_output(args.out, "--out", ("csv",))
    for flag, value in (("--cell-timeout", args.cell_timeout), ("--jobs", args.jobs)):
        if value <= 0:
            raise ValueError(f"{flag} must be positive, got {value:g}")
    if args.notebook_timeout <= 0:
        raise ValueError(f"--notebook-timeout must be positive, got {args.notebook_timeout:g}")
    markdown = out.with_suffix(".md")
    submissions = grading.collect([Path(p) for p in args.submissions])
    if not submissions:
        raise SystemExit(
            f"no .ipynb files in {', '.join(args.submissions)}; give notebooks or folders of them"
        )
    print(
        f"grading {len(submissions)} submission(s), each in a fresh kernel in a temporary folder "
        f"(CPU, quick profile; at most {args.cell_timeout:g} s a cell, "
        f"{args.notebook_timeout:g} s a notebook)",
        flush=True,
    )

    def progress(grade: grading.Grade) -> None:
        done = f"{grade.score} / {len(grade.grades)}" if grade.graded else "not graded"
        print(f"  {grade.submission}: {done} ({grade.seconds:.0f} s)", flush=True)

    start = time.monotonic()
    grades = grading.grade_all(
        submissions,
        cell_timeout=args.cell_timeout,
        notebook_timeout=args.notebook_timeout,
        jobs=args.jobs,
        on_graded=progress,
    )
    table = grading.markdown_table(grades)
    grading.write_csv(grades, out)
    markdown.write_text(table, encoding="utf-8")
    print()
    print(table)
    print(grading.summary(grades, time.monotonic() - start))
    print(f"wrote {out} and {markdown}")
    if not all(g.graded for g in grades):
        sys.exit(1)


def add_commands(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "grade",
        help="re-execute submitted notebooks and tabulate each student's exercise verdicts",
        description="Re-execute each submitted notebook in a fresh kernel in a temporary folder "
        "and read the exercise checkers' records. This RUNS THE STUDENTS' CODE: grade an "
        "untrusted class in a container or a throw-away account.",
    )
    g.add_argument("submissions", nargs="+", help=".ipynb files, or folders searched for them")
    g.add_argument("--out", default="grades.csv", help="the CSV to write; the Markdown goes beside")
    g.add_argument(
        "--cell-timeout",
        type=float,
        default=grading.CELL_TIMEOUT,
        help="seconds one cell may run (default: %(default)s)",
    )
    g.add_argument(
        "--notebook-timeout",
        type=float,
        default=grading.NOTEBOOK_TIMEOUT,
        help="seconds one notebook may run, kernel start included (default: %(default)s)",
    )
    g.add_argument("--jobs", type=int, default=1, help="notebooks graded at once (default: 1)")
    g.set_defaults(func=cmd_grade)
