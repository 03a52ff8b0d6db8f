"""Grade a class's submitted notebooks: re-execute each one and read the checkers' records.

Each submission is copied to a fresh temporary folder and run there top to bottom in a new kernel
(nbclient; CPU only, the quick profile, a time limit per cell and per notebook). Its verdicts
are the records the exercise checkers display (`exercises.VERDICT_MIME`), never printed text.
Grading runs the students' code with the grader's rights: see the README before grading a class
you do not trust.
"""

from __future__ import annotations

import asyncio
import csv
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from minisd import exercises

if TYPE_CHECKING:  # Jupyter's packages are imported when grading starts: the CLI works without
    import nbformat

# What a grade table cell can say; the first three are the checkers' own verdicts.
# forged: the submitted notebook's saved record says correct, its re-execution does not.
GRADES = ("correct", "wrong", "not yet", "forged", "error", "timeout")
CELL_TIMEOUT = 600  # seconds, what `make test` gives nbval for one cell
NOTEBOOK_TIMEOUT = 1800  # the longest lesson takes ~5 minutes on a 2-core laptop CPU
_CHECKER_CALL = re.compile(r"\b(check_\w+)\s*\(")


def _jupyter():
    """nbformat, after checking that what grading runs on is installed (minisd's dev extras)."""
    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
        import nbformat
    except ImportError as err:
        raise ImportError(
            f"grading needs Jupyter's {err.name}: install minisd with its dev extras "
            "(pip install -e '.[dev]', what make test does) or its grade extras "
            "(pip install -e '.[grade]')"
        ) from err
    return nbformat


def lesson_exercises() -> dict[str, list[str]]:
    """Each lesson ("01") -> its exercise ids in order ("01.1", "01.2", ...), from the solutions."""
    lessons: dict[str, list[str]] = {}
    for exercise_id in sorted(exercises.SOLUTIONS):
        lessons.setdefault(exercise_id.split(".")[0], []).append(exercise_id)
    return lessons


def _exercise_of_checker() -> dict[str, str]:
    return {checker: key for key, (_, checker, _, _) in exercises.SOLUTIONS.items()}


@dataclass
class Grade:
    """One submission's row: its lesson, a grade per exercise, and why anything is missing."""

    submission: str
    lesson: str | None = None  # None: could not be graded at all (see `note`)
    grades: dict[str, str] = field(default_factory=dict)  # exercise id -> one of GRADES
    note: str = ""  # the first line of an error, a time limit, or why it was not graded
    seconds: float = 0.0

    @property
    def graded(self) -> bool:
        return self.lesson is not None

    @property
    def score(self) -> int:
        return sum(g == "correct" for g in self.grades.values())


class NotGradable(ValueError):
    """A submission that is no notebook of the course: unreadable, not a notebook, another one."""


def read_submission(path: Path) -> nbformat.NotebookNode:
    """The submission as a notebook, or NotGradable saying what was expected and what to do."""
    nbformat = _jupyter()
    ask = "ask the student for the .ipynb file Jupyter saved (File > Save, then upload it)"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotGradable(f"no such file; check the path ({path})") from None
    except (OSError, UnicodeDecodeError) as err:
        why = f"{type(err).__name__}: {err}"
        raise NotGradable(f"cannot be read as a notebook ({why}); {ask}") from None
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as err:  # nbformat raises several kinds for non-notebook JSON or text
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NotGradable(f"not a Jupyter notebook ({first[:120]}); {ask}") from None
    if not isinstance(nb.get("cells"), list):
        raise NotGradable(f"not a Jupyter notebook (it has no cells); {ask}")
    return nb


def identify_lesson(nb: nbformat.NotebookNode) -> str:
    """Which of the course's notebooks this is, from the exercise checkers its code calls."""
    checkers = _exercise_of_checker()
    found = {  # the exercises whose checkers the code calls, each once
        checkers[name]
        for cell in nb.cells
        if cell.get("cell_type") == "code"
        for name in _CHECKER_CALL.findall(str(cell.get("source", "")))
        if name in checkers
    }
    called = Counter(exercise_id.split(".")[0] for exercise_id in found)
    if not called:
        first, *_, last = lesson_exercises()
        raise NotGradable(
            "not one of the course's notebooks: its code calls none of the exercise checkers "
            f"(check_...); expected a student's copy of lesson {first} to {last} with its "
            "exercise cells"
        )
    ranked = called.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        tied = " and ".join(sorted(k for k, n in ranked if n == ranked[0][1]))
        raise NotGradable(
            f"it calls as many checkers of lesson {tied}, so which notebook it is is unclear; "
            "expected one lesson's notebook per file"
        )
    return ranked[0][0]


