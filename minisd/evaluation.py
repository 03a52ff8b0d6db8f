"""Measure trained models, and every pass bar a shipped model must meet, in one place: sample a
diffusion model, score the samples, compare samplers; reconstruct with an autoencoder.

    python -m minisd evaluate --checkpoint data/checkpoints/ddpm_mnist.safetensors --n 1000
    python -m minisd compare-samplers --checkpoint ... --out data/results/ddpm_mnist_samplers.json

Scores always come with the real-vs-real baseline at the same sample count (MNIST test images
scored against the train set): the best any generator can do at that n.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from minisd.checkpoint import file_sha256, save_json, save_tensors
from minisd.classifier import accuracy, classify, load_classifier
from minisd.course import progress as progress_bar
from minisd.data import load_mnist
from minisd.latent import crop_images, encode_images
from minisd.metrics import (
    SampleReport,
    evaluate_samples,
    real_baseline,
    reference_features,
)
from minisd.pretrained import DiffusionModel
from minisd.sampling import SamplerConfig
from minisd.vae import AutoencoderKL, psnr


def generate(
    model: DiffusionModel,
    n: int,
    config: SamplerConfig | None = None,
    seed: int = 0,
    batch_size: int = 250,
    image_size: int = 28,
    progress: bool = False,
    cond: Any = None,
    guidance_scale: float = 1.0,
    negative: Any = None,
    progress_steps: bool = False,
) -> torch.Tensor:
    """n images (n, C, H, W) in [-1, 1] on the CPU, drawn in batches from one seeded generator.

    The model's own sampler unless `config` (e.g. `model.sampler_config("ddim", 20)`); pixel
    models sample image_size x image_size, latent models their latent shape, decoded. cond: one
    condition for all (a class label, a prompt), n of them, or None; guidance_scale and negative
    (one condition or n) as in `DiffusionModel.sample`. `python -m minisd sample` calls this.
    progress shows a bar over the batches, progress_steps one over each batch's sampler steps.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n is the number of images to draw, at least 1; got {n!r}")
    config = config or model.sampler
    config.timesteps(model.schedule.num_timesteps)  # a bad setting fails before any work
    conds = model.condition_batch(cond, n)  # validated once, sliced per batch below
    negatives = None if negative is None else model.condition_batch(negative, n)
    generator = torch.Generator().manual_seed(seed)
    shape = model.noise_shape(image_size)
    out = []
    for start in progress_bar(range(0, n, batch_size), progress, desc=config.name):
        b = min(batch_size, n - start)
        x_T = torch.randn(b, *shape, generator=generator).to(model.device)
        c, neg = (None if v is None else v[start : start + b] for v in (conds, negatives))
        images = model.sample(
            x_T, config, cond=c, generator=generator, guidance_scale=guidance_scale, negative=neg,
            progress=progress_steps,
        )  # fmt: skip
        out.append(images.cpu())
    return torch.cat(out)


# ----- the autoencoder ------------------------------------------------------------------------
# The bar a shipped MNIST autoencoder must meet on the 10k test digits.
PSNR_BAR, ACCURACY_BAR = 26.0, 0.985


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """decode(mode(encode(x))) for MNIST-sized images, padded and cropped as the model needs."""
    side = images.shape[-1]
    latents = encode_images(vae, images, batch_size, scaled=False)
    out = [
        crop_images(vae.decode(z.to(next(vae.parameters()).device)), side).cpu()
        for z in latents.split(batch_size)
    ]
    return torch.cat(out).clamp(-1, 1)


def evaluate_autoencoder(vae: AutoencoderKL, n: int = 10_000) -> dict:
    """PSNR and the classifier's accuracy on reconstructions of the first n MNIST test digits."""
    images, labels = load_mnist(train=False, limit=n)
    start = time.perf_counter()
    recon = reconstruct(vae, images)
    seconds = time.perf_counter() - start
    classifier = load_classifier()
    latents = encode_images(vae, images[:2000])
    result = {
        "n": len(images),
        "psnr_db": psnr(recon, images),
        "accuracy_on_reconstructions": accuracy(classifier, recon, labels),
        "accuracy_on_originals": accuracy(classifier, images, labels),
        "scaled_latent_std": latents.std().item(),
        "latent_values": latents[0].numel(),
        "pixel_values": images[0].numel(),
        "seconds_per_image": seconds / len(images),
    }
    result["meets_bar"] = (
        result["psnr_db"] >= PSNR_BAR and result["accuracy_on_reconstructions"] >= ACCURACY_BAR
    )
    result["bar"] = f"PSNR >= {PSNR_BAR} dB and accuracy on reconstructions >= {ACCURACY_BAR:.1%}"
    return result


