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
# By default the browser runs the cells the explorers need (nbval runs every cell); "all" runs
# every cell, as a reader's Run All does (about 15 minutes more on a 2-core CPU for 05 and 06).
ALL_CELLS = os.environ.get("MINISD_BROWSER_CELLS") == "all"
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