def recorded_verdicts(nb: nbformat.NotebookNode, lesson: str) -> dict[str, str]:
    """Exercise id -> verdict, from the checkers' records in the notebook's outputs.

    A record counts only in a cell whose code calls that exercise's checker, and the last one
    of an exercise wins, as the notebook shows it.
    """
    checker_of = {key: checker for key, (_, checker, _, _) in exercises.SOLUTIONS.items()}
    verdicts: dict[str, str] = {}
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        called = set(_CHECKER_CALL.findall(str(cell.get("source", ""))))
        for output in cell.get("outputs", []):
            record = output.get("data", {}).get(exercises.VERDICT_MIME)
            if not isinstance(record, dict):
                continue
            exercise_id, verdict = record.get("exercise"), record.get("verdict")
            if (
                isinstance(exercise_id, str)
                and exercise_id.split(".")[0] == lesson
                and checker_of.get(exercise_id) in called
                and verdict in exercises.VERDICTS
            ):
                verdicts[exercise_id] = verdict
    return verdicts


def kernel_environment(jobs: int = 1) -> dict[str, str]:
    """The kernel's environment: CPU only, the quick profile, this minisd first on the path."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only: a class's notebooks must not queue on a GPU
    env["MINISD_PROFILE"] = "quick"
    here = str(Path(exercises.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # share the cores between the kernels
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def _kernel_manager_class():
    """A kernel manager that starts this Python's ipykernel (as nbval's --nbval-current-env)."""
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            spec = ipykernel.kernelspec.get_kernel_dict()
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES, **spec)

    class ThisPythonKernel(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _default_kernel_spec_manager(self):
            return ThisPython(data_dir=self.data_dir)

    return ThisPythonKernel


async def _execute(
    nb: nbformat.NotebookNode, folder: Path, cell_timeout: float, notebook_timeout: float, env
) -> tuple[nbformat.NotebookNode, str, str]:
    """Run nb in folder; (executed nb, "" / "error" / "timeout", the note saying where and why)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    deadline = time.monotonic() + notebook_timeout
    at = {"cell": None}

    def timeout_for(cell) -> int:  # a cell gets what is left of the notebook's time, at most
        return max(1, int(min(cell_timeout, deadline - time.monotonic())))

    def started(cell, cell_index):
        at["cell"] = client.code_cells_executed + 1

    client = NotebookClient(
        nb,
        timeout_func=timeout_for,
        kernel_manager_class=_kernel_manager_class(),
        resources={"metadata": {"path": str(folder)}},
        on_cell_execute=started,
        shutdown_kernel="immediate",
    )
    where = lambda: f"In [{at['cell']}]"  # noqa: E731 - the cell as Jupyter numbers it
    try:
        await client.async_execute(env=env, stderr=subprocess.DEVNULL)
    except CellTimeoutError:
        if time.monotonic() >= deadline - 1:
            return client.nb, "timeout", f"{where()}: the notebook ran past {notebook_timeout:g} s"
        return client.nb, "timeout", f"{where()}: the cell ran past {cell_timeout:g} s"
    except CellExecutionError as err:
        first = f"{err.ename}: {err.evalue}".strip().splitlines()[0]
        return client.nb, "error", f"{where()}: {first[:200]}"
    except DeadKernelError:
        return client.nb, "error", f"{where()}: the kernel died (out of memory, or it exited)"
    except Exception as err:  # the kernel never ran it: the grader's side, not the student's
        raise NotGradable(f"could not run it: {type(err).__name__}: {err}") from err
    return client.nb, "", ""


