"""Evaluation: seeded batched sampling, scores beside a baseline, the recognisability bar."""

import dataclasses
import json

import pytest
import torch

from minisd import data, evaluation
from minisd.classifier import MnistClassifier
from minisd.metrics import SampleReport
from minisd.pretrained import DiffusionModel
from minisd.schedule import NoiseSchedule
from minisd.unet import TINY, UNetModel

needs_mnist = pytest.mark.skipif(
    not (data.data_root() / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists(),
    reason="real MNIST not in the data folder (set MINISD_DATA, as .ci/run does)",
)


def tiny_model(T=20):
    torch.manual_seed(0)
    unet = UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return DiffusionModel(unet, NoiseSchedule("linear", T), "eps", {})


def test_generate_is_seeded_batched_and_in_range():
    model = tiny_model()
    setting = model.sampler_config("ddim", 5)
    assert setting.clip_x0 == 1.0  # a pixel model clips x0 to the data range
    a = evaluation.generate(model, 5, setting, seed=1, batch_size=2)
    b = evaluation.generate(model, 5, setting, seed=1, batch_size=2)
    assert a.shape == (5, 1, 28, 28) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, evaluation.generate(model, 5, setting, seed=2, batch_size=2))
    ddpm = evaluation.generate(model, 2, model.sampler_config("ddpm", 20), seed=0)
    assert ddpm.shape == (2, 1, 28, 28)
    assert evaluation.generate(tiny_model(T=50), 2, seed=0).shape == (2, 1, 28, 28)  # DDIM-50


def test_generate_bad_settings():
    model = tiny_model()
    with pytest.raises(ValueError, match="DDPM runs all 20 steps"):
        evaluation.generate(model, 1, model.sampler_config("ddpm", 10))
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of ddim, ddpm"):
        model.sampler_config("euler", 10)
    with pytest.raises(ValueError, match="unconditional"):
        evaluation.generate(model, 1, cond=3)


def report(confident, fractions):
    return SampleReport(10, 10, 1.0, 0.0, 0.0, 10, confident, tuple(fractions))


def test_recognisability_bar():
    assert evaluation.meets_recognisability_bar(report(0.95, [0.1] * 10))[0]
    ok, why = evaluation.meets_recognisability_bar(report(0.85, [0.1] * 10))
    assert not ok and "confident 85.0%" in why
    skewed = [0.2, 0.0] + [0.1] * 8
    ok, why = evaluation.meets_recognisability_bar(report(0.99, skewed))
    assert not ok and "classes 0.0%..20.0%" in why


def test_report_round_trips_through_json_form():
    r = report(0.9, [0.1] * 10)
    assert evaluation.report_from_dict(dataclasses.asdict(r)) == r
    assert evaluation.report_from_dict(json.loads(json.dumps(dataclasses.asdict(r)))) == r


@needs_mnist
def test_score_reports_samples_and_baseline_at_the_same_n():
    from minisd.classifier import classify

    classifier = MnistClassifier().eval()  # untrained is enough to test the plumbing
    test_images, _ = data.load_mnist(train=False, download=False, limit=200)
    reference = classify(classifier, test_images[100:])[0]
    result = evaluation.score(
        tiny_model(),
        20,
        tiny_model().sampler_config("ddim", 3),
        classifier=classifier,
        reference=reference,
        progress=False,
    )
    assert result["n"] == 20 and result["report"]["n"] == 20 and result["baseline"]["n"] == 20
    assert result["baseline"]["label"] == "real test" and result["samples"].shape == (20, 1, 28, 28)
    assert result["seconds_per_sample"] > 0


@needs_mnist
def test_evaluate_and_compare_samplers_commands(tmp_path, monkeypatch):
    from minisd import classifier, cli, metrics
    from minisd.checkpoint import load_json, load_tensors, save_json
    from minisd.pretrained import save_diffusion

    # features of 500 real digits stand in for the 60k train reference, to keep the test fast
    small_reference = classifier.classify(
        classifier.load_classifier(), data.load_mnist(train=True, download=False, limit=500)[0]
    )[0]
    monkeypatch.setattr(evaluation, "reference_features", lambda clf: small_reference)
    monkeypatch.setattr(metrics, "reference_features", lambda clf: small_reference)
    model = tiny_model(T=20)
    ckpt = save_diffusion(tmp_path / "m.safetensors", model.unet, model.schedule, "eps")
    save_json(ckpt.with_suffix(".json"), {"steps": 1})
    cli.main(
        ["evaluate", "--checkpoint", str(ckpt), "--n", "20", "--steps", "2", "--write-sidecar"]
    )
    sidecar = load_json(ckpt.with_suffix(".json"))
    assert sidecar["steps"] == 1 and sidecar["metrics"]["sampler"] == "DDIM-2"
    assert sidecar["metrics"]["samples"]["n"] == sidecar["metrics"]["real_baseline"]["n"] == 20
    assert sidecar["metrics"]["meets_bar"] is False  # an untrained model draws no digits
    out = tmp_path / "cmp.json"
    cli.main(["compare-samplers", "--checkpoint", str(ckpt), "--n", "8", "--ddim-steps", "2", "4",
              "--ddpm", "--keep", "3", "--out", str(out)])  # fmt: skip
    results = load_json(out)
    assert [r["name"] for r in results["rows"]] == ["DDIM-2", "DDIM-4", "DDPM-20"]
    assert "samples" not in results["rows"][0] and results["n"] == 8
    grids, _ = load_tensors(out.with_suffix(".safetensors"))
    assert set(grids) == {"DDIM-2", "DDIM-4", "DDPM-20"} and grids["DDPM-20"].shape == (
        3,
        1,
        28,
        28,
    )
