"""`make mutate`: mutation testing of minisd's core numerics, written to data/results/mutation.md.

A mutant is the library with one small change (an operator flipped, a constant nudged, an argument
dropped); the fast tests of that module should fail on it. The score is killed / total, and every
mutant left alive is listed with the reason it is equivalent or harmless, read from
`mutation/equivalent.toml`, or "not yet explained".

Why mutmut 3 and not cosmic-ray: mutmut imports torch and the tests once, then forks one process
per mutant and runs only the tests that execute the mutated function (fastest first, stopping at
the first failure): 1,819 mutants in 58 min on 2 shared cores, ~2 s each. cosmic-ray starts a
fresh interpreter per mutant (~3 s for torch and diffusers alone) and runs the whole test command
(~20 s), so the same run would take about 10 hours. mutmut also names each mutant by its function
(`minisd.train.x_fit__mutmut_7`), which is how the run below is restricted to the training
objective and the autoencoder loss instead of the whole U-Net and VAE network code.

Three settings make mutmut fit this package:
- fork mode with OMP_NUM_THREADS=1: torch never starts its OpenMP pool, so forking after the tests
  ran is safe (mutmut's fork-server mode also works but is 6x slower here);
- tqdm's lock is made per-process (`_fork_safe_tqdm`), else one child killed mid-bar hangs all;
- mutmut skips every decorated function (a decorator such as `@app.route` could have side effects
  when duplicated). `@torch.no_grad()` has none, and it guards real logic (`update_ema`, the
  samplers' loops), so `_allow_no_grad` lets mutmut mutate functions whose only decorator it is.

Usage: `python mutation/run.py [--jobs N]`; `--resume` finishes an interrupted run (same sources);
`--report-only` rewrites the results from the last run (after editing equivalent.toml);
`--check-tool` exits 0 if the pinned mutmut is installed.
Exit status 1 if the score is under the bar or a survivor is not yet explained.
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REASONS = ROOT / "mutation" / "equivalent.toml"
RESULTS_MD = ROOT / "data" / "results" / "mutation.md"
RESULTS_JSON = ROOT / "data" / "results" / "mutation.json"
BAR = 0.85
COMMAND = "make mutate"

# What is mutated: None = every function in the file; else functions ("Class.*" = its methods).
# train.py and vae.py also hold the training loop's I/O and the network modules: out of scope.
TARGETS: dict[str, tuple[str, ...] | None] = {
    "minisd/schedule.py": None,
    "minisd/sampling.py": None,
    "minisd/checkpoint.py": None,
    "minisd/diffusion.py": None,
    "minisd/train.py": (
        "_lr_at",
        "update_ema",
        "batch_indices",
        "step_generator",
        "fit",
    ),
    "minisd/vae.py": (
        "vae_loss",
        "_check_loss_args",
        "vae_loss_fn",
        "DiagonalGaussianDistribution.*",
        "compute_scale_factor",
        "psnr",
    ),
}
SEP = "ǁ"  # mutmut's separator in the names of methods: xǁClassǁmethod
KILLED = {"killed"}


def patterns_for(path: str, functions: tuple[str, ...] | None) -> list[str]:
    """mutmut name patterns (fnmatch) of the mutants of `functions` in `path`."""
    module = path.removesuffix(".py").replace("/", ".")
    if functions is None:
        return [f"{module}.*"]
    out = []
    for fn in functions:
        if "." in fn:
            cls, meth = fn.split(".")
            out.append(f"{module}.x{SEP}{cls}{SEP}" + ("*" if meth == "*" else f"{meth}__mutmut_*"))
        else:
            out.append(f"{module}.x_{fn}__mutmut_*")
    return out


def pinned_mutmut() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (req,) = [r for r in project["optional-dependencies"]["mutation"] if r.startswith("mutmut")]
    return req.split("==")[1]


def mutmut_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


# ----- running mutmut --------------------------------------------------------------------------
def _allow_no_grad() -> None:
    """Let mutmut 3 mutate functions whose only decorator is `@torch.no_grad()` (see the top)."""
    import libcst as cst
    import libcst.matchers as m
    from mutmut.mutation import file_mutation as fm

    no_grad = m.Decorator(
        decorator=m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("no_grad")), args=())
    )
    skip = fm.MutationVisitor._skip_node_and_children

    def patched(self, node):
        skipped = skip(self, node)
        if (
            skipped
            and isinstance(node, cst.FunctionDef)
            and len(node.decorators) == 1
            and m.matches(node.decorators[0], no_grad)
            and node.name.value not in self.ignored_functions  # "# pragma: no mutate" still wins
            and node.name.value not in fm.NEVER_MUTATE_FUNCTION_NAMES
        ):
            return False
        return skipped

    fm.MutationVisitor._skip_node_and_children = patched


def _fork_safe_tqdm() -> None:
    """Give tqdm a per-process write lock and no monitor thread before mutmut forks.

    tqdm's default lock includes a multiprocessing RLock that every forked child shares: one child
    killed at a timeout while holding it leaves it held, and every later child that draws a
    progress bar (fit(progress=True), the command line) then hangs until its own timeout.
    """
    from tqdm import std

    std.TqdmDefaultWriteLock.mp_lock = None  # create_mp_lock() sees it and makes none
    std.tqdm.monitor_interval = 0


def run_mutmut(patterns: list[str], jobs: int) -> int:
    """`mutmut run` on the mutants matching `patterns` (names or fnmatch patterns)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--mutmut", "run", "--max-children", str(jobs), *patterns]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


