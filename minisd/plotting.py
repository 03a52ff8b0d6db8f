"""Plotting helpers for the notebooks (kept out of model code)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torchvision.utils import make_grid

from minisd.schedule import NoiseSchedule


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tile images (B, C, H, W) in [-1, 1] into one array in [0, 1]: (H', W') or (H', W', 3)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images shaped (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    grid = make_grid(x, nrow=nrow, padding=padding, pad_value=1.0)
    if images.shape[1] == 1:
        return grid[0].numpy()
    return grid.permute(1, 2, 0).numpy()


def show_images(
    images: torch.Tensor,
    nrow: int = 8,
    title: str | None = None,
    ax: plt.Axes | None = None,
    size: float = 1.0,
) -> plt.Axes:
    """Show a batch of images in [-1, 1] as one grid; returns the axes."""
    grid = image_grid(images, nrow=nrow)
    if ax is None:
        rows = -(-images.shape[0] // nrow)
        _, ax = plt.subplots(figsize=(size * min(nrow, images.shape[0]), size * rows))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def show_row(images: torch.Tensor, labels: Sequence[str], axes: Sequence[plt.Axes] | None = None):
    """One image per axis with a caption under each, e.g. x_t at several t."""
    if axes is None:
        _, axes = plt.subplots(1, len(images), figsize=(1.4 * len(images), 1.7))
    for ax, img, label in zip(np.atleast_1d(axes), images, labels, strict=True):
        ax.imshow(image_grid(img[None], nrow=1, padding=0), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(label, fontsize=8)
    return axes


def plot_schedules(
    schedules: Mapping[str, NoiseSchedule],
    axes: Sequence[plt.Axes] | None = None,
    mark_t: int | None = None,
) -> Sequence[plt.Axes]:
    """Three panels over t: beta_t, alpha-bar_t and log SNR(t), one line per schedule."""
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for name, sched in schedules.items():
        t = np.arange(sched.num_timesteps)
        axes[0].plot(t, sched.betas.numpy(), label=name)
        axes[1].plot(t, sched.alphas_cumprod.numpy(), label=name)
        log_snr = sched.log_snr(torch.arange(sched.num_timesteps)).numpy()
        axes[2].plot(t, np.where(np.isfinite(log_snr), log_snr, np.nan), label=name)
    titles = (r"$\beta_t$", r"$\bar\alpha_t$ (signal variance)", r"$\log \mathrm{SNR}(t)$")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("t")
        if mark_t is not None:
            ax.axvline(mark_t, color="k", lw=0.8, ls="--")
    axes[0].set_yscale("log")
    axes[2].axhline(0, color="gray", lw=0.6)
    axes[1].legend(fontsize=8)
    return axes