def score(
    model: DiffusionModel,
    n: int,
    setting: SamplerConfig,
    seed: int = 0,
    progress: bool = True,
    classifier=None,
    reference: torch.Tensor | None = None,
) -> dict:
    """Samples, seconds per sample, and the metrics with the real baseline at the same n."""
    classifier = classifier or load_classifier()
    reference = reference if reference is not None else reference_features(classifier)
    start = time.perf_counter()
    samples = generate(model, n, setting, seed=seed, progress=progress)
    seconds = time.perf_counter() - start
    report = _evaluate(samples, classifier, reference, setting.name)
    baseline = real_baseline(n, classifier, reference, seed=seed, kid_subset_size=min(1000, n))
    return {
        "setting": asdict(setting),
        "name": setting.name,
        "n": n,
        "seconds_per_sample": seconds / n,
        "report": asdict(report),
        "baseline": asdict(baseline),
        "samples": samples,
    }


def _evaluate(
    samples: torch.Tensor, classifier, reference: torch.Tensor, label: str
) -> SampleReport:
    return evaluate_samples(
        samples, classifier, reference, label=label, kid_subset_size=min(1000, len(samples))
    )


def report_from_dict(d: dict) -> SampleReport:
    """Rebuild a SampleReport from its JSON form (as stored in sidecars and results files)."""
    return SampleReport(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def meets_recognisability_bar(report: SampleReport) -> tuple[bool, str]:
    """The course's bar for a shipped MNIST model: >= 90% confident samples, each class 5-15%."""
    fractions = report.class_fractions
    ok_conf = report.confident_fraction >= 0.9
    ok_classes = all(0.05 <= f <= 0.15 for f in fractions)
    why = (
        f"confident {report.confident_fraction:.1%} (need >= 90%), "
        f"classes {min(fractions):.1%}..{max(fractions):.1%} (need 5%..15%)"
    )
    return ok_conf and ok_classes, why


# ----- text-conditioned models ------------------------------------------------------------------
# The bar a shipped text-to-MNIST model meets without guidance, on the training phrasings.
TEXT_ACCURACY_BAR = 0.95


def prompts_per_digit(
    templates: tuple[str, ...], n_per_digit: int
) -> tuple[list[str], torch.Tensor]:
    """n_per_digit captions of each digit 0-9, the phrasings taken in turn, and their digits."""
    from minisd.text import caption

    if n_per_digit < 1 or not templates:
        raise ValueError(f"need n_per_digit >= 1 and templates, got {n_per_digit}, {templates}")
    digits = torch.arange(10).repeat_interleave(n_per_digit)
    prompts = [caption(d, templates[i % len(templates)]) for i, d in enumerate(digits.tolist())]
    return prompts, digits


def text_accuracy(
    model: DiffusionModel,
    templates: tuple[str, ...],
    n_per_digit: int = 100,
    config: SamplerConfig | None = None,
    seed: int = 0,
    classifier=None,
    progress: bool = False,
) -> dict:
    """How often the classifier reads the prompted digit in samples from its captions.

    n_per_digit samples per digit, prompted with `templates` in turn; per-digit and overall
    accuracy, and how many the classifier is confident about (max probability >= 0.9).
    """
    prompts, digits = prompts_per_digit(tuple(templates), n_per_digit)
    result = conditional_accuracy(model, prompts, digits, config, seed, classifier, progress)
    return {**result, "templates": list(templates)}


def conditional_accuracy(
    model: DiffusionModel,
    cond: Any,
    digits: torch.Tensor,
    config: SamplerConfig | None = None,
    seed: int = 0,
    classifier=None,
    progress: bool = False,
) -> dict:
    """Sample one image per condition (labels, prompts, images) and compare the classifier's
    reading with the digit each condition asks for: accuracy overall and per digit."""
    digits = torch.as_tensor(digits).long().cpu()
    images = generate(model, len(digits), config, seed, progress=progress, cond=cond)
    return digit_accuracy(images, digits, classifier)


def digit_accuracy(images: torch.Tensor, digits: torch.Tensor, classifier=None) -> dict:
    """How often the classifier reads `digits` in `images`: overall, per digit, and how many
    readings are confident (max probability >= 0.9)."""
    classifier = classifier or load_classifier()
    digits = torch.as_tensor(digits).long().cpu()
    probs = classify(classifier, images)[1]
    right = probs.argmax(1) == digits
    return {
        "accuracy": right.float().mean().item(),
        "per_digit": [right[digits == d].float().mean().item() for d in range(10)],
        "confident_fraction": (probs.max(1).values >= 0.9).float().mean().item(),
        "n": len(digits),
    }


def compare_mechanisms(
    names: Sequence[str],
    base,
    latents: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    vae: AutoencoderKL,
    config,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    n_per_digit: int = 50,
    sampler_steps: int = 20,
    cond_dropout: float = 0.1,
    min_snr_gamma: float | None = 5.0,
    keep: int = 2,
    classifier=None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Train one U-Net per conditioning mechanism (`minisd.conditioning.MECHANISMS`) from the
    same base config, on the same latents, for the same `config` (a `TrainConfig`: steps, batch,
    lr, seed), then measure how often each one's samples show the digit its condition asks for.

    Class labels are asked for n_per_digit times each; the low-resolution images are those of
    the first 10 * n_per_digit test digits, scored against their labels; text models are
    prompted with the training phrasings and, separately, the held-out ones. Returns one row per
    mechanism and `keep` samples per digit of each (from the first accuracy it measures).
    """
    from minisd.conditioning import MECHANISMS, low_resolution, mechanism, mechanism_conditions
    from minisd.course import seed_everything
    from minisd.diffusion import diffusion_loss_fn
    from minisd.schedule import NoiseSchedule
    from minisd.summary import count_parameters
    from minisd.text import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES
    from minisd.train import fit

    if len(test_images) < 10 * n_per_digit:
        raise ValueError(f"need {10 * n_per_digit} test digits, got {len(test_images)}")
    classifier = classifier or load_classifier()
    schedule = NoiseSchedule("linear", 1000)
    digits = torch.arange(10).repeat_interleave(n_per_digit)
    low_res, test_digits = low_resolution(test_images[: len(digits)]), test_labels[: len(digits)]
    rows, kept = [], {}
    for name in names:
        seed_everything(config.seed)
        module, conditioner = mechanism(name, base)
        conditions = mechanism_conditions(name, conditioner, labels, images, config.seed)
        joint = getattr(module, "conditioner", None) is conditioner  # it trains with the U-Net
        loss_fn = diffusion_loss_fn(
            schedule, "eps", cond_dropout, min_snr_gamma, None if joint else conditioner
        )
        result = fit(module, loss_fn, (latents, conditions), config, progress=progress,
                     device=device)  # fmt: skip
        net = result.sampling_model.eval()
        model = DiffusionModel(net, schedule, "eps", {}, vae, images.shape[-1],
                               conditioner=None if joint else conditioner)  # fmt: skip
        sampler = model.sampler_config("ddim", sampler_steps)
        if name in ("class", "concat"):
            cond, wanted = (digits, digits) if name == "class" else (low_res, test_digits)
            splits = {"condition": (cond, wanted)}
        else:
            splits = {
                split: prompts_per_digit(templates, n_per_digit)
                for split, templates in (("condition", TRAIN_TEMPLATES),
                                         ("held_out", HELD_OUT_TEMPLATES))
            }  # fmt: skip
        scores = {}
        for split, (cond, wanted) in splits.items():
            start = time.perf_counter()
            samples = generate(model, len(wanted), sampler, config.seed, cond=cond)
            seconds = (time.perf_counter() - start) / len(wanted)
            scores[split] = {**digit_accuracy(samples, wanted, classifier),
                             "seconds_per_sample": seconds}  # fmt: skip
            if name not in kept:  # the first `keep` samples of each digit, in digit order
                wanted = torch.as_tensor(wanted)
                first = [torch.nonzero(wanted == d).flatten()[:keep] for d in range(10)]
                kept[name] = samples[torch.cat(first)].contiguous()
        rows.append({
            "mechanism": name,
            "title": MECHANISMS[name],
            "unet_config": asdict(getattr(module, "unet", module).config),
            "parameters": count_parameters(module),
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "train_steps": result.step,
            "train_seconds": result.seconds,
            "final_loss": result.history[-1]["loss"],
            "accuracy": scores,
        })  # fmt: skip
    return rows, kept


# ----- guidance (lesson 05) -------------------------------------------------------------------
# The bar the shipped text model meets at its best guidance scale: the standard and the held-out
# phrasings' accuracy of the prompted digit.
GUIDANCE_ACCURACY_BAR = {"standard": 0.99, "held_out": 0.90}


def score_guided(
    model: DiffusionModel,
    cond: Any,
    digits: torch.Tensor,
    config: SamplerConfig | None = None,
    seed: int = 0,
    classifier=None,
    reference: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    progress: bool = False,
) -> tuple[dict, torch.Tensor]:
    """One image per condition, scored: how often the classifier reads the digit each condition
    asks for (`digit_accuracy`), the MNIST-FID against `reference` (train features), the
    within-digit diversity (`metrics.within_class_diversity`) and the seconds per sample; and
    the images."""
    from minisd.metrics import frechet_distance, within_class_diversity

    classifier = classifier or load_classifier()
    reference = reference if reference is not None else reference_features(classifier)
    digits = torch.as_tensor(digits).long().cpu()
    start = time.perf_counter()
    images = generate(model, len(digits), config, seed, progress=progress, cond=cond,
                      guidance_scale=guidance_scale)  # fmt: skip
    seconds = time.perf_counter() - start
    row = digit_accuracy(images, digits, classifier)
    features = classify(classifier, images)[0]
    row["mnist_fid"] = frechet_distance(features, reference)
    row["diversity"] = within_class_diversity(features, digits)
    row["seconds_per_sample"] = seconds / len(digits)
    return row, images


def _first_per_digit(images: torch.Tensor, digits: torch.Tensor, keep: int) -> torch.Tensor:
    first = [torch.nonzero(digits == d).flatten()[:keep] for d in range(10)]
    return images[torch.cat(first)].contiguous()


def real_digits_baseline(classifier, reference: torch.Tensor, n: int) -> dict:
    """MNIST-FID and within-digit diversity of the first n real test digits: what samples at
    the same n are measured against."""
    from minisd.metrics import frechet_distance, within_class_diversity

    test_images, test_labels = load_mnist(train=False, limit=n)
    features = classify(classifier, test_images)[0]
    return {
        "n": len(test_images),
        "mnist_fid": frechet_distance(features, reference),
        "diversity": within_class_diversity(features, test_labels),
    }


def guidance_curve(
    model: DiffusionModel,
    scales: Sequence[float],
    n_per_digit: int = 100,
    config: SamplerConfig | None = None,
    seed: int = 0,
    classifier=None,
    reference: torch.Tensor | None = None,
    keep: int = 2,
    progress: bool = False,
) -> tuple[list[dict], dict, dict[str, torch.Tensor]]:
    """Quality against diversity along the classifier-free guidance scale of a text model.

    Per scale: the accuracy of the prompted digit from the training phrasings and from the
    held-out ones (n_per_digit samples per digit each), and for the training phrasings' samples
    the MNIST-FID, the within-digit diversity and the seconds per sample (`score_guided`). Also
    the same two for as many real test digits, the baseline, and `keep` samples per digit of
    each scale (training phrasings).
    """
    from minisd.text import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES

    classifier = classifier or load_classifier()
    reference = reference if reference is not None else reference_features(classifier)
    rows, kept = [], {}
    for scale in scales:
        row: dict[str, Any] = {"scale": float(scale)}
        for split, templates in (("standard", TRAIN_TEMPLATES), ("held_out", HELD_OUT_TEMPLATES)):
            prompts, digits = prompts_per_digit(templates, n_per_digit)
            scored, images = score_guided(model, prompts, digits, config, seed, classifier,
                                          reference, scale, progress)  # fmt: skip
            if split == "standard":
                for key in ("mnist_fid", "diversity", "seconds_per_sample"):
                    row[key] = scored.pop(key)
                kept[f"scale {scale:g}"] = _first_per_digit(images, digits, keep)
            row[split] = {k: v for k, v in scored.items() if k in _ACCURACY_KEYS}
        rows.append(row)
    return rows, real_digits_baseline(classifier, reference, 10 * n_per_digit), kept


_ACCURACY_KEYS = ("accuracy", "per_digit", "confident_fraction", "n")


@torch.no_grad()
def _noisy_accuracy_at_0(noisy_classifier, model: DiffusionModel, images, digits) -> float:
    """How often a noisy classifier of `model`'s latents reads `digits` in clean `images`."""
    x = images if model.vae is None else encode_images(model.vae, images)
    device = next(noisy_classifier.parameters()).device
    logits = torch.cat([noisy_classifier(b.to(device), torch.zeros(len(b), dtype=torch.long,
                        device=device)).cpu() for b in x.split(500)])  # fmt: skip
    return (logits.argmax(1) == digits).float().mean().item()


def compare_guidance(
    model: DiffusionModel,
    noisy_classifier,
    cfg_scales: Sequence[float],
    cg_scales: Sequence[float],
    n_per_digit: int = 100,
    config: SamplerConfig | None = None,
    seed: int = 0,
    classifier=None,
    reference: torch.Tensor | None = None,
    keep: int = 2,
    progress: bool = False,
) -> tuple[list[dict], dict, dict[str, torch.Tensor]]:
    """Classifier guidance beside classifier-free guidance, at matched settings.

    The same text model, sampler, seed and n_per_digit samples per digit for both. Classifier-
    free guidance prompts with the training phrasings at each of cfg_scales; classifier
    guidance draws from the model's unconditional half (the empty prompt), steered by
    `noisy_classifier` at each of cg_scales (`guidance.with_classifier_guidance`). Every row is
    scored by the project classifier, not by the one that guided: accuracy, MNIST-FID,
    diversity, seconds per sample (`score_guided`); and `guide_accuracy`, how often the
    guiding classifier itself (at t = 0, on the samples' re-encoded latents) reads the asked
    digit. Also the real-digit baseline and `keep` samples per digit of each row.
    """
    from minisd.guidance import with_classifier_guidance
    from minisd.text import TRAIN_TEMPLATES

    classifier = classifier or load_classifier()
    reference = reference if reference is not None else reference_features(classifier)
    prompts, digits = prompts_per_digit(TRAIN_TEMPLATES, n_per_digit)
    settings = [("classifier-free", s, model, prompts, s) for s in cfg_scales]
    settings += [("classifier", s, with_classifier_guidance(model, noisy_classifier, s), digits,
                  1.0) for s in cg_scales]  # fmt: skip
    rows, kept = [], {}
    for method, scale, sampled, cond, cfg_scale in settings:
        row, images = score_guided(sampled, cond, digits, config, seed, classifier, reference,
                                   cfg_scale, progress)  # fmt: skip
        guide = _noisy_accuracy_at_0(noisy_classifier, model, images, digits)
        rows.append({"method": method, "scale": float(scale), **row, "guide_accuracy": guide})
        kept[f"{method} {scale:g}"] = _first_per_digit(images, digits, keep)
    return rows, real_digits_baseline(classifier, reference, 10 * n_per_digit), kept


def best_guidance(rows: Sequence[dict]) -> tuple[dict, bool, str]:
    """The scale with the best standard-phrasing accuracy (ties: the smaller scale, which keeps
    more diversity), whether it meets GUIDANCE_ACCURACY_BAR, and why."""
    best = max(rows, key=lambda r: (r["standard"]["accuracy"], -r["scale"]))
    ok = all(best[split]["accuracy"] >= bar for split, bar in GUIDANCE_ACCURACY_BAR.items())
    why = (
        f"at guidance scale {best['scale']:g}: {best['standard']['accuracy']:.1%} on the training "
        f"phrasings (need >= {GUIDANCE_ACCURACY_BAR['standard']:.0%}) and "
        f"{best['held_out']['accuracy']:.1%} on the held-out ones (need >= "
        f"{GUIDANCE_ACCURACY_BAR['held_out']:.0%})"
    )
    return best, ok, why


def save_results(
    path: str | os.PathLike, results: Mapping[str, Any], samples: Mapping[str, torch.Tensor]
) -> tuple[Path, Path]:
    """A results .json and its kept samples beside it (.safetensors), tied by their SHA-256."""
    path = Path(path)
    kept = save_tensors(path.with_suffix(".safetensors"), samples)
    return save_json(path, {**results, "samples_sha256": file_sha256(kept)}), kept