# ----- reading the results ---------------------------------------------------------------------
def function_of(name: str) -> str:
    """'minisd.vae.xǁCǁm__mutmut_3' -> 'C.m'; 'minisd.train.x_fit__mutmut_7' -> 'fit'."""
    mangled = name.partition("__mutmut_")[0].rpartition(".")[2]
    if mangled.startswith(f"x{SEP}"):
        return ".".join(mangled[2:].split(SEP))
    return mangled.removeprefix("x_")


def norm(lines: list[str]) -> str:
    return "\n".join(" ".join(line.split()) for line in lines)


def describe(name: str, path: str, source: str) -> dict:
    """The mutant's diff, its line in the source that was mutated, and the changed lines."""
    import libcst as cst
    from mutmut.mutation.diff_apply import (
        read_functions_from_index,
        read_mutant_function,
        read_mutants_module,
        read_original_function,
    )

    functions = read_functions_from_index(name, path)
    if functions is None:
        module = read_mutants_module(path)
        functions = (read_original_function(module, name), read_mutant_function(module, name))
    orig, mutant = (cst.Module([f]).code.strip().split("\n") for f in functions)
    diff = "\n".join(difflib.unified_diff(orig, mutant, path, path, lineterm=""))
    ops = [
        op for op in difflib.SequenceMatcher(None, orig, mutant).get_opcodes() if op[0] != "equal"
    ]
    before = [line for op in ops for line in orig[op[1] : op[2]]]
    after = [line for op in ops for line in mutant[op[3] : op[4]]]
    # Where the function's text starts in the source (compared stripped: methods lose an indent).
    file_lines = [line.strip() for line in source.split("\n")]
    want = [line.strip() for line in orig]
    start = next((s for s in range(len(file_lines)) if file_lines[s : s + len(want)] == want), None)
    line = None if start is None or not ops else start + ops[0][1] + 1
    return {"line": line, "diff": diff, "before": norm(before), "after": norm(after)}


def load_reasons() -> dict[tuple[str, str | None, str | None], str]:
    """(function, before, after) -> reason; None: any line or any mutation of it (see the file)."""
    if not REASONS.is_file():
        return {}
    entries = tomllib.loads(REASONS.read_text()).get("mutant", [])
    return {(e["function"], _norm(e, "before"), _norm(e, "after")): e["reason"] for e in entries}


def _norm(entry: dict, key: str) -> str | None:
    return norm(entry[key].split("\n")) if key in entry else None


def collect(patterns_by_path: dict[str, list[str]], sources: dict[str, str]) -> dict:
    from mutmut.stats import status_by_exit_code

    reasons = load_reasons()
    used: set[tuple[str, str | None, str | None]] = set()
    per_function: dict[str, dict[str, int]] = {}
    survivors, unmatched = [], []
    for path, patterns in patterns_by_path.items():
        meta = json.loads((ROOT / "mutants" / f"{path}.meta").read_text())
        codes = meta["exit_code_by_key"]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(k, pattern) for k in codes):
                unmatched.append(pattern)
        names = [k for k in codes if _matches(k, patterns)]
        for name in sorted(names, key=lambda k: (k.partition("__mutmut_")[0], _num(k))):
            status = status_by_exit_code[codes[name]]
            fn = f"{path}::{function_of(name)}"
            counts = per_function.setdefault(fn, {"mutants": 0, "killed": 0})
            counts["mutants"] += 1
            counts["killed"] += status in KILLED
            if status in KILLED:
                continue
            info = describe(name, path, sources[path])
            # the most specific entry: this mutation, any mutation of the line, the whole function
            keys = [
                (fn, info["before"], info["after"]),
                (fn, info["before"], None),
                (fn, None, None),
            ]
            key = next((k for k in keys if k in reasons), keys[0])
            used.add(key)
            survivors.append(
                {"id": name, "file": path, "function": fn, "status": status, **info}
                | {"reason": reasons.get(key)}
            )
    stale = sorted(
        f"{k[0]}: {k[1] or '(any line)'!r} -> {k[2] or '(any)'!r}" for k in set(reasons) - used
    )
    return {"per_function": per_function, "survivors": survivors, "unmatched": unmatched} | {
        "stale_reasons": stale
    }


