"""Upscaling: a diffusion model that draws a high-resolution image given a low-resolution one.

SD's x4 upscaler is a latent diffusion model whose U-Net sees the low-resolution image
concatenated to x_t (it has the latents' resolution there). Here the digits go from 14x14 to
28x28: the 14x14 image, padded to 16x16 like the 28x28 ones to 32x32, is folded into four
channels on the 8x8 latent grid (space-to-depth), so every low-resolution pixel sits on the
latent cell that covers it and nothing is lost. `bicubic` is the baseline to beat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minisd.latent import crop_images, pad_images

# 28 -> 14: the task's downsampling factor
FACTOR = 2


def _check(images: torch.Tensor, side: int, what: str) -> None:
    if images.ndim != 4 or images.shape[-2:] != (side, side):
        raise ValueError(f"need {what} of shape (N, C, {side}, {side}), got {tuple(images.shape)}")


def downsample(images: torch.Tensor) -> torch.Tensor:
    """(N, C, 28, 28) -> (N, C, 14, 14) by averaging 2x2 cells (area downsampling)."""
    _check(images, 28, "28x28 images")
    return F.avg_pool2d(images, FACTOR)


def upscaling_condition(low: torch.Tensor, latent_side: int = 8) -> torch.Tensor:
    """(N, C, 14, 14) low-resolution images as (N, 4C, 8, 8): padded to 16x16 with background,
    then each 2x2 cell stacked as channels (pixel_unshuffle), aligned with the f=4 latents."""
    _check(low, 14, "14x14 low-resolution images")
    return F.pixel_unshuffle(pad_images(low, latent_side * FACTOR), FACTOR)


def low_resolution_from(condition: torch.Tensor) -> torch.Tensor:
    """The 14x14 images back from an upscaling condition (the inverse of the fold)."""
    return crop_images(F.pixel_shuffle(condition, FACTOR), 14)


def bicubic(low: torch.Tensor) -> torch.Tensor:
    """The baseline: bicubic interpolation from 14x14 to 28x28, clamped to [-1, 1]."""
    _check(low, 14, "14x14 low-resolution images")
    return F.interpolate(low, scale_factor=FACTOR, mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def upscale(model, low: torch.Tensor, config=None, *, seed: int = 0) -> torch.Tensor:
    """(N, 1, 28, 28) images in [-1, 1] drawn by an upscaling model (a `DiffusionModel` trained
    with `python -m minisd train --task upscale`) from (N, 1, 14, 14) ones."""
    concat = upscaling_condition(low)
    if model.unet.config.concat_channels != concat.shape[1]:
        raise ValueError(
            f"this model is not an upscaler: its U-Net takes {model.unet.config.concat_channels} "
            f"concatenated channels, the 14x14 condition has {concat.shape[1]}"
        )
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(len(low), *model.noise_shape(), generator=generator).to(model.device)
    return model.sample(x_T, config, cond=concat.to(model.device), generator=generator).cpu()
