"""The course site's generator (tools/course_site.py): lessons, widgets, navigation, pages."""

import base64
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tools/ sits beside minisd/

from tools.course_site import (  # noqa: E402
    EXPLORER_NOTE,
    WIDGET_STATE,
    WIDGET_VIEW,
    build,
    nav,
    read_lesson,
    static_notebook,
)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n not a real picture").decode()


def lesson_notebook(path: Path, title: str, outputs=(), widgets=None) -> Path:
    cells = [
        nbformat.v4.new_markdown_cell(f"# {title}\n\nYou will:\n\n1. learn *{title.lower()}*"),
        nbformat.v4.new_code_cell("x = 1", outputs=list(outputs)),
    ]
    notebook = nbformat.v4.new_notebook(cells=cells)
    if widgets:
        notebook.metadata["widgets"] = {WIDGET_STATE: {"state": widgets}}
    nbformat.write(notebook, path)
    return path


def widget_output(model_id: str):
    return nbformat.v4.new_output("display_data", {WIDGET_VIEW: {"model_id": model_id}})


def model(name: str, children=(), buffers=None) -> dict:
    found = {"model_name": name, "state": {"_model_name": name, "children": list(children)}}
    return found | ({"buffers": buffers} if buffers else {})


def test_a_lesson_is_its_first_markdown_cells_title_and_summary(tmp_path):
    lesson = read_lesson(lesson_notebook(tmp_path / "07_more.ipynb", "07 · More"))
    assert (lesson.title, lesson.page) == ("07 · More", "07_more.html")
    assert "<em>07 · more</em>" in lesson.summary and "<ol>" in lesson.summary
    untitled = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("No heading")])
    nbformat.write(untitled, tmp_path / "untitled.ipynb")
    with pytest.raises(ValueError, match="'# title' line, got 'No heading'"):
        read_lesson(tmp_path / "untitled.ipynb")


def test_widget_outputs_become_the_images_they_last_showed(tmp_path):
    widgets = {
        "box": model("BoxModel", ["IPY_MODEL_controls", "IPY_MODEL_image"]),
        "controls": model("VBoxModel"),
        "image": model("ImageModel", buffers=[{"data": PNG, "path": ["value"]}]),
        "bar": model("HBoxModel", ["IPY_MODEL_progress"]),
        "progress": model("FloatProgressModel"),
    }
    text = nbformat.v4.new_output("stream", name="stdout", text="kept\n")
    path = lesson_notebook(
        tmp_path / "a.ipynb", "A", [text, widget_output("box"), widget_output("bar")], widgets
    )
    static = static_notebook(nbformat.read(path, as_version=4))
    outputs = static.cells[1].outputs
    assert outputs[0] == text
    assert outputs[1].data["image/png"] == PNG and outputs[2].text == EXPLORER_NOTE
    assert len(outputs) == 3  # the progress bar showed no image: it is left out
    assert "widgets" not in static.metadata  # no CDN script to draw widgets that are not there
    assert WIDGET_VIEW in nbformat.read(path, as_version=4).cells[1].outputs[1].data  # a copy


def test_navigation_links_each_lesson_to_its_neighbours_and_the_map(tmp_path):
    lessons = [read_lesson(lesson_notebook(tmp_path / f"0{i}.ipynb", f"L{i}")) for i in (1, 2, 3)]
    first, middle, last = (nav(lessons, i) for i in range(3))
    assert 'href="02.html" rel="next"' in first and 'rel="prev"' not in first
    assert 'href="01.html" rel="prev"' in middle and 'href="03.html" rel="next"' in middle
    assert 'href="02.html" rel="prev"' in last and 'rel="next"' not in last
    assert all('href="index.html"' in links for links in (first, middle, last))


def test_the_site_has_an_index_and_a_page_per_lesson_with_its_figures(tmp_path):
    figure = nbformat.v4.new_output("display_data", {"image/png": PNG, "text/plain": "<Figure>"})
    notebooks = [
        lesson_notebook(tmp_path / "01_one.ipynb", "01 · One", [figure]),
        lesson_notebook(tmp_path / "02_two.ipynb", "02 · Two"),
    ]
    written = build(notebooks, tmp_path / "site")
    assert [p.name for p in written] == ["index.html", "01_one.html", "02_two.html"]
    index = written[0].read_text()
    assert index.index('href="01_one.html"') < index.index('href="02_two.html"')
    assert "<em>02 · two</em>" in index  # what each lesson teaches
    one = written[1].read_text()
    assert f"data:image/png;base64,{PNG}" in one  # figures are embedded in the page
    assert one.count('href="02_two.html" rel="next"') == 2  # navigation above and below
    with pytest.raises(ValueError, match="no notebooks given"):
        build([], tmp_path / "empty")
