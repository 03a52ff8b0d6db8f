"""Every lesson follows the course's shape: what it teaches and its run time first, exercises
last, each exercise checked, with a solution to reveal, and at least one that needs reasoning."""

import json
import re
from pathlib import Path

import pytest

from minisd import exercises

NOTEBOOKS = sorted(
    (Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb")
)


def cells(path):
    nb = json.loads(path.read_text())
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_a_lesson_opens_with_its_goals_and_ends_with_checked_exercises(path):
    lesson = path.name[:2]
    content = cells(path)
    kind, first = content[0]
    assert kind == "markdown" and first.startswith("# ") and "**Run time:**" in first
    text = "\n".join(src for _, src in content)
    assert "MINISD_PROFILE" in first  # the full profile is named where the run time is
    exercise_at = next(
        i for i, (k, s) in enumerate(content) if k == "markdown" and "## Exercises" in s
    )
    tail = "\n".join(src for _, src in content[exercise_at:])
    used = set(re.findall(r"\b(check_\w+)\(", tail))
    assert used, f"{path.name} has no checked exercise"
    own = {checker for key, (_, checker, _, _) in exercises.SOLUTIONS.items() if key[:2] == lesson}
    assert used == own  # every exercise of the lesson has a solution, and no other lesson's
    assert f'solution("{lesson}.1")' in tail  # and the student is told how to reveal it
    assert re.search(r"\*\*Exercise \d \((predict|reason)", tail), (
        "no exercise that needs reasoning"
    )
    assert "score:" in content[-1][1] or "score:" in tail
    assert "NotImplementedError" in text or "= None  # your" in text
