"""`make bench`: minisd beside diffusers, written to bench/results.json and bench/results.md.

    python -m bench.run                              # every group, 3 repeats
    python -m bench.run --only train-text --repeats 5
    python -m bench.run --quick                      # the small cases, to try it out

A run of some groups replaces their rows and keeps the others', so the table can be refreshed a
group at a time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench import cases
from bench.harness import machine, measure
from minisd.checkpoint import atomic_write

HERE = Path(__file__).resolve().parent


def write_json(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1) + "\n"))


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """The old rows with those measured again replaced (by name), in the old order."""
    fresh = {r["name"]: r for r in new}
    kept = [fresh.pop(r["name"], r) for r in old]
    return kept + list(fresh.values())


def _fmt(value: float, unit: str) -> str:
    return f"{value:.3g} s" if unit == "s" else f"{value:.1f} img/s"


def _spread(r: dict, impl: str) -> str:
    lo, hi = r[f"{impl}_spread"]
    return f"{_fmt(r[impl], r['unit'])} [{lo:.3g}-{hi:.3g}]"


def _flops(r: dict) -> str:
    if "minisd_gflops_per_s" not in r:
        return ""
    return f"{r['minisd_gflops_per_s']:.0f} ({r.get('minisd_share_of_peak', 0):.0%})"


def _mem(r: dict) -> str:
    if "minisd_peak_mib" not in r:
        return ""
    return f"{r['minisd_peak_mib']:.0f} / {r['reference_peak_mib']:.0f}"


def _machine_key(r: dict) -> str:
    return json.dumps(r["machine"], sort_keys=True)


def _table(rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> list[str]:
    """A Markdown table: one line per result, one column per (header, the cell of a row)."""
    out = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return out + ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]


def _compared(name: str, ours: str, theirs: str, ratio: str, *middle, alone: bool = False):
    """A table's columns: the name, both implementations' times, the ratio, its own columns,
    the note (a minisd-only table: the name, the time, the note)."""
    head = [(name, lambda r: r["name"]), (ours, lambda r: _spread(r, "minisd"))]
    if not alone:
        head.append((theirs, lambda r: _spread(r, "reference")))
        head.append((ratio, lambda r: f"{r['ratio']:.3f}"))
    return head + list(middle) + [("note", lambda r: r.get("note", "")), ("ran on", _ran_on)]


def _ran_on(r: dict) -> str:
    return r.get("ran_on", "")


def _gflop(r: dict) -> str:
    if "minisd_gflop" not in r:
        return ""
    return f"{r['minisd_gflop']:.1f} / {r['reference_gflop']:.1f}"


def _shares(key: str) -> Callable[[dict], str]:
    return lambda r: f"{r[f'minisd_{key}']:.1%} / {r[f'reference_{key}']:.1%}"


# The tables of results.md, by kind of row: (title, columns)
TABLES = {
    "versus": ("", _compared(
        "benchmark", "minisd", "diffusers", "ratio",
        ("minisd GFLOP/s (share of peak)", _flops), ("peak MiB minisd / diffusers", _mem))),
    "generation": ("## Text to MNIST, end to end: time per batch and quality", _compared(
        "generation", "minisd", "diffusers", "ratio",
        ("digit accuracy minisd / diffusers", _shares("accuracy")),
        ("confident minisd / diffusers", _shares("confident")),
        ("mean abs difference of the images",
         lambda r: f"{r['output_difference']:.3g}" if "output_difference" in r else ""))),
    "pixel": ("## Latent beside pixel diffusion (both minisd, equal U-Net widths)", _compared(
        "benchmark", "latent", "pixel", "ratio latent / pixel",
        ("GFLOP per step latent / pixel", _gflop), ("peak MiB latent / pixel", _mem))),
    "variant": ("## Changes tried on minisd's own step, each beside minisd's default", _compared(
        "benchmark", "with the change", "minisd default", "ratio")),
    "alone": ("## The course's own run times",
              _compared("run", "wall time", "", "", alone=True)),
}  # fmt: skip


def markdown(rows: list[dict]) -> str:
    """The results as Markdown tables (minisd beside diffusers, generation with its quality,
    latent beside pixel, the course's own run times), with the machine each row ran on."""
    out = [
        "# minisd beside diffusers",
        "",
        "Written by `make bench` (`python -m bench.run`); median of the repeats, min-max in",
        "brackets, the two implementations alternated. ratio = minisd / diffusers: below 1 is",
        "faster for times (s), above 1 for throughputs (img/s). GFLOP/s: FLOPs counted by",
        "PyTorch's FlopCounterMode over the median time, beside the CPU's nominal fp32 peak;",
        "peak MiB: the most memory live tensors held during one run (weights excluded).",
        "",
    ]
    # each machine once, numbered in the order rows first name it; each row says its number
    machines = list(dict.fromkeys(_machine_key(r) for r in rows))
    for i, m in enumerate(machines, 1):
        info = json.loads(m)
        out.append(
            f"- M{i}: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
            f"diffusers {info['diffusers']}; fp32 peak {info['nominal_peak_gflops'] or 0:.0f} "
            f"GFLOP/s nominal, {info['sgemm_gflops']:.0f} measured (2048^3 sgemm) when the run "
            f"started; GPU: {info['gpu'] or 'none'}"
        )
    rows = [r | {"ran_on": f"M{machines.index(_machine_key(r)) + 1}"} for r in rows]
    kinds = {kind: [] for kind in TABLES}
    for r in rows:
        label = r.get("reference_label", "diffusers")
        if r.get("reference") is None:
            kind = "alone"
        elif "minisd_accuracy" in r:
            kind = "generation"
        else:
            kind = {"pixel": "pixel", cases.VARIANT_LABEL: "variant"}.get(label, "versus")
        kinds[kind].append(r)
    for kind, (title, columns) in TABLES.items():
        if kinds[kind]:
            out += [""] + ([title, ""] if title else []) + _table(kinds[kind], columns)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(cases.GROUPS), default=None,
                   help="benchmark groups to run (default: all)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    p.add_argument("--quick", action="store_true", help="the small case of each group")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(cases.DTYPES), default=None,
                   help="the SD U-Net's precisions (default: fp32 and bf16 autocast)")  # fmt: skip
    p.add_argument("--out", default=str(HERE / "results"), help="results path without suffix")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not out.parent.is_dir():
        p.error(f"--out: no folder {out.parent}")
    info = machine()
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in argv)
    groups = args.only or list(cases.GROUPS)
    new = []
    for group in groups:
        kwargs = dict(cases.QUICK[group]) if args.quick else {}
        if group == "sd-unet" and args.dtypes:
            kwargs["dtypes"] = tuple(args.dtypes)
        for case in cases.GROUPS[group](**kwargs):
            peak = (info["nominal_peak_gflops"] or info["sgemm_gflops"]) * 1e9
            row = measure(case, args.repeats, peak_flops=peak)
            row |= {"group": group, "command": command, "machine": info}
            line = f"{row['name']}: minisd {_fmt(row['minisd'], row['unit'])}"
            if row["ratio"] is not None:
                line += (f", {row['reference_label']} {_fmt(row['reference'], row['unit'])}, "
                         f"ratio {row['ratio']:.3f}")  # fmt: skip
            print(line, flush=True)
            new.append(row)
    json_path = out.with_suffix(".json")
    rows = merge(json.loads(json_path.read_text()) if json_path.is_file() else [], new)
    write_json(json_path, rows)
    md = out.with_suffix(".md")
    atomic_write(md, lambda tmp: Path(tmp).write_text(markdown(rows)))
    print(f"wrote {json_path} and {md}")
    return rows


if __name__ == "__main__":
    main()
