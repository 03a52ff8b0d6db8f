"""`python -m minisd grade` on submissions made from the course's own notebook 01: untouched,
solved, wrong, forged, raising, looping, not a notebook, another notebook, and a folder of them."""

import csv
import os
import re
from pathlib import Path

import nbformat
import pytest

from minisd import exercises, grading
from minisd.cli import main

LESSON = Path(__file__).resolve().parent.parent / "notebooks" / "01_forward_noising.ipynb"
WRONG = {  # a wrong answer per exercise, each of the kind a student writes
    "01.1": "def alphas_cumprod(betas):\n    return 1 - betas\n",
    "01.2": "def q_sample(x0, noise, t, alphas_cumprod):\n    return x0 + noise\n",
    "01.3": "snr_crossing = 100\n",
}


def lesson():
    return nbformat.read(LESSON, as_version=4)


def exercise_cell(nb, exercise_id):
    checker = exercises.SOLUTIONS[exercise_id][1]
    return next(c for c in nb.cells if c.cell_type == "code" and f"{checker}(" in c.source)


def answer(nb, exercise_id, code):
    """Replace the student's part of an exercise cell (all above `ok_N = check_...`) by code."""
    cell = exercise_cell(nb, exercise_id)
    check_at = re.search(r"^ok_\d = check_", cell.source, flags=re.M).start()
    cell.source = code + "\n\n" + cell.source[check_at:]
    return nb


def solve(nb, exercise_id):
    return answer(nb, exercise_id, exercises.SOLUTIONS[exercise_id][2])


def save_verdict(nb, exercise_id, verdict):
    """Edit the saved record (and its line) as a student who hand-edits the .ipynb would."""
    for output in exercise_cell(nb, exercise_id).outputs:
        record = output.get("data", {}).get(exercises.VERDICT_MIME)
        if record:
            record["verdict"] = verdict
            output["data"]["text/plain"] = output["data"]["text/plain"].split(":")[0] + ": correct"
    return nb


def make_class(folder: Path) -> dict[str, str]:
    """A class's submissions in folder: file name -> what it is."""
    folder.mkdir(parents=True, exist_ok=True)
    solved = lesson()
    for e in ("01.1", "01.2", "01.3"):
        save_verdict(solve(solved, e), e, "correct")
    wrong = answer(solve(lesson(), "01.2"), "01.1", WRONG["01.1"])
    answer(wrong, "01.3", WRONG["01.3"])
    forged = save_verdict(answer(lesson(), "01.1", WRONG["01.1"]), "01.1", "correct")
    raises = solve(lesson(), "01.1")
    answer(raises, "01.2", "import a_module_no_one_has\n" + exercises.SOLUTIONS["01.2"][2])
    loops = lesson()
    loops.cells.insert(1, nbformat.v4.new_code_cell("while True:\n    pass"))
    other = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('hello')")])
    cases = {
        "ada.ipynb": lesson(),  # untouched
        "ben.ipynb": solved,
        "cy.ipynb": wrong,
        "dee.ipynb": forged,
        "eve.ipynb": raises,
        "fay.ipynb": loops,
        "gus.ipynb": other,
    }
    for name, nb in cases.items():
        nbformat.write(nb, folder / name)
    (folder / "hal.ipynb").write_text("my answers are in the PDF\n")
    return {n: n.split(".")[0] for n in [*cases, "hal.ipynb"]}


def test_a_submission_is_recognised_by_the_checkers_it_calls_not_its_name(tmp_path):
    nb = lesson()
    assert grading.identify_lesson(nb) == "01"
    renamed = tmp_path / "06_stable_diffusion.ipynb"
    nbformat.write(nb, renamed)
    assert grading.identify_lesson(grading.read_submission(renamed)) == "01"
    with pytest.raises(grading.NotGradable, match="calls none of the exercise checkers"):
        grading.identify_lesson(nbformat.v4.new_notebook())
    nb.cells.append(nbformat.v4.new_code_cell("check_guidance(my_guidance)"))
    assert grading.identify_lesson(nb) == "01"  # a call to another lesson's checker: still 01
    mixed = nbformat.v4.new_notebook()
    mixed.cells = [
        nbformat.v4.new_code_cell(f"{c}(f)") for c in ("check_q_sample", "check_guidance")
    ]
    with pytest.raises(grading.NotGradable, match="lesson 01 and 05.*unclear"):
        grading.identify_lesson(mixed)


