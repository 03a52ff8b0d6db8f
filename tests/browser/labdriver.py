"""JupyterLab as a reader meets it: a server on 127.0.0.1, headless Chromium driven by Playwright,
and checks of what a notebook's widgets look like there (nbval cannot see widgets)."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "build" / "browser"  # screenshots, kept by CI as test artifacts
ENABLE = "apt-get install chromium, then pip install -e '.[dev]' (it brings playwright)"
# Without the networking flags Chromium waits on refused connections to Google's services.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The windows a reader's JupyterLab gets (issue 18): narrow and wide, file browser open or not.
WINDOWS = [(1000, 800, True), (1000, 800, False), (1400, 900, True), (1400, 900, False)]
# JupyterLab settings for the test server: never write the notebook back, keep every cell in the
# page (windowing would drop cells scrolled out of view from the DOM), ask no network for news (its
# toast would also cover the notebook's corner).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def find_chromium() -> str | None:
    """$MINISD_CHROMIUM, else the first Chromium on PATH (Debian's package is `chromium`)."""
    if os.environ.get("MINISD_CHROMIUM"):
        return os.environ["MINISD_CHROMIUM"]
    names = ("chromium", "chromium-browser", "google-chrome")
    return next((path for path in map(shutil.which, names) if path), None)


def missing() -> str | None:
    """Why the browser tests cannot run here (and how to enable them), or None if they can."""
    lacking = [] if find_chromium() else ["no Chromium on PATH"]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        lacking.append("no playwright")
    return f"{' and '.join(lacking)}: {ENABLE}" if lacking else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Lab:
    """A running JupyterLab: its address, token and the folder it serves."""

    url: str
    token: str
    root: Path

    def open_url(self, path: str) -> str:
        return f"{self.url}/lab/tree/{path}?reset&token={self.token}"


@contextlib.contextmanager
def jupyter_lab(root: Path, log: Path, start_timeout: float = 90) -> Iterator[Lab]:
    """JupyterLab from this Python's environment serving `root`, stopped however the block ends."""
    token, port = secrets.token_hex(16), _free_port()
    settings = root / ".lab" / "settings"
    for name, value in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(value))
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(root / ".lab" / "config"),
        JUPYTER_RUNTIME_DIR=str(root / ".lab" / "runtime"),
    )
    # The kernel imports this checkout's minisd and runs this environment's Python.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={root / '.lab' / 'workspaces'}",
        "--LabApp.extension_manager=readonly",
    ] + (["--allow-root"] if os.geteuid() == 0 else [])  # fmt: skip
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    lab = Lab(f"http://127.0.0.1:{port}", token, root)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {server.returncode}; see {log}")
            try:
                urllib.request.urlopen(f"{lab.url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"JupyterLab did not answer in {start_timeout:.0f} s; "
                                       f"see {log}") from None  # fmt: skip
                time.sleep(0.5)
        yield lab
    finally:
        server.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """Headless system Chromium under Playwright (Playwright's own browser download is not used;
    Playwright gives it a fresh temporary profile)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=find_chromium(), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


def _is_explorer(cell: dict) -> bool:
    """Does this cell make one of minisd.widgets' explorers?"""
    return cell["cell_type"] == "code" and "Explorer(" in "".join(cell["source"])


def explorers_in(notebook: Path) -> int:
    return sum(map(_is_explorer, json.loads(notebook.read_text())["cells"]))


def _binds_and_reads(node: ast.AST) -> tuple[set[str], set[str]]:
    binds, reads = set(), set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            (reads if isinstance(child.ctx, ast.Load) else binds).add(child.id)
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            binds.add(child.name)
        elif isinstance(child, ast.Import | ast.ImportFrom):
            binds |= {(alias.asname or alias.name).split(".")[0] for alias in child.names}
    return binds, reads


def _names(source: str) -> tuple[set[str], set[str]]:
    """The names a cell binds, and those it reads from earlier cells. Statement by statement: a
    name a statement binds is its own (a loop variable), except that an assignment reads its
    value first (`x = x + 1`, `x += 1`)."""
    from IPython.core.inputtransformer2 import TransformerManager

    bound, read = set(), set()
    for statement in ast.parse(TransformerManager().transform_cell(source)).body:
        binds, reads = _binds_and_reads(statement)
        reads -= binds
        if isinstance(statement, ast.Assign | ast.AugAssign | ast.AnnAssign) and statement.value:
            value_binds, value_reads = _binds_and_reads(statement.value)
            reads |= value_reads - value_binds
            if isinstance(statement, ast.AugAssign) and isinstance(statement.target, ast.Name):
                reads.add(statement.target.id)
        read |= reads - bound
        bound |= binds
    return bound, read


