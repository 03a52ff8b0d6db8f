"""The benchmark harness (bench/): fair alternation, the ratio's direction, rows and tables."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

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


def test_a_case_needs_minisd_and_a_known_unit():
    with pytest.raises(ValueError, match="a case runs"):
        Case("x", {"reference": sleeper(0)})
    with pytest.raises(ValueError, match="a case runs"):
        Case("x", {"minisd": sleeper(0), "diffusers": sleeper(0)})
    with pytest.raises(ValueError, match="repeats"):
        Case("x", {"minisd": sleeper(0)}, repeats=0)
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


def test_the_compiled_case_compiles_both_sides_and_reports_their_compile_time(monkeypatch):
    compiled = []
    real_compile = torch.compile

    def compile_(module):  # aot_eager: dynamo without inductor's C++ build, so this is quick
        compiled.append(type(module).__name__)
        return real_compile(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_)
    case = cases.tiny_case(compiled=True)
    assert compiled == ["UNetModel", "UNet2DConditionModel"]
    assert case.name.endswith("torch.compile on both") and not case.flops and not case.memory
    assert case.extra["minisd_compile_s"] > 0 and case.extra["reference_compile_s"] > 0
    assert "compiling included" in case.note
    row = measure(case, repeats=1)
    assert row["minisd"] > 0 and row["reference"] > 0


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


def test_quality_scores_the_last_output_and_a_case_can_ask_for_fewer_repeats():
    calls = {"minisd": 0, "reference": 0}

    def counted(impl):
        def run():
            calls[impl] += 1
            return calls[impl]  # the output: how many times this ran

        return run

    case = Case("q", {i: counted(i) for i in IMPLEMENTATIONS}, flops=False, memory=False,
                quality=lambda out: {"calls": out}, repeats=2)  # fmt: skip
    row = measure(case, repeats=5, warmup=1)
    assert row["repeats"] == 2 and calls == {"minisd": 3, "reference": 3}
    assert row["minisd_calls"] == 3 and row["reference_calls"] == 3  # scored after the last run
    case.warmup = 0
    measure(case, repeats=5, warmup=1)
    assert calls == {"minisd": 5, "reference": 5}  # no warm-up: two more runs each


def test_a_minisd_only_case_and_the_other_tables():
    kw = dict(flops=False, memory=False)
    alone = measure(Case("notebook 01", {"minisd": sleeper(0.001)}, **kw), repeats=1, warmup=0)
    assert alone["ratio"] is None and "reference" not in alone
    pixel = measure(Case("latent vs pixel", {"minisd": sleeper(0.001), "reference": sleeper(0.002)},
                         reference_label="pixel", unit="img/s", **kw), repeats=1)  # fmt: skip
    images = {"minisd": lambda: torch.zeros(2, 3), "reference": lambda: torch.full((2, 3), 0.5)}
    gen = measure(Case("text to MNIST", images, compare=True,
                       quality=lambda _: {"accuracy": 0.5, "confident": 0.25}, **kw),
                  repeats=1)  # fmt: skip
    assert gen["output_difference"] == 0.5
    info = {"cpu": "test", "threads": 1, "torch": "x", "diffusers": "y", "gpu": None,
            "nominal_peak_gflops": 100.0, "sgemm_gflops": 80.0}  # fmt: skip
    table = run.markdown([r | {"machine": info} for r in (alone, pixel, gen)])
    assert "## The course's own run times" in table and "| notebook 01 |" in table
    assert "| benchmark | latent | pixel |" in table and "| latent vs pixel |" in table
    assert "## Text to MNIST" in table and "50.0% / 50.0%" in table and "25.0% / 25.0%" in table
    assert "| benchmark | minisd | diffusers |" not in table  # no diffusers rows, no such table


def test_the_diffusers_schedulers_take_the_same_timesteps_as_our_samplers():
    from minisd.sampling import SamplerConfig
    from minisd.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_dict({"kind": "linear", "num_timesteps": 1000})
    for sampler, steps in cases.GENERATION_SAMPLERS:
        config = SamplerConfig(sampler, steps)
        ref = cases._diffusers_scheduler(config, schedule)
        ref.set_timesteps(steps)
        assert ref.timesteps.tolist() == config.timesteps(1000).tolist(), sampler


def test_the_course_group_times_each_notebook_and_reports_a_failed_command(tmp_path):
    found = list(cases.course_times(notebooks=("01",), make_test=False))
    assert [c.name for c in found] == ["notebook 01_forward_noising, quick profile"]
    assert set(found[0].run) == {"minisd"} and found[0].repeats == 1
    assert [c.name for c in cases.course_times(notebooks=(), make_test=True)] == [
        "make test (lint, unit tests, every notebook under strict nbval, the browser tests)"
    ]
    with pytest.raises(RuntimeError, match=r"failed \(3\):\n.*boom"):
        cases._run([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path)


def test_the_profile_sorts_operators_into_families_and_finds_the_optimisers_time():
    from bench import profile

    assert profile.family("aten::convolution_backward") == "convolution"
    assert profile.family("aten.convolution.default") == "convolution"
    assert profile.family("aten::addmm") == profile.family("aten.mm.default") == "matrix multiply"
    assert profile.family("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert profile.family("aten::_fused_adamw_") == "optimiser"
    assert profile.family("aten::group_norm") == profile.OTHER
    runs = cases.tiny_case().run
    for impl, fn in runs.items():
        times, wall = profile.family_times(fn, steps=1)
        # diffusers' side steps torch's plain AdamW: its adds and multiplies are the optimiser's
        assert times["optimiser"] > 0, impl
        assert times["convolution"] > 0 and sum(times.values()) <= wall * 1.05
        flops = profile.family_flops(fn)
        assert flops["convolution"] > 0 and flops["matrix multiply"] > 0
    table = profile.family_table(runs, steps=1)
    assert table.count("\n") == 2 + len(profile.FAMILIES) + 3 - 1
    assert "| outside operators |" in table and "| wall time |" in table


def test_variants_time_a_change_beside_minisds_default_in_their_own_table(monkeypatch):
    import itertools

    monkeypatch.setattr(cases, "SMALL_TEXT", cases.TINY_TEXT)  # the same step, in a second
    found = list(itertools.islice(cases.minisd_variants(batch=2), 2))  # not the SD-size case
    assert [c.name.split(", ")[-1] for c in found] == [
        "channels_last model and batch", "bf16 autocast"]  # fmt: skip
    rows = []
    for case in found:
        assert case.reference_label == cases.VARIANT_LABEL and case.unit == "img/s"
        rows.append(measure(case, repeats=1))
    info = {"cpu": "test", "threads": 1, "torch": "x", "diffusers": "y", "gpu": None}
    rows = [r | {"machine": info | {"nominal_peak_gflops": 1.0, "sgemm_gflops": 1.0}} for r in rows]
    table = run.markdown(rows)
    assert "## Changes tried on minisd's own step" in table
    assert "| benchmark | with the change | minisd default | ratio | note | ran on |" in table
    assert table.count("- M1: test, 1 threads") == 1 and table.count(" | M1 |") == 2
    assert "| benchmark | minisd | diffusers |" not in table
