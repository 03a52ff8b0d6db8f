"""Timing two implementations fairly: alternated, warmed up, median and spread, FLOPs and memory.

A `Case` holds one callable per implementation ("minisd", "reference") that does one unit of work
(a forward pass, a training step) on identical weights and inputs. `measure` warms each up, then
runs them in turn `repeats` times (minisd, reference, minisd, ...), so a machine that slows down
during the run slows both alike, and reports the median of each with its spread (min and max).
The reference is diffusers unless the case names another (`reference_label`: the pixel model
beside the latent one); a case with only "minisd" is a plain timing (a notebook, the test suite).
A case's `quality` scores the last output of each implementation (accuracy of generated digits),
so speed and quality land in one row.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

IMPLEMENTATIONS = ("minisd", "reference")


@dataclass
class Case:
    """One benchmark: what it measures and how to run each implementation once."""

    name: str
    run: dict[str, Callable[[], object]]  # implementation -> one unit of work
    unit: str = "s"  # "s" (time per unit, lower is better) or "img/s" (higher is better)
    images: int = 1  # images per unit of work, for throughputs
    note: str = ""
    flops: bool = True  # count the FLOPs of one unit (FlopCounterMode)
    memory: bool = True  # track the peak of live tensor bytes during one unit
    extra: dict = field(default_factory=dict)  # more columns for the row (parameter counts, ...)
    reference_label: str = "diffusers"  # what the reference column is
    quality: Callable[[object], dict] | None = None  # scores of one output, e.g. accuracy
    repeats: int | None = None  # fewer repeats than the run's for a long case (DDPM-1000)
    warmup: int | None = None  # fewer warm-up runs (a 1000-step sampler warms itself up)
    compare: bool = False  # record the mean |minisd - reference| of the last outputs

    def __post_init__(self) -> None:
        if set(self.run) not in (set(IMPLEMENTATIONS), {"minisd"}):
            raise ValueError(
                f"a case runs {IMPLEMENTATIONS} (or minisd alone), got {sorted(self.run)}"
            )
        if self.repeats is not None and self.repeats < 1:
            raise ValueError(f"a case's repeats must be at least 1, got {self.repeats}")
        if self.unit not in ("s", "img/s"):
            raise ValueError(f"unit must be 's' or 'img/s', got {self.unit!r}")


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, as PyTorch's FlopCounterMode counts them (matmuls, convolutions,
    attention; 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_live_bytes(fn: Callable[[], object]) -> int:
    """The peak of the bytes held by tensors created during one call (weights excluded): the
    activation memory, the same way for any implementation (pipeline's dispatch counter)."""
    from minisd.pipeline import _LiveBytes

    live = _LiveBytes()
    with live:
        fn()
    return live.peak


def _seconds(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(case: Case, repeats: int = 3, warmup: int = 1, peak_flops: float | None = None) -> dict:
    """One result row: median per implementation, ratio minisd/reference, spread, FLOP/s."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    repeats = case.repeats or repeats
    warmup = warmup if case.warmup is None else case.warmup
    impls = [i for i in IMPLEMENTATIONS if i in case.run]
    for _ in range(warmup):
        for impl in impls:
            case.run[impl]()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    last: dict[str, object] = {}
    for _ in range(repeats):
        for impl in impls:
            times[impl].append(_seconds(lambda impl=impl: last.__setitem__(impl, case.run[impl]())))
    row: dict = {"name": case.name, "unit": case.unit, "reference_label": case.reference_label,
                 "better": "lower" if case.unit == "s" else "higher"}  # fmt: skip
    for impl, ts in times.items():
        values = ts if case.unit == "s" else [case.images / t for t in ts]
        row[impl] = statistics.median(values)
        row[f"{impl}_spread"] = [min(values), max(values)]
        row[f"{impl}_seconds"] = statistics.median(ts)
    row["ratio"] = row["minisd"] / row["reference"] if "reference" in row else None
    row["repeats"] = repeats
    if case.compare and "reference" in last:
        diff = (last["minisd"].float() - last["reference"].float()).abs().mean()
        row["output_difference"] = diff.item()
    if case.quality is not None:
        for impl in impls:
            row |= {f"{impl}_{k}": v for k, v in case.quality(last[impl]).items()}
    if case.flops:
        for impl in impls:
            flops = count_flops(case.run[impl])
            row[f"{impl}_gflop"] = flops / 1e9
            row[f"{impl}_gflops_per_s"] = flops / row[f"{impl}_seconds"] / 1e9
        if peak_flops:
            row["minisd_share_of_peak"] = row["minisd_gflops_per_s"] * 1e9 / peak_flops
    if case.memory:
        for impl in impls:
            row[f"{impl}_peak_mib"] = peak_live_bytes(case.run[impl]) / 2**20
    if case.note:
        row["note"] = case.note
    return row | case.extra


# ----- the machine ---------------------------------------------------------------------------
def nominal_peak_flops(threads: int) -> float | None:
    """fp32 FLOP/s the CPU's vector units can reach: cores x clock x FLOPs per cycle (AVX-512
    with FMA: 64, AVX2 with FMA: 32, two FMA units each), None where /proc/cpuinfo says nothing."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return None
    text = info.read_text()
    mhz = [float(ln.split(":")[1]) for ln in text.splitlines() if ln.startswith("cpu MHz")]
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split()
    if not mhz:
        return None
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= set(flags) else 8
    return threads * max(mhz) * 1e6 * per_cycle


def sgemm_flops(n: int = 2048, seconds: float = 1.0) -> float:
    """fp32 FLOP/s of a large matrix multiply on this machine: the attainable peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    return 2 * n**3 * calls / (time.perf_counter() - start)


def machine() -> dict:
    from minisd.course import hardware

    threads = torch.get_num_threads()
    info = hardware() | {
        "nominal_peak_gflops": (nominal_peak_flops(threads) or 0) / 1e9 or None,
        "sgemm_gflops": sgemm_flops() / 1e9,
        "cpu_bf16": torch.backends.mkldnn.is_available() and cpu_has("avx512_bf16"),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


def cpu_has(flag: str) -> bool:
    info = Path("/proc/cpuinfo")
    return info.is_file() and f" {flag}" in info.read_text()
