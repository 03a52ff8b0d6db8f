"""One JupyterLab server and one headless Chromium for the browser tests; both always stopped."""

import os

import pytest
from labdriver import ARTIFACTS, chromium, jupyter_lab, missing

# .ci/run sets MINISD_BROWSER_TESTS=1: there a missing browser fails the run instead of skipping.
REQUIRED = os.environ.get("MINISD_BROWSER_TESTS") == "1"
_skipped: list[str] = []


@pytest.fixture(scope="session")
def browser():
    reason = missing()
    if reason and REQUIRED:
        pytest.fail(f"MINISD_BROWSER_TESTS=1 but the browser tests cannot run: {reason}")
    if reason:
        _skipped.append(reason)
        pytest.skip(f"browser tests skipped: {reason}")
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="session")
def lab(browser, tmp_path_factory):
    """JupyterLab serving a scratch folder: tests copy notebooks there, never run the course's."""
    root = tmp_path_factory.mktemp("lab")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with jupyter_lab(root, ARTIFACTS / "jupyterlab.log") as lab:
        yield lab


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()


def pytest_terminal_summary(terminalreporter):
    if _skipped:
        terminalreporter.write_line(
            f"BROWSER TESTS SKIPPED (tests/browser): {_skipped[0]}", yellow=True, bold=True
        )
