"""The course site (`make site`) opened in headless Chromium: the index, then a lesson."""

import sys

import nbformat
from labdriver import ARTIFACTS, REPO

sys.path.insert(0, str(REPO))  # tools/ sits beside minisd/
from tools.course_site import build, static_notebook  # noqa: E402

# How many images a page drew, and how many did not load.
_IMAGES = """() => { const images = Array.from(document.images);
  return [images.filter(i => i.complete && i.naturalWidth > 0).length,
          images.filter(i => !(i.complete && i.naturalWidth > 0)).length]; }"""


def test_the_site_opens_with_its_lessons_and_figures(page, tmp_path):
    notebooks = sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))
    index = build(notebooks, tmp_path / "site")[0]
    # The pages ask a CDN for MathJax; offline that fails, so wait for the document, not the net.
    page.goto(index.as_uri(), wait_until="domcontentloaded")
    links = page.locator(".course-map h2 a")
    assert links.count() == len(notebooks)
    page.screenshot(path=ARTIFACTS / "site-index.png")
    links.first.click()
    page.wait_for_url("**/01_forward_noising.html", wait_until="domcontentloaded")
    page.wait_for_function("document.images.length > 0 && "
                           "Array.from(document.images).every(i => i.complete)")  # fmt: skip
    drawn, broken = page.evaluate(_IMAGES)
    lesson = static_notebook(nbformat.read(notebooks[0], as_version=4))
    figures = sum(
        "image/png" in o.get("data", {}) for c in lesson.cells for o in c.get("outputs", [])
    )
    assert (drawn, broken) == (figures, 0)
    assert page.locator("h1").first.inner_text().startswith("01 ·")
    page.screenshot(path=ARTIFACTS / "site-lesson-01.png", full_page=False)
    page.locator('nav.course-nav a[rel="next"]').first.click()
    page.wait_for_url("**/02_ddpm_unet.html", wait_until="domcontentloaded")