async def grade_submission(
    path: Path,
    label: str | None = None,
    *,
    cell_timeout: float = CELL_TIMEOUT,
    notebook_timeout: float = NOTEBOOK_TIMEOUT,
    jobs: int = 1,
) -> Grade:
    """Re-execute one submission in a temporary copy and grade each exercise of its lesson."""
    grade = Grade(label or str(path))
    start = time.monotonic()
    try:
        submitted = read_submission(path)
        lesson = identify_lesson(submitted)
    except NotGradable as err:
        grade.note = str(err)
        return grade
    saved = recorded_verdicts(submitted, lesson)
    folder = Path(tempfile.mkdtemp(prefix="minisd-grade-"))
    try:  # the student's code runs here, never in the submission's own folder
        copy = folder / "submission.ipynb"
        shutil.copyfile(path, copy)
        nb = _jupyter().read(copy, as_version=4)
        for cell in nb.cells:  # a cell never reached must not keep its saved verdict
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        env = kernel_environment(jobs)
        executed, failure, grade.note = await _execute(
            nb, folder, cell_timeout, notebook_timeout, env
        )
    except NotGradable as err:
        grade.note = str(err)
        return grade
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    fresh = recorded_verdicts(executed, lesson)
    grade.lesson = lesson
    for exercise_id in lesson_exercises()[lesson]:
        verdict = fresh.get(exercise_id) or failure or "not yet"
        if saved.get(exercise_id) == "correct" and verdict in ("wrong", "not yet"):
            verdict = "forged"
        grade.grades[exercise_id] = verdict
    grade.seconds = time.monotonic() - start
    return grade


def collect(paths: list[Path]) -> list[tuple[Path, str]]:
    """Files as given, and every .ipynb under a folder (Jupyter's checkpoints left out)."""
    found = []
    for path in paths:
        if path.is_dir():
            notebooks = sorted(
                p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
            )
            found += [(p, str(p)) for p in notebooks]
        else:
            found.append((path, str(path)))
    return found


def grade_all(
    submissions: list[tuple[Path, str]],
    *,
    cell_timeout: float = CELL_TIMEOUT,
    notebook_timeout: float = NOTEBOOK_TIMEOUT,
    jobs: int = 1,
    on_graded=None,
) -> list[Grade]:
    """Grade every (path, label), `jobs` kernels at a time; the grades in the input's order."""

    async def run() -> list[Grade]:
        slots = asyncio.Semaphore(max(1, jobs))

        async def one(path: Path, label: str) -> Grade:
            async with slots:
                grade = await grade_submission(
                    path,
                    label,
                    cell_timeout=cell_timeout,
                    notebook_timeout=notebook_timeout,
                    jobs=jobs,
                )
            if on_graded is not None:
                on_graded(grade)
            return grade

        return list(await asyncio.gather(*(one(p, label) for p, label in submissions)))

    return asyncio.run(run())


def _columns(grades: list[Grade]) -> list[str]:
    lessons = lesson_exercises()
    return [e for lesson in sorted({g.lesson for g in grades if g.graded}) for e in lessons[lesson]]


def table_rows(grades: list[Grade]) -> tuple[list[str], list[list[str]]]:
    """The grade table: a header and one row per submission (one column per exercise, a total)."""
    columns = _columns(grades)
    header = ["submission", "notebook", *columns, "total", "note"]
    rows = []
    for g in grades:
        cells = [g.grades.get(e, "") for e in columns]
        total = f"{g.score} / {len(g.grades)}" if g.graded else "not graded"
        rows.append([g.submission, g.lesson or "", *cells, total, g.note])
    return header, rows


def write_csv(grades: list[Grade], path: Path) -> None:
    header, rows = table_rows(grades)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def markdown_table(grades: list[Grade]) -> str:
    header, rows = table_rows(grades)

    def line(cells: list[str]) -> str:
        cells = [" ".join(c.split()).replace("|", "\\|") for c in cells]
        return "| " + " | ".join(cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)]) + "\n"


def summary(grades: list[Grade], seconds: float) -> str:
    """A few lines: how many were graded, the grades counted, and what could not be graded."""
    graded = [g for g in grades if g.graded]
    counts = Counter(v for g in graded for v in g.grades.values())
    minutes, secs = divmod(round(seconds), 60)
    lines = [
        f"graded {len(graded)} of {len(grades)} submissions in {minutes} min {secs} s; "
        + ", ".join(f"{k} {counts[k]}" for k in GRADES if counts[k])
    ]
    full = [g.submission for g in graded if g.score == len(g.grades)]
    if full:
        lines.append(f"every exercise correct: {', '.join(full)}")
    forged = [g.submission for g in graded if "forged" in g.grades.values()]
    if forged:
        lines.append(f"saved verdicts that re-execution does not reproduce: {', '.join(forged)}")
    lines += [f"NOT GRADED {g.submission}: {g.note}" for g in grades if not g.graded]
    return "\n".join(lines)
