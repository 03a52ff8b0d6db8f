"""Every notebook with a widget, run in JupyterLab in headless Chromium as a reader would."""

import json
import os
import time

import nbformat
import pytest
from labdriver import (
    ARTIFACTS,
    REPO,
    WINDOWS,
    cells_explorers_need,
    copy_for_lab,
    explorer_count,
    explorers_in,
    layout,
    open_notebook,
    redraw_problem,
    run_all_cells,
    set_window,
    widget_problems,
)

NOTEBOOKS = [
    path for path in sorted((REPO / "notebooks").glob("[0-9]*.ipynb")) if explorers_in(path)
]
# The browser runs every cell, as a reader's Run All does (12 minutes for the three notebooks on
# 2 busy cores); MINISD_BROWSER_CELLS=needed runs only the cells the explorers need (2 minutes), for
# a quick check while working on a widget.
ALL_CELLS = os.environ.get("MINISD_BROWSER_CELLS", "all") != "needed"
RUN_TIMEOUT = 900 if ALL_CELLS else 300  # seconds for Run All Cells in one notebook


def check_explorers(page, name: str) -> tuple[list[str], list[dict]]:
    """Lay every explorer out in each window of WINDOWS, screenshot it, then drag a slider of each;
    return what went wrong and what was measured. The screenshots go to build/browser/."""
    problems, measured = [], []
    for width, height, sidebar in WINDOWS:
        set_window(page, width, height, sidebar)
        window = f"{width}px-sidebar-{'open' if sidebar else 'closed'}"
        for index in range(explorer_count(page)):
            found = layout(page, index)
            measured.append({"window": window, "explorer": index, **found})
            problems += [f"explorer {index}, {window}: {p}" for p in found["problems"]]
            page.screenshot(path=ARTIFACTS / f"{name}-explorer{index}-{window}.png")
    set_window(page, *WINDOWS[-2])
    redraws = [redraw_problem(page, index) for index in range(explorer_count(page))]
    return problems + [p for p in redraws if p], measured


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_the_widgets_render_redraw_and_show_their_values(lab, page, notebook):
    path = f"notebooks/{notebook.name}"
    cells = copy_for_lab(notebook, lab.root / path, ALL_CELLS)
    open_notebook(page, lab, path)
    started = time.monotonic()
    assert run_all_cells(page, RUN_TIMEOUT) == []
    run_seconds = round(time.monotonic() - started, 1)
    assert widget_problems(page) == []
    assert explorer_count(page) == explorers_in(notebook)  # each explorer was drawn
    problems, measured = check_explorers(page, notebook.stem)
    record = {"cells": cells, "run_seconds": run_seconds, "layouts": measured}
    (ARTIFACTS / f"{notebook.stem}-layout.json").write_text(json.dumps(record, indent=1))
    assert problems == []


# A widget whose front-end code does not exist; the schedule explorer in the plain HBox it had
# before issue 18 (the figure squeezed the controls); and one whose slider no longer redraws.
BROKEN_CELLS = [
    """import ipywidgets as w
import torch
from traitlets import Unicode

from minisd.widgets import ScheduleExplorer


class Missing(w.DOMWidget):
    _model_module = _view_module = Unicode("no-such-widgets").tag(sync=True)
    _model_name, _view_name = Unicode("NoModel").tag(sync=True), Unicode("NoView").tag(sync=True)


Missing()""",
    """squeezed = ScheduleExplorer(torch.zeros(1, 1, 28, 28))
squeezed.widget = w.HBox([w.VBox(squeezed.widget.children[0].children), squeezed.image])
squeezed""",
    """frozen = ScheduleExplorer(torch.zeros(1, 1, 28, 28))
frozen.num_timesteps.unobserve_all()
frozen""",
]


def test_the_checks_catch_broken_widgets(lab, page):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in BROKEN_CELLS])
    notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(notebook, lab.root / "broken_widgets.ipynb")
    open_notebook(page, lab, "broken_widgets.ipynb")
    assert run_all_cells(page, 120) == []  # Python is happy; only the browser sees what is wrong
    problems = widget_problems(page)
    assert len(problems) == 1 and "no-such-widgets" in problems[0], problems
    assert explorer_count(page) == 2
    set_window(page, 1000, 800, True)
    squeezed = layout(page, 0)
    page.screenshot(path=ARTIFACTS / "broken_widgets-squeezed-1000px-sidebar-open.png")
    assert squeezed["controls_width"] < 50 and any("covered" in p for p in squeezed["problems"])
    assert layout(page, 1)["problems"] == []
    set_window(page, 1400, 900, True)
    assert redraw_problem(page, 1, timeout=5) is not None


def test_the_browser_runs_the_cells_the_explorers_need(tmp_path):
    sources = [
        "%matplotlib inline\nimport torch\nfrom minisd.widgets import ScheduleExplorer",  # 0
        "digits = torch.rand(9, 1, 28, 28)",  # 1
        "slow = [d.sum() for d in digits]  # minutes of sampling no explorer reads",  # 2
        "x0 = digits[:1]",  # 3
        "x0 = x0 * 2 - 1\nscale = 1\nscale += x0.std()",  # 4: reads the x0 of cell 3
        "# a note",  # 5 (markdown)
        "for d in digits[:2]:\n    x0 = d[None] * scale",  # 6: its own d; x0 bound, not read
        "grid = [scale * d for d in slow]",  # 7: its own d; reads slow, but nothing needs it
        "explorer = ScheduleExplorer(x0)",  # 8
        "x0 = None  # after the explorer: not needed",  # 9
    ]
    cells = [nbformat.v4.new_code_cell(source) for source in sources]
    cells[5] = nbformat.v4.new_markdown_cell(sources[5])
    cells[3].outputs = [nbformat.v4.new_output("stream", text="saved\n")]
    assert cells_explorers_need(cells) == [0, 1, 3, 4, 6, 8]
    notebook = nbformat.v4.new_notebook(cells=cells, metadata={"widgets": {"saved": "state"}})
    nbformat.write(notebook, tmp_path / "in.ipynb")
    assert copy_for_lab(tmp_path / "in.ipynb", tmp_path / "out" / "out.ipynb", False) == 6
    copied = nbformat.read(tmp_path / "out" / "out.ipynb", as_version=4)
    assert [c.source for c in copied.cells] == [sources[i] for i in (0, 1, 3, 4, 6, 8)]
    assert copied.cells[2].outputs == [] and "widgets" not in copied.metadata
    assert copy_for_lab(tmp_path / "in.ipynb", tmp_path / "all.ipynb", True) == len(sources)