def unchecked(patterns_by_path: dict[str, list[str]]) -> list[str]:
    """Names of the targeted mutants that have no result yet (an interrupted run's rest)."""
    names = []
    for path, patterns in patterns_by_path.items():
        codes = json.loads((ROOT / "mutants" / f"{path}.meta").read_text())["exit_code_by_key"]
        names += [k for k, v in codes.items() if v is None and _matches(k, patterns)]
    return names


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _num(name: str) -> int:
    return int(name.rpartition("__mutmut_")[2])


def git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    status = git("status", "--porcelain", "--", "minisd", "tests").splitlines()
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "uncommitted": [s[3:] for s in status],
    }


# ----- writing the results ---------------------------------------------------------------------
def cell(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ⏎ ")
    return f"`{text}`" if text else "(nothing)"


def write_results(report: dict) -> None:
    t = report["totals"]
    lines = [
        "# Mutation testing: the latest `make mutate`",
        "",
        f"Written by `mutation/run.py` on {report['date']}; do not edit by hand. Reasons for "
        "survivors live in `mutation/equivalent.toml`, matched by function and the changed line, "
        "so they carry over to the next run.",
        "",
        f"- **Score: {t['killed']} / {t['total']} mutants killed = {report['score']:.1%}** "
        f"(bar: {BAR:.0%}, {'met' if report['score'] >= BAR else 'NOT met'})",
        f"- Excluding the {report['explained']} survivors explained as equivalent or harmless: "
        f"{t['killed']} / {t['total'] - report['explained']} = "
        f"{report['score_excluding_explained']:.1%}",
        f"- Tool: mutmut {report['tool_version']}, fork per mutant, {report['jobs']} worker(s), "
        "`OMP_NUM_THREADS=1`; functions decorated only by `@torch.no_grad()` mutated too",
        f"- Command: `{COMMAND}` (runs `{report['command']}`): {report['minutes']:.0f} min on "
        f"{os.cpu_count()} CPUs"
        + (
            f" in {len(parts)} parts ({' + '.join(map(str, parts))} min: interrupted, then resumed)"
            if len(parts := report["parts_minutes"]) > 1
            else ""
        )
        + f", load average {report['load_average'][0]} at the start and "
        f"{report['load_average'][1]} at the end (other jobs slow it down)",
        f"- Code: commit {report['git']['commit']}"
        + (
            f" plus uncommitted changes to {', '.join(report['git']['uncommitted'])}"
            if report["git"]["uncommitted"]
            else ""
        ),
        f"- Tests: {', '.join(report['tests'])} (`{' '.join(report['pytest_args'])}`)",
        f"- Mutants: {t['total']} total, {t['killed']} killed, {t['survived']} survived, "
        f"{t['timeout']} timeouts, {t['no tests']} not reached by any test, {t['other']} other",
        "",
        "## What was mutated",
        "",
        "| file | functions | mutants | killed | score |",
        "|---|---|---:|---:|---:|",
    ]
    for path, functions in TARGETS.items():
        rows = {k: v for k, v in report["per_function"].items() if k.startswith(path + "::")}
        n, k = sum(v["mutants"] for v in rows.values()), sum(v["killed"] for v in rows.values())
        names = "all" if functions is None else ", ".join(f"`{f}`" for f in functions)
        lines.append(f"| `{path}` | {names} | {n} | {k} | {k / n:.1%} |" if n else "")
    lines += ["", "Per function:", "", "| function | mutants | killed |", "|---|---:|---:|"]
    for fn, v in report["per_function"].items():
        lines.append(f"| `{fn}` | {v['mutants']} | {v['killed']} |")
    survivors = report["survivors"]
    explained = sum(s["reason"] is not None for s in survivors)
    lines += [
        "",
        f"## Survivors ({len(survivors)}; {explained} explained, "
        f"{len(survivors) - explained} not yet explained)",
        "",
        "Every mutant the tests did not kill. `mutmut show ID` (after a run) prints its diff; the "
        "full diffs are in `mutation.json`.",
        "",
        "| mutant | where | before | after | status | reason |",
        "|---|---|---|---|---|---|",
    ]
    for s in survivors:
        where = f"`{s['file']}:{s['line']}`" if s["line"] else f"`{s['file']}`"
        reason = (s["reason"] or "**not yet explained**").replace("|", "\\|")
        lines.append(
            f"| `{s['id'].rpartition('.')[2]}` | {where} | {cell(s['before'])} | "
            f"{cell(s['after'])} | {s['status']} | {reason} |"
        )
    if report["stale_reasons"]:
        lines += [
            "",
            "Reasons in `mutation/equivalent.toml` that matched no survivor this run:",
            "",
        ]
        lines += [f"- {cell(r)}" for r in report["stale_reasons"]]
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_MD.write_text("\n".join(line for line in lines if line is not None) + "\n")
    RESULTS_JSON.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested in parallel")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the results from the last run's mutants/ (after editing equivalent.toml)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="test only the mutants an interrupted run left unchecked, then report",
    )
    parser.add_argument("--check-tool", action="store_true", help="exit 0 if mutmut is pinned")
    args = parser.parse_args()
    if args.check_tool:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return 0 if version("mutmut") == pinned_mutmut() else 1
        except PackageNotFoundError:
            return 1

    import mutmut

    os.chdir(ROOT)
    cfg = mutmut_config()
    if sorted(cfg["only_mutate"]) != sorted(TARGETS):
        sys.exit("pyproject's [tool.mutmut] only_mutate must list the files in TARGETS")
    patterns_by_path = {p: patterns_for(p, f) for p, f in TARGETS.items()}
    patterns = [p for ps in patterns_by_path.values() for p in ps]
    run_file = ROOT / "mutants" / "minisd-run.json"  # what the report needs besides mutmut's data
    sources = {p: (ROOT / p).read_text() for p in TARGETS}  # as mutmut copies them
    if args.report_only or args.resume:
        run = json.loads(run_file.read_text())
        if run["sources"] != sources:
            sys.exit("the mutated files changed since the last run: run `make mutate` afresh")
    else:  # a fresh copy: mutants/ is rebuilt, so no stale result is ever reused
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        (ROOT / "mutants").mkdir()
        run = {
            "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "jobs": args.jobs,
            "git": git_state(),
            "load_start": round(os.getloadavg()[0], 1),
            "sources": sources,
            "parts_minutes": [],
        }
    if not args.report_only:
        run_file.write_text(json.dumps(run))  # first, so that an interrupted run can resume
        todo = unchecked(patterns_by_path) if args.resume else patterns
        start = time.perf_counter()
        if todo and (rc := run_mutmut(todo, args.jobs)):
            sys.exit(f"mutmut run failed (exit code {rc}); see its output above")
        run["parts_minutes"].append(round((time.perf_counter() - start) / 60, 1))
        run["minutes"] = round(sum(run["parts_minutes"]), 1)
        run["load_end"] = round(os.getloadavg()[0], 1)
        run_file.write_text(json.dumps(run))
    found = collect(patterns_by_path, run["sources"])
    if found["unmatched"]:
        sys.exit(f"no mutants for {found['unmatched']}: renamed, or skipped by mutmut?")
    statuses = [s["status"] for s in found["survivors"]]
    total = sum(v["mutants"] for v in found["per_function"].values())
    totals = {"total": total, "killed": sum(v["killed"] for v in found["per_function"].values())}
    for status in ("survived", "timeout", "no tests"):
        totals[status] = statuses.count(status)
    totals["other"] = total - sum(totals[k] for k in ("killed", "survived", "timeout", "no tests"))
    report = {
        "date": run["date"],
        "tool": "mutmut",
        "tool_version": mutmut.__version__,
        "command": f"python mutation/run.py --jobs {run['jobs']}",
        "jobs": run["jobs"],
        "minutes": run["minutes"],
        "parts_minutes": run["parts_minutes"],
        "load_average": [run["load_start"], run["load_end"]],
        "git": run["git"],
        "targets": {p: list(f) if f else "all" for p, f in TARGETS.items()},
        "patterns": patterns,
        "tests": cfg["pytest_add_cli_args_test_selection"],
        "pytest_args": cfg.get("pytest_add_cli_args", []),
        "totals": totals,
        "score": totals["killed"] / total,
        "explained": (explained := sum(s["reason"] is not None for s in found["survivors"])),
        "score_excluding_explained": totals["killed"] / (total - explained),
        "bar": BAR,
        **found,
    }
    write_results(report)
    unexplained = [s["id"] for s in found["survivors"] if s["reason"] is None]
    print(f"\nmutation score {report['score']:.1%} ({totals['killed']}/{total}), bar {BAR:.0%}")
    print(f"{len(unexplained)} survivors not yet explained; wrote {RESULTS_MD.relative_to(ROOT)}")
    return 0 if report["score"] >= BAR and not unexplained else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--mutmut"]:  # the child process: mutmut itself, patched
        _allow_no_grad()
        _fork_safe_tqdm()
        from mutmut.__main__ import cli

        sys.argv = ["mutmut", *sys.argv[2:]]
        cli()
    else:
        sys.exit(main())
