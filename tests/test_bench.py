"""The benchmark harness (bench/): fair alternation, the ratio's direction, rows and tables."""

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ sits beside minisd/

from bench import cases, run  # noqa: E402
from bench.harness import IMPLEMENTATIONS, Case, measure  # noqa: E402


def sleeper(seconds):
    return lambda: time.sleep(seconds)


def test_times_and_throughputs_are_compared_in_their_own_direction():
    fast, slow = sleeper(0.01), sleeper(0.03)
    kw = dict(flops=False, memory=False)
    timed = measure(Case("t", {"minisd": fast, "reference": slow}, **kw), repeats=3, warmup=0)
    assert timed["better"] == "lower" and 0.2 < timed["ratio"] < 0.6  # minisd takes a third
    rate = measure(Case("r", {"minisd": fast, "reference": slow}, unit="img/s", images=8, **kw),
                   repeats=3, warmup=0)  # fmt: skip
    assert rate["better"] == "higher" and 1.7 < rate["ratio"] < 5  # three times the images/s
    assert 8 / 0.04 < rate["minisd"] < 8 / 0.01
    lo, hi = rate["minisd_spread"]
    assert lo <= rate["minisd"] <= hi


def test_the_implementations_are_alternated():
    order = []
    case = Case("order", {i: (lambda i=i: order.append(i)) for i in IMPLEMENTATIONS},
                flops=False, memory=False)  # fmt: skip
    measure(case, repeats=3, warmup=1)
    assert order == list(IMPLEMENTATIONS) * 4


def test_a_case_needs_both_implementations_and_a_known_unit():
    with pytest.raises(ValueError, match="a case runs"):
        Case("x", {"minisd": sleeper(0)})
    with pytest.raises(ValueError, match="unit"):
        Case("x", {"minisd": sleeper(0), "reference": sleeper(0)}, unit="ms")
    with pytest.raises(ValueError, match="repeats"):
        measure(Case("x", {"minisd": sleeper(0), "reference": sleeper(0)}), repeats=0)


def test_a_real_training_case_counts_flops_and_memory_and_makes_a_table(tmp_path):
    row = measure(cases.tiny_case(), repeats=1, peak_flops=1e11)
    assert row["minisd_gflop"] > 0 and row["reference_gflop"] > 0
    assert abs(row["minisd_gflop"] / row["reference_gflop"] - 1) < 0.05  # the same network
    assert row["minisd_peak_mib"] > 0 and row["reference_peak_mib"] > 0
    info = {"cpu": "test", "threads": 1, "torch": "x", "diffusers": "y", "gpu": None}
    row |= {"machine": info | {"nominal_peak_gflops": 100.0, "sgemm_gflops": 80.0}}
    table = run.markdown([row])
    assert row["name"] in table and "| benchmark | minisd | diffusers | ratio |" in table
    assert f"{row['ratio']:.3f}" in table and "test, 1 threads" in table
    path = tmp_path / "results.json"
    run.write_json(path, [row])
    assert json.loads(path.read_text())[0]["name"] == row["name"]


def test_a_partial_run_replaces_only_its_rows():
    old = [{"name": "a", "v": 1}, {"name": "b", "v": 1}]
    assert run.merge(old, [{"name": "b", "v": 2}, {"name": "c", "v": 2}]) == [
        {"name": "a", "v": 1}, {"name": "b", "v": 2}, {"name": "c", "v": 2}
    ]  # fmt: skip


def test_the_plain_mnist_reference_has_the_presets_widths_and_attention_placement():
    from minisd.unet import MNIST

    ref = cases._diffusers_mnist_unet(MNIST)
    assert ref.config.block_out_channels == (32, 64, 64) and ref.config.layers_per_block == 2
    assert ref.config.down_block_types == ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    assert ref.config.up_block_types == ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
