"""The three applications measured at MNIST scale with the shipped models (lesson 06).

- `img2img_table`: test digits redrawn under a prompt for another digit, at several strengths:
  how often the result reads as the new digit, how often still as the old one, how close it
  stays to the input (PSNR).
- `inpainting_table`: test digits with part hidden, completed by each method: how often the
  completed digit reads as the true one, beside the digit with the hole left empty.
- `upscaling_table`: test digits from 14x14 to 28x28 by bicubic and by the upscaling model: PSNR
  to the original, classifier accuracy and MNIST-FID, beside the autoencoder's own ceiling.

All scores come from the project classifier on held-out test digits; the masks, targets and
noise are seeded, so a rerun gives the same table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from minisd.classifier import classify
from minisd.img2img import image_to_image
from minisd.inpainting import MASKS, fixed_mask, inpaint
from minisd.latent import BACKGROUND
from minisd.metrics import frechet_distance
from minisd.pretrained import DiffusionModel
from minisd.sampling import SamplerConfig
from minisd.text import caption
from minisd.upscaling import bicubic, downsample, upscale
from minisd.vae import psnr


def _reads(classifier, images: torch.Tensor) -> torch.Tensor:
    return classify(classifier, images)[1].argmax(1)


def other_digits(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """For each label a different digit, drawn uniformly from the other nine (seeded)."""
    shift = torch.randint(1, 10, labels.shape, generator=torch.Generator().manual_seed(seed))
    return (labels + shift) % 10


def img2img_table(
    model: DiffusionModel,
    classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    strengths: Sequence[float],
    config: SamplerConfig,
    guidance_scale: float = 3.0,
    seed: int = 0,
    keep: int = 8,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """One row per strength: new_digit (the fraction read as the prompted digit), input_digit
    (read as the input's), psnr_to_input (dB), ms per image; and the first `keep` results."""
    targets = other_digits(labels, seed)
    prompts = [caption(int(d)) for d in targets]
    rows, kept = [], {"img2img_inputs": images[:keep], "img2img_targets": targets[:keep]}
    for strength in strengths:
        start = time.perf_counter()
        out = image_to_image(model, images, prompts, strength, config,
                             guidance_scale=guidance_scale, seed=seed)  # fmt: skip
        seconds = time.perf_counter() - start
        read = _reads(classifier, out)
        rows.append({
            "strength": strength,
            "new_digit": (read == targets).float().mean().item(),
            "input_digit": (read == labels).float().mean().item(),
            "psnr_to_input": psnr(out, images),
            "ms_per_image": 1000 * seconds / len(images),
        })  # fmt: skip
        kept[f"img2img_{strength:g}"] = out[:keep]
    return rows, kept


def hole_left_empty(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The baseline of inpainting: the hidden pixels set to the background, nothing drawn."""
    return torch.where(mask.bool(), torch.full_like(images, BACKGROUND), images)


def inpainting_table(
    methods: dict[str, tuple[DiffusionModel, str, bool]],
    classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    config_steps: int = 20,
    masks: Sequence[str] = MASKS,
    resample: int = 5,
    guidance_scale: float = 3.0,
    seed: int = 0,
    keep: int = 8,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """One row per mask and method: the accuracy of the completed digits (read as the true
    label), and of the hole left empty. methods: name -> (model, inpainting method, whether
    the model is told the digit: a text model prompted with the true caption)."""
    rows, kept = [], {"inpainting_inputs": images[:keep]}
    for kind in masks:
        mask = fixed_mask(kind)[None].expand(len(images), -1, -1, -1)
        empty = hole_left_empty(images, mask)
        row = {
            "mask": kind,
            "hidden_fraction": fixed_mask(kind).mean().item(),
            "hole_left_empty": (_reads(classifier, empty) == labels).float().mean().item(),
        }
        kept[f"inpainting_{kind}_empty"] = empty[:keep]
        for name, (model, method, told) in methods.items():
            cond = [caption(int(d)) for d in labels] if told else None
            config = model.sampler_config("ddim", config_steps)
            start = time.perf_counter()
            out = inpaint(model, images, mask, cond, config, method=method, resample=resample,
                          guidance_scale=guidance_scale if told else 1.0, seed=seed)  # fmt: skip
            row[name] = (_reads(classifier, out) == labels).float().mean().item()
            row[f"{name}_ms_per_image"] = 1000 * (time.perf_counter() - start) / len(images)
            kept[f"inpainting_{kind}_{name}"] = out[:keep]
        rows.append(row)
    return rows, kept


def upscaling_table(
    upscaler: DiffusionModel,
    classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor,
    config: SamplerConfig,
    seed: int = 0,
    keep: int = 8,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Rows for the 14x14 input itself (nearest-neighbour enlarged), bicubic, the diffusion
    upscaler, and the autoencoder's reconstruction of the original (what any latent model at
    best reaches): PSNR to the 28x28 original, accuracy and MNIST-FID (reference features)."""
    low = downsample(images)
    start = time.perf_counter()
    drawn = upscale(upscaler, low, config, seed=seed)
    ms = 1000 * (time.perf_counter() - start) / len(images)
    candidates = {
        "14x14 input (nearest)": low.repeat_interleave(2, -1).repeat_interleave(2, -2),
        "bicubic": bicubic(low),
        "diffusion upscaler": drawn,
        "autoencoder ceiling": upscaler.decode(upscaler.encode(images)).clamp(-1, 1),
    }
    rows, kept = [], {"upscaling_original": images[:keep], "upscaling_low": low[:keep]}
    for name, out in candidates.items():
        feats, probs = classify(classifier, out)
        rows.append({
            "method": name,
            "psnr": psnr(out, images),
            "accuracy": (probs.argmax(1) == labels).float().mean().item(),
            "mnist_fid": frechet_distance(feats, reference),
            "ms_per_image": ms if name == "diffusion upscaler" else None,
        })  # fmt: skip
        kept["upscaling_" + name.split()[0].replace("14x14", "nearest")] = out[:keep]
    return rows, kept