def test_unreadable_and_foreign_files_are_refused_with_what_to_do(tmp_path):
    text = tmp_path / "answers.ipynb"
    text.write_text("my answers are in the PDF\n")
    with pytest.raises(grading.NotGradable, match="not a Jupyter notebook.*ask the student"):
        grading.read_submission(text)
    (tmp_path / "list.ipynb").write_text("[1, 2]")
    with pytest.raises(grading.NotGradable, match="not a Jupyter notebook"):
        grading.read_submission(tmp_path / "list.ipynb")
    with pytest.raises(grading.NotGradable, match="no such file"):
        grading.read_submission(tmp_path / "missing.ipynb")


def test_only_a_checker_s_own_cell_can_record_its_verdict():
    nb = lesson()
    assert grading.recorded_verdicts(nb, "01") == dict.fromkeys(["01.1", "01.2", "01.3"], "not yet")
    fake = nbformat.v4.new_output(
        "display_data",
        data={exercises.VERDICT_MIME: {"exercise": "01.2", "notebook": "01", "verdict": "correct"}},
    )
    nb.cells[1].outputs.append(fake)  # printed by some other cell: ignored
    assert grading.recorded_verdicts(nb, "01")["01.2"] == "not yet"
    save_verdict(nb, "01.2", "correct")  # in the checker's cell: that is the saved verdict
    assert grading.recorded_verdicts(nb, "01")["01.2"] == "correct"
    save_verdict(nb, "01.3", "top marks")  # not a verdict at all
    assert "01.3" not in grading.recorded_verdicts(nb, "01")


def grade_one(path, **limits):
    return grading.grade_all([(path, path.name)], **limits)[0]


@pytest.mark.parametrize("limit", ["cell_timeout", "notebook_timeout"])
def test_a_notebook_that_loops_forever_is_stopped_at_its_time_limit(tmp_path, limit):
    nb = lesson()
    nb.cells.insert(1, nbformat.v4.new_code_cell("while True:\n    pass"))
    nbformat.write(nb, tmp_path / "loops.ipynb")
    grade = grade_one(tmp_path / "loops.ipynb", **{"cell_timeout": 600, limit: 8})
    assert grade.grades == dict.fromkeys(["01.1", "01.2", "01.3"], "timeout")
    what = "cell" if limit == "cell_timeout" else "notebook"
    assert grade.note == f"In [1]: the {what} ran past 8 s"
    assert grade.seconds < 60
    assert list(tmp_path.iterdir()) == [tmp_path / "loops.ipynb"]  # nothing written beside it


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    """`python -m minisd grade` once over a folder holding every kind of submission."""
    root = tmp_path_factory.mktemp("class")
    cases = make_class(root / "submissions")
    before = {p: p.read_bytes() for p in (root / "submissions").iterdir()}
    out = root / "grades.csv"
    with pytest.raises(SystemExit) as exit_:
        main(["grade", str(root / "submissions"), "--out", str(out)]
             + ["--cell-timeout", "60", "--jobs", "2"])  # fmt: skip
    after = {p: p.read_bytes() for p in (root / "submissions").iterdir()}
    with open(out, newline="") as f:
        rows = {Path(r["submission"]).name: r for r in csv.DictReader(f)}
    return cases, rows, exit_.value.code, out, before == after


@pytest.mark.slow
def test_grading_a_class_marks_each_kind_of_submission(graded_class, capsys):
    cases, rows, code, out, untouched = graded_class
    assert set(rows) == set(cases)
    grades = {name: [r["01.1"], r["01.2"], r["01.3"], r["total"]] for name, r in rows.items()}
    assert grades["ada.ipynb"] == ["not yet", "not yet", "not yet", "0 / 3"]
    assert grades["ben.ipynb"] == ["correct", "correct", "correct", "3 / 3"]
    assert grades["cy.ipynb"] == ["wrong", "correct", "wrong", "1 / 3"]
    assert grades["dee.ipynb"] == ["forged", "not yet", "not yet", "0 / 3"]
    assert grades["eve.ipynb"] == ["correct", "error", "error", "1 / 3"]
    assert re.fullmatch(
        r"In \[\d+\]: ModuleNotFoundError: No module named 'a_module_no_one_has'",
        rows["eve.ipynb"]["note"],
    )
    assert grades["fay.ipynb"] == ["timeout", "timeout", "timeout", "0 / 3"]
    assert rows["fay.ipynb"]["note"] == "In [1]: the cell ran past 60 s"
    for name, why in (("gus.ipynb", "calls none of"), ("hal.ipynb", "not a Jupyter notebook")):
        assert rows[name]["total"] == "not graded" and why in rows[name]["note"]
    assert code == 1  # two submissions could not be graded at all
    assert untouched  # the submissions' files are as they were


