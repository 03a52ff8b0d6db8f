"""A JupyterLab server and a headless Chromium for each browser test module; both always stopped.

Module-scoped, not session-scoped: Playwright's sync API keeps an asyncio loop running in the
main thread while it is open, and every later test that runs a kernel through nbclient (the
grader's) would fail with "asyncio.run() cannot be called from a running event loop"."""

import os

import pytest
from labdriver import ARTIFACTS, chromium, jupyter_lab, missing

# .ci/run sets MINISD_BROWSER_TESTS=1: there a missing browser fails the run instead of skipping.
REQUIRED = os.environ.get("MINISD_BROWSER_TESTS") == "1"
_skipped: list[str] = []


@pytest.fixture(scope="module")
def browser():
    reason = missing()
    if reason and REQUIRED:
        pytest.fail(f"MINISD_BROWSER_TESTS=1 but the browser tests cannot run: {reason}")
    if reason:
        _skipped.append(reason)
        pytest.skip(f"browser tests skipped: {reason}")
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
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