def cells_explorers_need(cells: list[dict]) -> list[int]:
    """The code cells that make the explorers, and those that bind what they read, transitively
    (each name from the last cell before the reader that binds it). Running all of notebooks 05
    and 06 takes minutes of sampling that no explorer reads; nbval runs every cell anyway."""
    names = {
        i: _names("".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "code"
    }
    needed = {i for i, cell in enumerate(cells) if _is_explorer(cell)}
    todo = list(needed)
    while todo:
        reader = todo.pop()
        for name in names[reader][1]:
            binders = [i for i in names if i < reader and name in names[i][0]]
            if binders and binders[-1] not in needed:
                needed.add(binders[-1])
                todo.append(binders[-1])
    return sorted(needed)


def copy_for_lab(notebook: Path, dest: Path, all_cells: bool) -> int:
    """Write `notebook` to `dest` without outputs or saved widget state (so only what runs in the
    browser can show), keeping all its cells or only `cells_explorers_need`; return how many."""
    content = json.loads(notebook.read_text())
    keep = range(len(content["cells"])) if all_cells else cells_explorers_need(content["cells"])
    content["cells"] = [content["cells"][i] for i in keep]
    for cell in content["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    content["metadata"].pop("widgets", None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(content, indent=1))
    return len(content["cells"])


# ----- in the page: JupyterLab's app object (exposed by --LabApp.expose_app_in_browser) ----------
_OPEN = """async () => {
  const app = window.jupyterapp;
  await app.restored;
  let panel = app.shell.currentWidget;
  for (let i = 0; i < 300 && !(panel && panel.sessionContext); i++) {
    await new Promise(r => setTimeout(r, 100));
    panel = app.shell.currentWidget;
  }
  await panel.context.ready;
  await panel.sessionContext.ready;
  return panel.sessionContext.session.kernel.name;
}"""
# _OPEN, given up after a while: a notebook without a kernelspec waits on a dialog forever.
_OPEN_WITHIN = """(ms) => Promise.race([(OPEN)(), new Promise((_, reject) => setTimeout(
  () => reject(new Error(`no kernel ready after ${ms / 1000} s`)), ms))])""".replace(
    "(OPEN)", f"({_OPEN})"
)
_RUN_ALL = """() => {
  window.__ran = undefined;
  window.jupyterapp.commands.execute('notebook:run-all-cells')
    .then(ok => { window.__ran = String(ok); }, err => { window.__ran = String(err); });
}"""
# Every code cell's execution count and error outputs, from the notebook's model.
_CELLS = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
  const found = [];
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    const outputs = cell.outputs.toJSON();
    found.push({index: i, count: cell.executionCount,
      errors: outputs.filter(o => o.output_type === 'error').map(o => `${o.ename}: ${o.evalue}`),
      widgets: outputs.filter(o => o.data && o.data['application/vnd.jupyter.widget-view+json'])
        .length});
  }
  return found;
}"""
# What the widget manager drew in place of each widget output: null if the widget, else the error
# it shows (its error view reveals the JavaScript error when clicked).
_RENDERED = """() => Array.from(document.querySelectorAll('.jp-OutputArea-output'))
  .filter(out => out.querySelector('.jupyter-widgets') || /Error displaying widget/.test(
    out.textContent))
  .map(out => {
    const error = out.querySelector('.jupyter-widgets-error-widget, .widget-error');
    if (error) error.click();
    if (error || /Error displaying widget/.test(out.textContent)) {
      return (out.innerText || 'Error displaying widget').trim().slice(0, 300);
    }
    return null;
  })"""
_EXPLORERS = """Array.from(document.querySelectorAll('.jp-OutputArea-output > .widget-box'))
  .filter(box => box.querySelector(':scope > .widget-image'))"""
# Is each control's value (readout, dropdown, text field) and each slider handle on screen, inside
# the notebook, and not covered by anything (the figure)? Probed at its left, middle and right.
_LAYOUT = """(index) => {
  const root = (EXPLORERS)[index];
  const out = root.closest('.jp-OutputArea-output');
  const scroller = root.closest('.jp-WindowedPanel-outer') || document.documentElement;
  const problems = [];
  const targets = root.querySelectorAll(
    '.widget-label, .widget-readout, select, input, .noUi-handle');
  for (const el of targets) {
    const control = el.closest('.widget-inline-hbox');
    const label = control.querySelector('.widget-label');
    const part = el.classList.contains('noUi-handle') ? ' (slider handle)'
      : el === label ? ' (label)' : '';
    const name = (label && label.textContent || control.className).trim() + part;
    // Scroll the notebook up or down only: a sideways scroll would hide what a reader cannot see.
    let r = el.getBoundingClientRect();
    const middle = scroller.getBoundingClientRect();
    scroller.scrollTop += (r.top + r.bottom) / 2 - (middle.top + middle.bottom) / 2;
    r = el.getBoundingClientRect();
    const area = out.getBoundingClientRect(), panel = scroller.getBoundingClientRect();
    const left = Math.max(area.left, panel.left), right = Math.min(area.right, panel.right);
    if (r.width < 8 || r.height < 8) {
      problems.push(`${name}: ${Math.round(r.width)}x${Math.round(r.height)} px`);
      continue;
    }
    if (r.left < left - 1 || r.right > right + 1) {
      problems.push(`${name}: at x ${Math.round(r.left)}-${Math.round(r.right)}, outside the ` +
        `notebook's ${Math.round(left)}-${Math.round(right)}`);
      continue;
    }
    const y = (r.top + r.bottom) / 2;
    for (const x of [r.left + 2, (r.left + r.right) / 2, r.right - 2]) {
      const hit = document.elementFromPoint(x, y);
      if (!(hit && (el === hit || el.contains(hit)))) {
        problems.push(`${name}: covered at x ${Math.round(x)} by ` +
          `<${hit ? hit.tagName.toLowerCase() + ' class="' + hit.className + '"' : 'nothing'}>`);
        break;
      }
    }
    const value = el.tagName === 'SELECT' || el.tagName === 'INPUT' ? el.value : el.textContent;
    if (!el.classList.contains('noUi-handle') && !String(value).trim()) {
      problems.push(`${name}: shows nothing`);
    }
  }
  for (const box of [out, root, ...root.querySelectorAll('.widget-box')]) {
    if (box.scrollWidth > box.clientWidth + 1) {
      const kind = box.classList[box.classList.length - 1];
      problems.push(`${kind}: scrolls sideways (${box.scrollWidth} px in ${box.clientWidth})`);
    }
  }
  const controls = root.firstElementChild.getBoundingClientRect();
  const image = root.querySelector(':scope > .widget-image').getBoundingClientRect();
  root.scrollIntoView({block: 'start'});
  return {problems, output_width: Math.round(out.getBoundingClientRect().width),
    controls_width: Math.round(controls.width), image_width: Math.round(image.width),
    image_below_controls: image.top >= controls.bottom - 1};
}""".replace("(EXPLORERS)", f"({_EXPLORERS})")


def open_notebook(page, lab: Lab, path: str, timeout: float = 120) -> None:
    """Open `path` (relative to the lab's root) and wait for its kernel."""
    page.set_default_timeout(timeout * 1000)
    page.goto(lab.open_url(path))
    page.wait_for_function("window.jupyterapp !== undefined")
    page.evaluate(_OPEN_WITHIN, timeout * 1000)


def run_all_cells(page, timeout: float) -> list[str]:
    """Run every cell as Run > Run All Cells does; return what went wrong (errors, unrun cells)."""
    page.evaluate(_RUN_ALL)
    page.wait_for_function("window.__ran !== undefined", timeout=timeout * 1000)
    cells = page.evaluate(_CELLS)
    problems = [f"cell {c['index']}: {error}" for c in cells for error in c["errors"]]
    unrun = [c["index"] for c in cells if c["count"] is None]
    if unrun and not problems:
        problems.append(f"cells {unrun} did not run (Run All Cells gave {page.evaluate('__ran')})")
    return problems


def widget_problems(page) -> list[str]:
    """Widget outputs that the lab could not draw ("Error displaying widget" and the like), and
    widget outputs the notebook holds that drew nothing."""
    page.wait_for_timeout(1000)  # the widget manager draws after the output arrives
    expected = sum(c["widgets"] for c in page.evaluate(_CELLS))
    rendered = page.evaluate(_RENDERED)
    problems = [f"widget output {i}: {text}" for i, text in enumerate(rendered) if text]
    if len(rendered) < expected:
        problems.append(f"{expected} widget outputs but {len(rendered)} drawn")
    return problems


def explorer_count(page) -> int:
    """How many explorers (controls beside or above a figure) the notebook shows; each is marked
    with its index for `redraw_problem`."""
    return page.evaluate(
        f"() => ({_EXPLORERS}).map((box, i) => {{ box.dataset.explorer = i; }}).length"
    )


def set_window(page, width: int, height: int, sidebar: bool) -> None:
    """Resize the window and open or close the left sidebar (the file browser)."""
    page.set_viewport_size({"width": width, "height": height})
    collapsed = page.evaluate("() => window.jupyterapp.shell.leftCollapsed")
    if collapsed == sidebar:
        page.evaluate("() => window.jupyterapp.commands.execute('application:toggle-left-area')")
    page.wait_for_timeout(500)  # let the lab and the widgets lay themselves out


def layout(page, index: int) -> dict:
    """Where explorer `index`'s controls and figure sit, and which values a reader cannot see."""
    return page.evaluate(_LAYOUT, index)


def redraw_problem(page, index: int, timeout: float = 60) -> str | None:
    """Drag explorer `index`'s first slider as a reader would; None if its figure changed."""
    root = page.locator(f'[data-explorer="{index}"]')
    image, handle = root.locator(":scope > .widget-image"), root.locator(".noUi-handle").first
    handle.scroll_into_view_if_needed()
    before = image.screenshot()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 40, y, steps=4)
    page.mouse.up()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page.wait_for_timeout(500)
        if image.screenshot() != before:
            return None
    return f"explorer {index}: the figure did not change within {timeout:.0f} s of moving a slider"