@pytest.mark.slow
def test_the_markdown_table_has_a_row_per_submission_and_a_column_per_exercise(graded_class):
    cases, rows, code, out, _ = graded_class
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0] == "| submission | notebook | 01.1 | 01.2 | 01.3 | total | note |"
    assert len(table) == 2 + len(cases)
    ben = next(line for line in table if "ben.ipynb" in line)
    assert "| 01 | correct | correct | correct | 3 / 3 |  |" in ben


def test_a_class_whose_files_are_all_unreadable_exits_non_zero_without_running(tmp_path, capsys):
    (tmp_path / "a.ipynb").write_text("{}")
    json_nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# notes")])
    nbformat.write(json_nb, tmp_path / "b.ipynb")
    out = tmp_path / "grades.csv"
    with pytest.raises(SystemExit) as exit_:
        main(["grade", str(tmp_path / "a.ipynb"), str(tmp_path / "b.ipynb"), "--out", str(out)])
    assert exit_.value.code == 1
    printed = capsys.readouterr().out
    assert "graded 0 of 2 submissions" in printed and printed.count("NOT GRADED") == 2
    assert out.read_text().splitlines()[0] == "submission,notebook,total,note"


def test_an_empty_folder_is_an_error_that_says_what_to_give(tmp_path):
    with pytest.raises(SystemExit, match="no .ipynb files in"):
        main(["grade", str(tmp_path), "--out", str(tmp_path / "grades.csv")])
    with pytest.raises(ValueError, match="--jobs must be positive, got 0"):
        main(["grade", str(tmp_path), "--jobs", "0", "--out", str(tmp_path / "grades.csv")])
    with pytest.raises(ValueError, match="expected a file ending in one of .csv"):
        main(["grade", str(tmp_path), "--out", str(tmp_path / "grades.xlsx")])


def test_every_lesson_has_exercises_the_grader_can_tell_apart():
    lessons = grading.lesson_exercises()
    assert list(lessons) == ["01", "02", "03", "04", "05", "06"]
    for path in sorted(LESSON.parent.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        assert grading.identify_lesson(nb) == path.name[:2]
        # each shipped notebook saves a record per exercise, all "not yet" (nothing solved)
        assert grading.recorded_verdicts(nb, path.name[:2]) == dict.fromkeys(
            lessons[path.name[:2]], "not yet"
        )


def test_the_kernel_runs_on_the_cpu_in_the_quick_profile(monkeypatch):
    monkeypatch.setenv("MINISD_PROFILE", "full")
    env = grading.kernel_environment()
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["MINISD_PROFILE"] == "quick"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(grading.__file__).parent.parent)


def test_a_kernel_that_cannot_start_leaves_the_submission_not_graded(tmp_path, monkeypatch):
    from jupyter_client.manager import AsyncKernelManager

    class Broken(AsyncKernelManager):
        async def start_kernel(self, **kwargs):
            raise RuntimeError("no ipykernel here")

    monkeypatch.setattr(grading, "_kernel_manager_class", lambda: Broken)
    nbformat.write(lesson(), tmp_path / "ada.ipynb")
    grade = grade_one(tmp_path / "ada.ipynb")
    assert not grade.graded and grade.grades == {}
    assert grade.note == "could not run it: RuntimeError: no ipykernel here"


def test_without_jupyter_grading_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nbclient", None)  # as if it were not installed
    nbformat.write(lesson(), tmp_path / "ada.ipynb")
    with pytest.raises(ImportError, match="grading needs Jupyter's nbclient.*dev extras"):
        grade_one(tmp_path / "ada.ipynb")
