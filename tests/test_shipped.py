"""Shipped models: each sidecar is tied to its weights and records a measurement against its bar.

The full measurement (1,000 DDIM-50 samples) takes minutes and is stored in the sidecar by
`python -m minisd evaluate ... --write-sidecar`, with the SHA-256 of the weights it measured. Here
the hashes are re-computed, the stored numbers are re-checked against the bar, and a live check
draws seeded samples from the files: enough that its bar sits a few points under the stored
measurement, and that weights perturbed by 5% fail it.
"""

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch

from minisd.checkpoint import file_sha256, load_json, load_tensors
from minisd.classifier import DEFAULT_CLASSIFIER, classify, load_classifier
from minisd.data import data_root, load_mnist
from minisd.evaluation import (
    generate,
    meets_recognisability_bar,
    report_from_dict,
)
from minisd.latent import decode_images, encode_images
from minisd.metrics import confident_fraction
from minisd.pretrained import CHECKPOINTS, DiffusionModel, load_autoencoder, load_diffusion
from minisd.sampling import SamplerConfig
from minisd.vae import psnr

ROOT = CHECKPOINTS.parent.parent  # paths in sidecars and results are relative to the repo
RESULTS = CHECKPOINTS.parent / "results"
DDPM = CHECKPOINTS / "ddpm_mnist.safetensors"
LDM = CHECKPOINTS / "ldm_mnist.safetensors"
VAE_F4 = CHECKPOINTS / "vae_mnist_f4.safetensors"
VAE_F8 = CHECKPOINTS / "vae_mnist_f8.safetensors"
SAMPLERS = RESULTS / "ddpm_mnist_samplers.json"
LATENT_VS_PIXEL = RESULTS / "latent_vs_pixel.json"


def needs(path: Path):
    return pytest.mark.skipif(not path.is_file(), reason=f"no shipped {path.name}")


def measured(checkpoint: Path, command: str) -> tuple[dict, dict]:
    """A shipped model's sidecar and the metrics `python -m minisd COMMAND` stored in it."""
    sidecar = load_json(checkpoint.with_suffix(".json"))
    metrics = sidecar["metrics"]
    prefix = f"python -m minisd {command} --checkpoint data/checkpoints/{checkpoint.name}"
    assert metrics["command"].startswith(prefix)
    return sidecar, metrics


# ----- every sidecar and results file names the exact bytes it describes --------------------


@pytest.mark.parametrize("weights", sorted(CHECKPOINTS.glob("*.safetensors")), ids=lambda p: p.stem)
def test_sidecar_records_the_sha256_of_its_weights(weights):
    sidecar, sha = load_json(weights.with_suffix(".json")), file_sha256(weights)
    assert sidecar["weights_sha256"] == sha, f"{weights.name} is not the file its sidecar describes"
    if "metrics" in sidecar:  # measured on these bytes, not on an earlier export
        assert sidecar["metrics"]["weights_sha256"] == sha


def test_every_shipped_sidecar_has_its_weights():
    sidecars = {p.stem for p in CHECKPOINTS.glob("*.json")}
    assert sidecars == {p.stem for p in CHECKPOINTS.glob("*.safetensors")}


@pytest.mark.parametrize(
    "results",
    sorted(p for p in RESULTS.glob("*.json") if p.with_suffix(".safetensors").is_file()),
    ids=lambda p: p.stem,
)
def test_results_record_the_sha256_of_their_samples_and_of_what_they_measured(results):
    r = load_json(results)
    assert r["samples_sha256"] == file_sha256(results.with_suffix(".safetensors"))
    inputs = [k.removesuffix("_sha256") for k in r if k.endswith("_sha256")]
    inputs.remove("samples")
    assert inputs, "a results file names the shipped file it measured (e.g. checkpoint, vae)"
    for key in inputs:  # "checkpoint": path and "checkpoint_sha256": its hash, and so on
        assert r[f"{key}_sha256"] == file_sha256(ROOT / r[key]), f"{r[key]} changed since"


