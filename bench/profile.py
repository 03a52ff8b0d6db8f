"""Where the time goes: torch.profiler over a benchmark's first case, both implementations.

    python -m bench.profile train-text            # writes bench/profiles/train-text.txt
    python -m bench.profile sd-unet --quick --steps 1

The summaries are kept in the repository beside the results, so a change that claims a speed-up
can show which operators it moved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from bench import cases
from bench.harness import IMPLEMENTATIONS
from minisd.checkpoint import atomic_write

HERE = Path(__file__).resolve().parent


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
    text = [f"# {case.name}: {args.steps} calls after one warm-up\n"]
    for impl in IMPLEMENTATIONS:
        text.append(f"## {impl}\n\n{summary(case.run[impl], args.steps)}\n")
    out = Path(args.out) if args.out else HERE / "profiles" / f"{args.group}.txt"
    atomic_write(out, lambda tmp: Path(tmp).write_text("\n".join(text)))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
