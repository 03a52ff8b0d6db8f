"""Where the time goes: torch.profiler over a benchmark's first case, both implementations.

    python -m bench.profile train-text            # writes bench/profiles/train-text.txt
    python -m bench.profile sd-unet --quick --steps 1

Each profile opens with a table of operator families (convolutions, matrix multiplies,
attention, the optimiser, the rest) for both implementations: the time each spends there, the
FLOPs PyTorch counts there and the FLOP/s they reach, and the time outside any operator (Python,
module calls, dispatch). Then each implementation's top operators. The summaries are kept in the
repository beside the results, so a change that claims a speed-up can show which operators it
moved, and a target that is not met can show what stands in its way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from bench import cases
from bench.harness import sgemm_flops
from minisd.checkpoint import atomic_write

HERE = Path(__file__).resolve().parent

# Operator families, by aten name (profiler: "aten::mm", FLOP counter: "aten.mm.default").
MATMULS = ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul")
FAMILIES = ("convolution", "matrix multiply", "attention", "optimiser")
OTHER = "elementwise, norms, copies, other"


def family(op: str) -> str:
    """The family of an aten operator name ("aten::convolution_backward" -> "convolution")."""
    name = op.replace("aten::", "").replace("aten.", "").split(".")[0].lower()
    if "convolution" in name or name == "conv2d":
        return "convolution"
    if "scaled_dot_product" in name:
        return "attention"
    if name in MATMULS:
        return "matrix multiply"
    if "adam" in name or name.startswith("_foreach_"):
        return "optimiser"
    return OTHER


def _in_optimiser(event) -> bool:
    while event is not None:
        if event.name.startswith("Optimizer.step"):
            return True
        event = event.cpu_parent
    return False


def family_times(fn, steps: int = 3) -> tuple[dict[str, float], float]:
    """(seconds per call in each family's operators, self time; wall seconds per call). An
    operator called by the optimiser's step counts as the optimiser's, whatever it is."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - start) / steps
    times: dict[str, float] = {}
    for e in prof.events():
        if e.name.startswith("aten::"):
            fam = "optimiser" if _in_optimiser(e) else family(e.name)
            times[fam] = times.get(fam, 0.0) + e.self_cpu_time_total / 1e6 / steps
    return times, wall


def family_flops(fn) -> dict[str, int]:
    """FLOPs of one call in each family, as FlopCounterMode counts them (backward included)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    flops: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        fam = family(str(op))
        flops[fam] = flops.get(fam, 0) + n
    return flops


def family_table(runs: dict[str, object], steps: int = 3) -> str:
    """Both implementations side by side: ms per call, share of the wall time and GFLOP/s of
    each family, and the time spent outside operators."""
    cols = {}
    for impl, fn in runs.items():
        times, wall = family_times(fn, steps)
        cols[impl] = (times, wall, family_flops(fn))
    head = "| family | " + " | ".join(f"{i} ms | {i} share | {i} GFLOP/s" for i in runs) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(runs)]
    for fam in [*FAMILIES, OTHER, "outside operators", "wall time"]:
        cells = []
        for times, wall, flops in cols.values():
            if fam == "wall time":
                t = wall
            elif fam == "outside operators":
                t = max(wall - sum(times.values()), 0.0)
            else:
                t = times.get(fam, 0.0)
            rate = f"{flops[fam] / t / 1e9:.0f}" if flops.get(fam) and t > 0 else ""
            cells.append(f"{1000 * t:.1f} | {t / wall:.0%} | {rate}")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(fn, steps: int = 3, rows: int = 25) -> str:
    """The operator table (self CPU time, descending) of `steps` calls after one warm-up."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("group", choices=sorted(cases.GROUPS))
    p.add_argument("--quick", action="store_true", help="the group's small case")
    p.add_argument("--steps", type=int, default=3, help="profiled calls per implementation")
    p.add_argument("--out", default=None, help="default: bench/profiles/GROUP.txt")
    args = p.parse_args(argv)
    case = next(iter(cases.GROUPS[args.group](**(cases.QUICK[args.group] if args.quick else {}))))
    threads = torch.get_num_threads()
    text = [
        f"# {case.name}: {args.steps} calls after one warm-up",
        "",
        f"{threads} threads; a large matrix multiply (2048^3 sgemm) reaches "
        f"{sgemm_flops() / 1e9:.0f} GFLOP/s on this machine. Self time of each family's "
        "operators per call; GFLOP/s = the family's counted FLOPs over that time.",
        "",
        family_table(case.run, args.steps),
        "",
    ]
    for impl in case.run:
        text.append(f"## {impl}\n\n{summary(case.run[impl], args.steps)}\n")
    out = Path(args.out) if args.out else HERE / "profiles" / f"{args.group}.txt"
    atomic_write(out, lambda tmp: Path(tmp).write_text("\n".join(text)))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