def test_sidecar_writers_tie_sidecars_metrics_and_results_to_the_bytes(tmp_path):
    from minisd.evaluation import save_results
    from minisd.pretrained import save_diffusion, write_metrics, write_sidecar
    from minisd.schedule import NoiseSchedule
    from minisd.unet import TINY, UNetModel

    unet, schedule = UNetModel(TINY), NoiseSchedule("linear", 10)
    path = save_diffusion(tmp_path / "m.safetensors", unet, schedule, "eps")
    write_sidecar(path, {"steps": 1})  # as `train --export` does
    sha = load_diffusion(path).metadata["weights_sha256"]
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()  # the whole file, not a header
    assert sha == load_json(path.with_suffix(".json"))["weights_sha256"]
    write_metrics(path, {"n": 2}, sha)  # as `evaluate --write-sidecar` does
    sidecar = load_json(path.with_suffix(".json"))
    assert sidecar["steps"] == 1 and sidecar["metrics"] == {"n": 2, "weights_sha256": sha}
    torch.nn.init.ones_(unet.out[-1].weight)  # re-exported while it was being measured
    save_diffusion(path, unet, schedule, "eps")
    with pytest.raises(ValueError, match="changed while it was being measured"):
        write_metrics(path, {"n": 2}, sha)
    out, kept = save_results(tmp_path / "r.json", {"n": 2}, {"DDIM-2": torch.zeros(2, 1, 4, 4)})
    assert load_json(out) == {"n": 2, "samples_sha256": file_sha256(kept)}


# ----- the stored measurements meet their bars ----------------------------------------------


@needs(DDPM)
def test_shipped_ddpm_sidecar_records_a_measurement_against_the_bar():
    sidecar, metrics = measured(DDPM, "evaluate")
    report = report_from_dict(metrics["samples"])
    ok, why = meets_recognisability_bar(report)
    assert (metrics["meets_bar"], metrics["bar"]) == (ok, why)  # the verdict follows the numbers
    assert ok, why  # issue 3's bar: >= 90% confident of 1,000 DDIM-50 samples, classes 5-15%
    assert report.n >= 1000 and metrics["sampler"] == "DDIM-50"
    assert metrics["real_baseline"]["n"] == report.n  # FID beside its baseline at the same n
    assert report.mnist_fid > metrics["real_baseline"]["mnist_fid"]
    assert all(c.startswith("python -m minisd train") for c in sidecar["commands"])
    assert sidecar["steps"] > 0 and sidecar["weights"] == "EMA"


@pytest.mark.parametrize(
    "checkpoint, latent_shape",
    [(VAE_F4, (4, 8, 8)), (VAE_F8, (4, 4, 4))],  # 32x32-padded digits over f=4 and f=8
    ids=["f4", "f8"],
)
def test_shipped_autoencoder_sidecar_meets_its_bar(checkpoint, latent_shape):
    from minisd.evaluation import ACCURACY_BAR, PSNR_BAR

    if not checkpoint.is_file():
        pytest.skip(f"no {checkpoint.name}")
    sidecar, m = measured(checkpoint, "evaluate-vae")
    assert m["n"] == 10_000  # every MNIST test digit
    assert m["psnr_db"] >= PSNR_BAR and m["accuracy_on_reconstructions"] >= ACCURACY_BAR
    assert m["meets_bar"] and m["bar"].startswith(f"PSNR >= {PSNR_BAR} dB")
    assert m["latent_values"] == torch.Size(latent_shape).numel() and m["pixel_values"] == 784
    assert abs(m["scaled_latent_std"] - 1) < 0.05  # the stored scale factor gives unit latents
    assert sidecar["scale_factor"]["value"] == sidecar["autoencoder_config"]["scale_factor"]


