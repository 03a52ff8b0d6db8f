"""The course as a static site: each executed notebook as an HTML page with its figures, an index
with the course map, and links from each lesson to the previous and next. `make site` runs it:
    python tools/course_site.py --out build/site notebooks/0*.ipynb
"""

from __future__ import annotations

import argparse
import copy
import html
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# A saved widget needs ipywidgets' JavaScript from a CDN to draw itself; the site shows what an
# explorer last drew instead, so it reads offline.
EXPLORER_NOTE = "An interactive explorer in Jupyter; here, the last figure it drew."
STYLE = """<style>
.course-nav { display: flex; justify-content: space-between; gap: 1em; max-width: 1200px;
  margin: 0.5em auto; padding: 0.5em 1em; font: 15px sans-serif; border-bottom: 1px solid #ddd; }
.course-nav a { text-decoration: none; }
.course-map { max-width: 900px; margin: 2em auto; font: 16px/1.5 sans-serif; padding: 0 1em; }
.course-map li { margin-bottom: 1.5em; }
</style>"""


@dataclass(frozen=True)
class Lesson:
    """One notebook as the site shows it: its page's file name, title and what it teaches."""

    notebook: Path
    page: str  # e.g. "01_forward_noising.html"
    title: str  # the first markdown cell's heading
    summary: str  # the rest of that cell, as HTML


def read_lesson(notebook: Path) -> Lesson:
    """The lesson's title and summary from its first markdown cell (every notebook opens with
    what it teaches and its run time)."""
    from nbconvert.filters import markdown2html

    cells = nbformat.read(notebook, as_version=4).cells
    first = next((c.source for c in cells if c.cell_type == "markdown"), "")
    heading, _, rest = first.partition("\n")
    if not heading.startswith("# "):
        raise ValueError(
            f"{notebook}: expected its first markdown cell to open with a '# title' line, got "
            f"{heading[:60]!r}; every course notebook starts with its title and what it teaches"
        )
    return Lesson(notebook, notebook.stem + ".html", heading[2:].strip(), markdown2html(rest))


def _widget_images(state: dict, model_id: str) -> list[bytes]:
    """The base64 PNGs of every Image widget at or below `model_id` in a saved widget state."""
    model = state.get(model_id)
    if model is None:
        return []
    if model["state"].get("_model_name") == "ImageModel":
        return [b["data"] for b in model.get("buffers", []) if b.get("path") == ["value"]]
    children = model["state"].get("children") or []
    return [png for child in children for png in _widget_images(state, child[len("IPY_MODEL_") :])]


def static_notebook(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy whose widget outputs are replaced by the images they last showed (progress bars and
    other imageless widgets by nothing), without the saved widget state."""
    notebook = copy.deepcopy(notebook)
    widgets = notebook.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.outputs:
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                outputs.append(output)
                continue
            for png in _widget_images(widgets, view["model_id"]):
                outputs.append(nbformat.v4.new_output(
                    "display_data", {"image/png": png, "text/plain": EXPLORER_NOTE}
                ))  # fmt: skip
                outputs.append(nbformat.v4.new_output("stream", name="stdout", text=EXPLORER_NOTE))
        cell.outputs = outputs
    return notebook


def nav(lessons: list[Lesson], index: int) -> str:
    """Links to the previous lesson, the course map and the next lesson."""

    def link(i: int, arrow: str) -> str:
        if not 0 <= i < len(lessons):
            return "<span></span>"
        title = html.escape(lessons[i].title)
        return f'<a href="{lessons[i].page}" rel="{arrow}">{title}</a>'

    prev = link(index - 1, "prev").replace('">', '">&larr; ', 1)
    nxt = link(index + 1, "next").replace("</a>", " &rarr;</a>")
    return f'<nav class="course-nav">{prev}<a href="index.html">Course map</a>{nxt}</nav>'


def lesson_page(lessons: list[Lesson], index: int) -> str:
    """The lesson's notebook as nbconvert's JupyterLab-styled HTML, with navigation above and
    below it; figures are embedded in the page."""
    from nbconvert import HTMLExporter

    notebook = static_notebook(nbformat.read(lessons[index].notebook, as_version=4))
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(notebook)
    links = nav(lessons, index)
    body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + links, body, count=1)
    body = body.replace("</head>", STYLE + "</head>", 1)
    return body.replace("</body>", links + "</body>", 1)


def _mathjax() -> str:
    """The MathJax that nbconvert's lesson pages load, for the formulas in the course map."""
    from nbconvert import HTMLExporter

    config = "MathJax.Hub.Config({tex2jax: {inlineMath: [['$', '$']], processEscapes: true}});"
    return (
        f'<script type="text/x-mathjax-config">{config}</script>'
        f'<script src="{HTMLExporter().mathjax_url}"></script>'
    )


def index_page(lessons: list[Lesson]) -> str:
    """The course map: each lesson's title, linked to its page, and what it teaches."""
    items = "\n".join(
        f'<li><h2><a href="{lesson.page}">{html.escape(lesson.title)}</a></h2>{lesson.summary}</li>'
        for lesson in lessons
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>minisd: the course</title>{STYLE}{_mathjax()}</head><body>"
        '<main class="course-map"><h1>minisd: Stable Diffusion, built one concept at a time</h1>'
        "<p>The course's notebooks as they ran (the quick profile). To run and change them, "
        "<code>make lab</code> in the repository.</p>"
        f"<ol>\n{items}\n</ol></main></body></html>\n"
    )


def build(notebooks: list[Path], out: Path) -> list[Path]:
    """Write index.html and one page per notebook (in the order given) into `out`."""
    if not notebooks:
        raise ValueError("no notebooks given: pass the executed notebooks, e.g. notebooks/0*.ipynb")
    lessons = [read_lesson(path) for path in notebooks]
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "index.html"]
    written[0].write_text(index_page(lessons), encoding="utf-8")
    for i, lesson in enumerate(lessons):
        written.append(out / lesson.page)
        written[-1].write_text(lesson_page(lessons, i), encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help="executed notebooks, in order")
    parser.add_argument("--out", type=Path, default=Path("build/site"))
    args = parser.parse_args(argv)
    for path in build(args.notebooks, args.out):
        print(path)


if __name__ == "__main__":
    main()
