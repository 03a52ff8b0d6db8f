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


def show_prompt_rows(images: torch.Tensor, prompts: Sequence[str], size: float = 0.6) -> plt.Figure:
    """One row of samples per prompt, titled with it; `images` come prompt by prompt, the same
    number for each (as `generate(model, n * len(prompts), cond=[p for p in prompts ...])`)."""
    if not prompts or len(images) % len(prompts):
        raise ValueError(f"need the same number of images per prompt: {len(images)} images, "
                         f"{len(prompts)} prompts")  # fmt: skip
    per = len(images) // len(prompts)
    fig, axes = plt.subplots(
        len(prompts), 1, figsize=(max(4.0, size * per), (size + 0.3) * len(prompts)), squeeze=False
    )
    for ax, prompt, row in zip(axes[:, 0], prompts, images.split(per), strict=True):
        show_images(row, nrow=per, ax=ax)
        ax.set_title(repr(prompt), fontsize=9, loc="left")
    fig.tight_layout()
    return fig


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


# ----- the whole system, one lesson's part highlighted -----------------------------------------
# Each box: (key, label, x, y) on a 12 x 4 canvas; arrows between keys. Training path below,
# sampling path in the middle, text conditioning on top.
SYSTEM_BOXES: tuple[tuple[str, str, float, float], ...] = (
    ("prompt", 'prompt\n"a handwritten 7"', 0.9, 3.3),
    ("tokenizer", "tokenizer\n(ids)", 3.0, 3.3),
    ("text_encoder", "text encoder\n(embeddings c)", 5.3, 3.3),
    ("noise", "noise\n$z_T \\sim \\mathcal{N}(0, I)$", 0.9, 1.9),
    ("unet", "U-Net\n$\\varepsilon_\\theta(z_t, t, c)$", 5.3, 1.9),
    ("sampler", "sampler step\n(DDPM / DDIM), x N", 7.7, 1.9),
    ("guidance", "guidance\n(cond. vs null)", 7.7, 3.3),
    ("decoder", "decoder\n$\\mathcal{D}(z_0)$", 9.9, 1.9),
    ("output", "image", 11.6, 1.9),
    ("image", "training image\n$x_0$", 0.9, 0.5),
    ("encoder", "encoder\n$\\mathcal{E}(x_0) = z_0$", 3.0, 0.5),
    ("forward", "forward noising\n$q(z_t \\mid z_0)$", 5.3, 0.5),
)
SYSTEM_ARROWS: tuple[tuple[str, str], ...] = (
    ("prompt", "tokenizer"),
    ("tokenizer", "text_encoder"),
    ("text_encoder", "unet"),
    ("noise", "unet"),
    ("unet", "sampler"),
    ("guidance", "sampler"),
    ("sampler", "decoder"),
    ("decoder", "output"),
    ("image", "encoder"),
    ("encoder", "forward"),
    ("forward", "unet"),
)
# What each lesson builds (06 runs all of it at Stable Diffusion's size).
LESSON_PARTS: dict[str, tuple[str, ...]] = {
    "01": ("image", "forward"),
    "02": ("noise", "unet", "sampler"),
    "03": ("image", "encoder", "decoder", "output"),
    "04": ("prompt", "tokenizer", "text_encoder", "unet"),
    "05": ("guidance", "sampler"),
    "06": tuple(key for key, *_ in SYSTEM_BOXES),
}


def system_diagram(lesson: str, ax: plt.Axes | None = None) -> tuple[str, ...]:
    """Draw text -> encoder -> U-Net loop over latents -> decoder, with `lesson`'s parts in colour.

    Returns the keys of the highlighted boxes (what a notebook can assert on).
    """
    if lesson not in LESSON_PARTS:
        raise ValueError(f"unknown lesson {lesson!r}; choose one of {', '.join(LESSON_PARTS)}")
    lit = LESSON_PARTS[lesson]
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 3.6))
    where = {key: (x, y) for key, _, x, y in SYSTEM_BOXES}
    for key, label, x, y in SYSTEM_BOXES:
        on = key in lit
        ax.text(
            x, y, label, ha="center", va="center", fontsize=8,
            color="black" if on else "0.55",
            bbox={"boxstyle": "round,pad=0.4", "fc": "#ffd27f" if on else "white",
                  "ec": "#c77700" if on else "0.7", "lw": 1.5 if on else 0.8},
        )  # fmt: skip
    for a, b in SYSTEM_ARROWS:
        (xa, ya), (xb, yb) = where[a], where[b]
        on = a in lit and b in lit
        ax.annotate(
            "", xy=(xb, yb), xytext=(xa, ya),
            arrowprops={"arrowstyle": "->", "color": "#c77700" if on else "0.7",
                        "shrinkA": 24, "shrinkB": 24, "lw": 1.2},
        )  # fmt: skip
    ax.annotate(
        "", xy=(5.9, 2.25), xytext=(7.2, 2.25),
        arrowprops={"arrowstyle": "->", "connectionstyle": "arc3,rad=0.5", "color": "0.5"},
    )  # fmt: skip
    ax.text(6.5, 2.7, "$z_{t-1}$ back in", fontsize=7, color="0.4", ha="center")
    ax.text(0.1, 0.0, "training: the U-Net learns to find the noise", fontsize=7, color="0.4")
    ax.text(0.1, 2.55, "sampling: start from noise, denoise step by step", fontsize=7, color="0.4")
    ax.set(
        xlim=(0, 12), ylim=(-0.2, 4), title=f"Stable Diffusion, the whole system: lesson {lesson}"
    )
    ax.axis("off")
    return lit


def plot_guidance_curve(rows: Sequence[Mapping], baseline: Mapping) -> plt.Figure:
    """`evaluation.guidance_curve`'s rows: accuracy, MNIST-FID and within-digit diversity
    against the guidance scale, the real test digits' values as dashed lines."""
    scales = [r["scale"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for split, style in (("standard", "o-"), ("held_out", "s--")):
        axes[0].plot(scales, [100 * r[split]["accuracy"] for r in rows], style,
                     label=split.replace("_", "-") + " phrasings")  # fmt: skip
    axes[0].set_ylabel("prompted digit drawn (%)")
    axes[0].legend(fontsize=8)
    for ax, key, label in ((axes[1], "mnist_fid", "MNIST-FID (lower: closer to real)"),
                           (axes[2], "diversity", "within-digit diversity")):  # fmt: skip
        ax.plot(scales, [r[key] for r in rows], "o-", label="samples")
        ax.axhline(baseline[key], color="gray", ls="--", label="real test digits")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("guidance scale s")
    fig.tight_layout()
    return fig