needs_mnist = pytest.mark.skipif(
    not (data_root() / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists(),
    reason="real MNIST not in the data folder (set MINISD_DATA, as .ci/run does)",
)


@needs(VAE_F4)
@needs_mnist
def test_shipped_autoencoder_round_trips_test_digits_and_its_scale():
    vae = load_autoencoder(VAE_F4)
    digits, _ = load_mnist(train=False, limit=64)
    latents = encode_images(vae, digits)
    assert latents.shape == (64, 4, 8, 8)
    assert 0.7 < latents.std().item() < 1.4  # the stored scale factor gives unit-ish latents
    recon = decode_images(vae, latents, image_size=28).clamp(-1, 1)
    assert psnr(recon, digits) >= 25.0


@needs(LDM)
def test_shipped_latent_ddpm_records_its_measurement_and_autoencoder():
    sidecar, metrics = measured(LDM, "evaluate")
    report = report_from_dict(metrics["samples"])
    assert (metrics["meets_bar"], metrics["bar"]) == meets_recognisability_bar(report)
    assert report.n >= 1000 and metrics["real_baseline"]["n"] == report.n
    assert sidecar["latent_vae"] == "data/checkpoints/vae_mnist_f4.safetensors"
    assert all("--latent-vae" in c for c in sidecar["commands"])


@needs(SAMPLERS)
def test_sampler_comparison_measures_each_sampler_beside_the_baseline_and_keeps_samples():
    results = load_json(SAMPLERS)
    n = results["n"]
    assert results["command"].startswith(
        "python -m minisd compare-samplers --checkpoint data/checkpoints/ddpm_mnist.safetensors"
    )
    assert f"--n {n} " in results["command"] and n >= 200
    names = ["DDIM-10", "DDIM-20", "DDIM-50", "DDIM-100", "DDPM-1000"]
    assert [r["name"] for r in results["rows"]] == names
    for row in results["rows"]:
        report, baseline = report_from_dict(row["report"]), report_from_dict(row["baseline"])
        assert SamplerConfig(**row["setting"]).name == report.label == row["name"]
        assert row["n"] == report.n == baseline.n == n and baseline.label == "real test"
        assert 0 < report.confident_fraction <= 1 and report.mnist_fid > 0 < baseline.mnist_fid
        assert len(report.class_fractions) == 10 and abs(sum(report.class_fractions) - 1) < 1e-4
        assert report.kid_subset_size == min(1000, n) and row["seconds_per_sample"] > 0
    kept, _ = load_tensors(SAMPLERS.with_suffix(".safetensors"))
    assert set(kept) == set(names)
    assert all(v.shape == (16, 1, 28, 28) and v.abs().max() <= 1 for v in kept.values())


@needs(LATENT_VS_PIXEL)
def test_latent_vs_pixel_results_compare_equal_training_time_and_keep_samples():
    results = load_json(LATENT_VS_PIXEL)
    assert results["command"].startswith("python -m minisd latent-vs-pixel --vae")
    rows = {r["space"]: r for r in results["rows"]}
    assert set(rows) == {"pixel", "latent", "unscaled"}
    seconds = [r["train_seconds"] for r in rows.values()]
    assert max(seconds) - min(seconds) < 0.05 * max(seconds)  # equal training time
    assert rows["pixel"]["values_per_sample"] == 784 and rows["latent"]["values_per_sample"] == 256
    assert abs(rows["latent"]["data_std"] - 1) < 0.1  # scaled latents; unscaled ones are not
    assert rows["unscaled"]["data_std"] > 1.5
    assert all(r["report"]["n"] == results["n"] == results["baseline"]["n"] for r in rows.values())
    kept, _ = load_tensors(LATENT_VS_PIXEL.with_suffix(".safetensors"))
    assert {k: tuple(v.shape[1:]) for k, v in kept.items()} == dict.fromkeys(rows, (1, 28, 28))


# ----- live: the weights still sample, and 5% weight noise would be caught ------------------


@dataclass(frozen=True)
class LiveCheck:
    """n seeded samples CI can afford, and the confident fraction they must reach."""

    checkpoint: Path
    sample_shape: tuple[int, int, int] | None  # what the sampler draws: None for pixels
    n: int
    setting: tuple[str, int]  # sampler and steps; the model supplies the rest (clipping, ...)
    bar: float


# The live checks' pass bars, a few points under the stored 1,000 DDIM-50 measurements (pixel
# 91.6%, latent 89.0%), each ~5 samples under what the real weights draw here (float results
# differ slightly between CPUs). Seed 0 on a 2-core AMD EPYC, real vs 5%-perturbed weights
# (`perturb_` on the U-Net, seeds 0, 1, 2 of additive / multiplicative noise):
#   pixel, 400 DDIM-20: real 89.5%; perturbed 86.0 87.0 86.5 / 84.0 85.8 90.8% (the last one
#     passes: the golden samples below catch it);
#   latent, 1,000 DDIM-50 (the sidecar's own draw): real 89.0%; perturbed 86.2 86.3 87.9 /
#     87.4 81.0 89.0% (the last one passes; no fraction-based bar can catch it).
LIVE_SEED = 0  # the seed `evaluate` and `compare-samplers` measured with
LIVE_CHECKS = {
    "pixel": LiveCheck(DDPM, None, 400, ("ddim", 20), bar=0.885),
    "latent": LiveCheck(LDM, (4, 8, 8), 1000, ("ddim", 50), bar=0.885),
}
# Redrawn with the seed they were kept with, the pixel DDPM's kept DDIM-20 samples match to 1e-7
# (mean |difference|); 1% weight noise already moves them by 0.006, 5% (all six) by 0.046-0.15.
GOLDEN_SETTING, GOLDEN_TOLERANCE = ("ddim", 20), 0.003
GOLDEN_NAME = "DDIM-20"


def perturb_(
    module: torch.nn.Module, kind: str = "additive", relative: float = 0.05, seed: int = 0
) -> None:
    """5% weight noise on every floating parameter, from a seeded generator (z ~ N(0, 1)).

    additive: p <- p + relative * std(p) * z, std over the tensor (|p| for a single entry);
    multiplicative: p <- p * (1 + relative * z).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.is_floating_point():
                continue
            z = torch.randn(p.shape, generator=generator)
            if kind == "additive":
                p.add_(relative * (p.std() if p.numel() > 1 else p.abs()) * z)
            else:
                p.mul_(1 + relative * z)


def live_draw(model: DiffusionModel, check: LiveCheck) -> tuple[torch.Tensor, torch.Tensor]:
    """The live check's samples and their class probabilities."""
    samples = generate(model, check.n, model.sampler_config(*check.setting), seed=LIVE_SEED)
    return samples, classify(load_classifier(), samples)[1]


@cache
def kept_ddpm_samples() -> torch.Tensor:
    results = load_json(SAMPLERS)
    assert "--seed" not in results["command"]  # kept with compare-samplers' default seed, 0
    return load_tensors(SAMPLERS.with_suffix(".safetensors"))[0][GOLDEN_NAME]


def golden_gap(model: DiffusionModel) -> float:
    """Mean |difference| between the kept samples and the same seeded draw from `model`."""
    kept = kept_ddpm_samples()
    drawn = generate(model, len(kept), model.sampler_config(*GOLDEN_SETTING), seed=LIVE_SEED)
    return (drawn - kept).abs().mean().item()


needs_classifier = pytest.mark.skipif(
    not DEFAULT_CLASSIFIER.is_file(), reason="no shipped classifier"
)


@pytest.mark.slow  # draws 400-1,000 samples of a shipped model
@needs_classifier
@pytest.mark.parametrize("name", LIVE_CHECKS)
def test_shipped_model_draws_digits_the_classifier_recognises(name):
    check = LIVE_CHECKS[name]
    if not check.checkpoint.is_file():
        pytest.skip(f"no {check.checkpoint.name}")
    model = load_diffusion(check.checkpoint)
    assert model.sample_shape == check.sample_shape  # latents: f=4 codes of 32x32-padded digits
    samples, probs = live_draw(model, check)
    assert samples.shape == (check.n, 1, 28, 28) and torch.isfinite(samples).all()
    confident = confident_fraction(probs)
    stored = measured(check.checkpoint, "evaluate")[1]["samples"]["confident_fraction"]
    assert confident >= check.bar, (
        f"only {confident:.1%} of {check.n} {model.sampler_config(*check.setting).name} "
        f"samples look like digits "
        f"(bar {check.bar:.1%}; stored: {stored:.1%} of 1,000 DDIM-50 samples)"
    )
    assert len(set(probs.argmax(-1).tolist())) == 10  # not one digit drawn over and over


@needs(DDPM)
@needs(SAMPLERS)
def test_shipped_ddpm_redraws_the_samples_it_was_measured_with():
    assert golden_gap(load_diffusion(DDPM)) < GOLDEN_TOLERANCE


@needs(DDPM)
@needs(SAMPLERS)
@pytest.mark.parametrize("kind", ["additive", "multiplicative"])
def test_golden_samples_catch_ddpm_weights_perturbed_by_5_percent(kind):
    model = load_diffusion(DDPM)
    perturb_(model.unet, kind)
    assert golden_gap(model) > GOLDEN_TOLERANCE  # the check fails


@pytest.mark.slow  # draws 400-1,000 samples of a shipped model
@needs_classifier
@needs(LDM)
def test_live_check_fails_for_latent_ddpm_weights_perturbed_by_5_percent():
    check = LIVE_CHECKS["latent"]
    model = load_diffusion(check.checkpoint)
    perturb_(model.unet)
    _, probs = live_draw(model, check)
    assert confident_fraction(probs) < check.bar


# ----- the text-to-MNIST model (lesson 04) ------------------------------------------------------
TEXT = CHECKPOINTS / "ldm_text_mnist.safetensors"


@needs(TEXT)
def test_shipped_text_model_records_its_accuracy_on_both_phrasing_sets():
    from minisd.evaluation import TEXT_ACCURACY_BAR
    from minisd.text import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES

    sidecar, metrics = measured(TEXT, "evaluate-text")
    standard, held_out = metrics["text"]["standard"], metrics["text"]["held_out"]
    assert standard["templates"] == list(TRAIN_TEMPLATES)
    assert held_out["templates"] == list(HELD_OUT_TEMPLATES)
    assert standard["n"] == held_out["n"] == 1000  # 100 samples per digit each
    assert metrics["guidance_scale"] == 1.0
    assert metrics["meets_bar"] == (standard["accuracy"] >= TEXT_ACCURACY_BAR)
    assert abs(sum(standard["per_digit"]) / 10 - standard["accuracy"]) < 1e-6
    assert metrics["samples"]["n"] == metrics["real_baseline"]["n"] >= 1000  # the empty prompt
    assert sidecar["text_encoder"] == "minilm" and sidecar["latent_vae"].endswith("f4.safetensors")
    assert all("--text-encoder minilm" in c for c in sidecar["commands"])


@pytest.mark.slow  # draws 200 samples of the shipped text model
@needs_classifier
@needs(TEXT)
def test_shipped_text_model_draws_the_digit_it_is_asked_for():
    from minisd.evaluation import conditional_accuracy, prompts_per_digit
    from minisd.text import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES

    model = load_diffusion(TEXT)
    stored = measured(TEXT, "evaluate-text")[1]["text"]
    config = model.sampler_config("ddim", 50)
    for split, templates in (("standard", TRAIN_TEMPLATES), ("held_out", HELD_OUT_TEMPLATES)):
        # another seed and other prompts than the stored measurement's: 10 per digit
        prompts, digits = prompts_per_digit(templates[::-1], 10)
        live = conditional_accuracy(model, prompts, digits, config, seed=7)["accuracy"]
        assert live >= stored[split]["accuracy"] - 0.1, (split, live, stored[split]["accuracy"])
    # the empty prompt still draws every digit
    samples = generate(model, 100, config, seed=7)
    assert len(set(classify(load_classifier(), samples)[1].argmax(-1).tolist())) == 10


CONDITIONING = RESULTS / "conditioning.json"


@needs(CONDITIONING)
def test_conditioning_comparison_trained_every_mechanism_on_one_budget():
    from minisd.conditioning import MECHANISMS

    results = load_json(CONDITIONING)
    assert results["command"].startswith("python -m minisd compare-conditioning --vae")
    assert (
        results["vae_sha256"] == load_autoencoder(ROOT / results["vae"]).metadata["weights_sha256"]
    )  # the shipped autoencoder's latents
    rows = {r["mechanism"]: r for r in results["rows"]}
    assert list(rows) == list(MECHANISMS)
    assert {r["train_steps"] for r in rows.values()} == {results["train_config"]["steps"]}
    widths = {k: v for k, v in rows["class"]["unet_config"].items() if k.endswith("mult")}
    assert all({k: r["unet_config"][k] for k in widths} == widths for r in rows.values())
    n = 10 * results["n_per_digit"]
    for name, row in rows.items():
        splits = row["accuracy"]
        assert set(splits) == ({"condition", "held_out"} if name in ("minilm", "joint")
                               else {"condition"})  # fmt: skip
        assert all(s["n"] == n and s["accuracy"] > 0.1 for s in splits.values())  # beats chance
    kept, _ = load_tensors(CONDITIONING.with_suffix(".safetensors"))
    assert {k: tuple(v.shape[1:]) for k, v in kept.items()} == dict.fromkeys(rows, (1, 28, 28))


# ----- lesson 05: make demo, the guidance curve, classifier guidance, the fast sampler ----------
def _demo_command() -> list[str]:
    """The `python -m minisd generate ...` line of the Makefile's demo target, as arguments."""
    import shlex

    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    line = next(s for s in recipe.splitlines() if "-m minisd generate" in s)
    return shlex.split(line.split("-m minisd", 1)[1])


@needs_classifier
@needs(TEXT)
def test_make_demo_draws_the_prompted_digits_from_the_shipped_model(tmp_path):
    import time

    from minisd import cli
    from minisd.text import DIGIT_WORDS

    def digit_of(prompt: str) -> int:  # the one digit a demo prompt names, as "2" or "two"
        named = [d for d, w in enumerate(DIGIT_WORDS) if str(d) in prompt or w in prompt.split()]
        assert len(named) == 1, prompt
        return named[0]

    args = _demo_command()
    assert args[0] == "generate" and "$(DEMO_OUT)" in args
    prompts = [a for a in args[1:] if not a.startswith("--")][: args.index("--n") - 1]
    out, pt = tmp_path / "demo.png", tmp_path / "demo.pt"
    args = [str(out) if a == "$(DEMO_OUT)" else a for a in args] + ["--save-tensor", str(pt)]
    start = time.perf_counter()
    cli.main(args)
    seconds = time.perf_counter() - start
    assert out.read_bytes()[:4] == b"\x89PNG" and seconds < 120  # seconds on a laptop CPU
    images = torch.load(pt)
    per = int(args[args.index("--n") + 1])
    assert images.shape == (len(prompts) * per, 1, 28, 28)
    drawn = classify(load_classifier(), images)[1].argmax(1).view(len(prompts), per)
    for prompt, row in zip(prompts, drawn, strict=True):  # digits and number words alike
        assert (row == digit_of(prompt)).float().mean() >= 0.75, (prompt, row.tolist())
    readme = (ROOT / "README.md").read_text()
    course_map = readme.split("## Course map", 1)[1].split("|", 1)[0]  # before the table
    assert "![" in course_map and "(docs/demo.png)" in course_map
    assert (ROOT / "docs" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert all(f'"{p}"' in course_map.replace("\n", " ") for p in prompts)  # what drew it


GUIDANCE_CURVE = RESULTS / "guidance_curve.json"
CLASSIFIER_GUIDANCE = RESULTS / "classifier_guidance.json"
TEXT_SAMPLERS = RESULTS / "text_samplers.json"
NOISY = CHECKPOINTS / "noisy_classifier_f4.safetensors"
TEXT_MODEL_PATH = "data/checkpoints/ldm_text_mnist.safetensors"


@needs(GUIDANCE_CURVE)
def test_guidance_curve_meets_the_bar_at_its_best_scale():
    from minisd.evaluation import GUIDANCE_ACCURACY_BAR, best_guidance

    results = load_json(GUIDANCE_CURVE)
    assert results["command"].startswith("python -m minisd guidance-curve")
    assert results["checkpoint"] == TEXT_MODEL_PATH and results["n_per_digit"] >= 100
    rows, n = results["rows"], 10 * results["n_per_digit"]
    scales = [r["scale"] for r in rows]
    assert scales == sorted(scales) and scales[0] == 0 and scales[-1] >= 10  # 0 to ~10
    assert all(r["standard"]["n"] == r["held_out"]["n"] == n for r in rows)
    assert results["baseline"]["n"] == n
    best, ok, why = best_guidance(rows)
    assert ok and results["meets_bar"] and results["best_scale"] == best["scale"], why
    assert best["standard"]["accuracy"] >= GUIDANCE_ACCURACY_BAR["standard"]
    assert best["held_out"]["accuracy"] >= GUIDANCE_ACCURACY_BAR["held_out"]
    by_scale = {r["scale"]: r for r in rows}
    # the trade the notebook describes: guidance buys accuracy and costs diversity
    assert best["standard"]["accuracy"] > by_scale[1.0]["standard"]["accuracy"]
    assert by_scale[scales[-1]]["diversity"] < by_scale[1.0]["diversity"]
    kept, _ = load_tensors(GUIDANCE_CURVE.with_suffix(".safetensors"))
    assert set(kept) == {f"scale {s:g}" for s in scales}


@needs(NOISY)
def test_shipped_noisy_classifier_reads_clean_latents_and_fades_with_noise():
    from minisd.pretrained import load_noisy_classifier

    classifier = load_noisy_classifier(NOISY)
    sidecar = classifier.metadata["sidecar"]
    assert sidecar["weights_sha256"] == classifier.metadata["weights_sha256"]
    assert sidecar["latent_vae"] == "data/checkpoints/vae_mnist_f4.safetensors"
    text_schedule = load_diffusion(TEXT).schedule.to_dict()
    assert classifier.schedule.to_dict() == text_schedule  # guides the text model's steps
    by_t = {int(t): a for t, a in sidecar["test_accuracy_by_t"].items()}
    assert by_t[0] >= 0.95 and by_t[999] < 0.2 and by_t[250] > by_t[500] > by_t[750]


@needs_mnist
@needs(NOISY)
def test_shipped_noisy_classifier_classifies_test_latents_live():
    from minisd.cli.guidance import noisy_accuracy
    from minisd.pretrained import load_noisy_classifier

    classifier = load_noisy_classifier(NOISY)
    stored = classifier.metadata["sidecar"]["test_accuracy_by_t"]
    images, labels = load_mnist(train=False, limit=1000)
    latents = encode_images(load_autoencoder(VAE_F4), images)
    live = noisy_accuracy(classifier, classifier.schedule, latents, labels, timesteps=(0, 250))
    for t, accuracy in live.items():  # 1,000 of the 10,000 digits the sidecar measured
        assert accuracy >= stored[t] - 0.05, (t, accuracy, stored[t])


@needs(CLASSIFIER_GUIDANCE)
def test_classifier_guidance_was_measured_beside_classifier_free_guidance():
    results = load_json(CLASSIFIER_GUIDANCE)
    assert results["command"].startswith("python -m minisd compare-guidance")
    assert results["checkpoint"] == TEXT_MODEL_PATH
    assert results["noisy_classifier"] == "data/checkpoints/noisy_classifier_f4.safetensors"
    n = 10 * results["n_per_digit"]
    assert results["n_per_digit"] >= 100 and results["baseline"]["n"] == n
    methods = {r["method"] for r in results["rows"]}
    assert methods == {"classifier-free", "classifier"}
    for r in results["rows"]:
        assert r["n"] == n and r["seconds_per_sample"] > 0 and r["mnist_fid"] > 0
    by = {(r["method"], r["scale"]): r for r in results["rows"]}
    assert by[("classifier", 0.0)]["accuracy"] < 0.2  # unguided: the digit is chance
    cfg, cg = "classifier-free", "classifier"  # what notebook 05 says from these numbers:
    assert by[(cfg, 1.0)]["accuracy"] > by[(cg, 3.0)]["accuracy"]  # about equal accuracy,
    assert by[(cfg, 1.0)]["mnist_fid"] < by[(cg, 3.0)]["mnist_fid"]  # closer to real digits
    assert by[(cfg, 3.0)]["accuracy"] >= by[(cg, 10.0)]["accuracy"]
    assert by[(cfg, 3.0)]["mnist_fid"] < by[(cg, 10.0)]["mnist_fid"]
    assert all(
        r["guide_accuracy"] > r["accuracy"]
        for r in results["rows"]
        if r["method"] == cg and r["scale"] > 0
    )  # the guide is partly fooled
    kept, _ = load_tensors(CLASSIFIER_GUIDANCE.with_suffix(".safetensors"))
    assert set(kept) == {f"{r['method']} {r['scale']:g}" for r in results["rows"]}


@needs(TEXT_SAMPLERS)
def test_fast_sampler_table_compares_dpm_solver_and_ddim_on_the_text_model():
    results = load_json(TEXT_SAMPLERS)
    assert results["command"].startswith(f"python -m minisd compare-samplers --checkpoint "
                                         f"{TEXT_MODEL_PATH}")  # fmt: skip
    assert results["guidance_scale"] == 3.0 and results["n"] >= 1000
    names = [r["name"] for r in results["rows"]]
    steps = (5, 10, 20, 50)
    assert names == [f"DDIM-{s}" for s in steps] + [f"DPM++2M-{s}" for s in steps]
    rows = {r["name"]: r for r in results["rows"]}
    assert all(r["n"] == results["n"] and r["seconds_per_sample"] > 0 for r in rows.values())
    fid = {name: r["mnist_fid"] for name, r in rows.items()}  # what notebook 05 says:
    assert all(r["accuracy"] >= 0.99 for r in rows.values())  # scale 3: the digit every time
    assert fid["DPM++2M-5"] < fid["DDIM-10"] and fid["DPM++2M-10"] <= fid["DDIM-50"] + 0.5
    assert all(fid[f"DPM++2M-{n}"] < fid[f"DDIM-{n}"] for n in steps)
    kept, _ = load_tensors(TEXT_SAMPLERS.with_suffix(".safetensors"))
    assert set(kept) == set(names)


# ----- lesson 06: image-to-image, inpainting, upscaling ------------------------------------------
APPLICATIONS = RESULTS / "applications.json"
INPAINTER = CHECKPOINTS / "ldm_inpaint_mnist.safetensors"
UPSCALER = CHECKPOINTS / "ldm_upscale_mnist.safetensors"


@pytest.mark.parametrize(
    "path, task, channels", [(INPAINTER, "inpaint", 5), (UPSCALER, "upscale", 4)]
)
def test_shipped_application_models_were_trained_for_their_task(path, task, channels):
    sidecar = load_json(path.with_suffix(".json"))
    assert sidecar["task"] == task and all(f"--task {task}" in c for c in sidecar["commands"])
    assert sidecar["unet_config"]["concat_channels"] == channels
    assert load_diffusion(path).unet.config.in_channels == 4 + channels


@needs(APPLICATIONS)
def test_img2img_table_moves_from_the_input_to_the_prompt_with_strength():
    results = load_json(APPLICATIONS)
    assert results["command"].startswith("python -m minisd applications") and results["n"] >= 500
    rows = results["img2img"]["rows"]
    new, old = [r["new_digit"] for r in rows], [r["input_digit"] for r in rows]
    assert new == sorted(new) and old == sorted(old, reverse=True)  # monotone in strength
    by = {r["strength"]: r for r in rows}
    assert by[0.1]["input_digit"] > 0.9 and by[0.1]["new_digit"] < 0.05  # the notebook's claims
    assert by[0.2]["input_digit"] > by[0.2]["new_digit"]
    assert by[0.3]["new_digit"] > by[0.3]["input_digit"]  # the prompt wins between 0.2 and 0.3
    assert min(r["new_digit"] for r in rows if r["strength"] >= 0.5) > 0.99
    psnrs = [r["psnr_to_input"] for r in rows]
    assert psnrs == sorted(psnrs, reverse=True)


@needs(APPLICATIONS)
def test_inpainting_by_a_trained_model_or_repaint_beats_plain_replacement():
    inpainting = load_json(APPLICATIONS)["inpainting"]
    methods = ["replace", "repaint", "inpainting model", "replace, told the digit"]
    assert set(inpainting["methods"]) == set(methods) and inpainting["resample"] > 1
    rows = inpainting["rows"]
    assert {r["mask"] for r in rows} == {"top", "bottom", "left", "right", "center"}
    for r in rows:  # the notebook's claims, mask by mask
        assert all(r[m] > r["hole_left_empty"] for m in methods)
        assert r["repaint"] > r["replace"] and r["inpainting model"] > r["replace"]
        assert r["replace, told the digit"] == max(r[m] for m in methods)
    mean = {m: sum(r[m] for r in rows) / len(rows) for m in methods}
    assert abs(mean["inpainting model"] - mean["repaint"]) < 0.03  # level, at 20 calls to 96
    assert mean["inpainting model"] > mean["replace"] + 0.15


@needs(APPLICATIONS)
def test_the_upscaler_beats_bicubic_and_stays_below_the_autoencoders_ceiling():
    rows = {r["method"]: r for r in load_json(APPLICATIONS)["upscaling"]["rows"]}
    drawn, bicubic, ceiling = (rows[k] for k in ("diffusion upscaler", "bicubic",
                                                  "autoencoder ceiling"))  # fmt: skip
    assert drawn["psnr"] > bicubic["psnr"] + 3 and drawn["psnr"] < ceiling["psnr"] - 3
    assert drawn["accuracy"] >= bicubic["accuracy"] and drawn["mnist_fid"] < bicubic["mnist_fid"]
