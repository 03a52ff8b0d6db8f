"""Latent diffusion (Rombach et al. 2022): run the same diffusion on an autoencoder's latents.

    images --encode_images--> scaled latents z --(train / sample a U-Net on z)--> decode_images

The autoencoder is trained once; the dataset is encoded once (`cached_latents`); the U-Net then
sees (B, 4, 8, 8) latents instead of (B, 1, 28, 28) pixels. MNIST's 28 is not a multiple of 8,
so, like LeNet-5, the autoencoder works on digits padded to 32x32 with background; decoded
images are cropped back to 28x28. `training_cost` measures what the smaller input saves.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from minisd.checkpoint import load_tensors, save_tensors
from minisd.course import progress as progress_bar
from minisd.train import make_optimizer
from minisd.vae import AutoencoderKL, compute_scale_factor

BACKGROUND = -1.0  # MNIST's background in the course's [-1, 1] pixel scale


def pad_images(x: torch.Tensor, size: int, value: float = BACKGROUND) -> torch.Tensor:
    """Pad (B, C, H, W) images evenly on all sides to size x size (28 -> 32 adds 2 pixels)."""
    h, w = x.shape[-2:]
    if h > size or w > size or (size - h) % 2 or (size - w) % 2:
        raise ValueError(
            f"cannot pad {h}x{w} images evenly to {size}x{size}: the size must be at least as "
            "large and differ by an even number of pixels"
        )
    ph, pw = (size - h) // 2, (size - w) // 2
    return nn.functional.pad(x, (pw, pw, ph, ph), value=value)


def crop_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size crop of (B, C, H, W) images: undoes `pad_images`."""
    h, w = x.shape[-2:]
    if size > min(h, w) or (h - size) % 2 or (w - size) % 2:
        raise ValueError(f"cannot crop {h}x{w} images evenly to {size}x{size}")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def _to_vae_size(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    size = vae.config.resolution
    return x if size is None or x.shape[-1] == size else pad_images(x, size)


@torch.no_grad()
def encode_images(
    vae: AutoencoderKL,
    images: torch.Tensor,
    batch_size: int = 500,
    scaled: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Latents (N, embed_dim, h, w) of images (N, C, H, W), padded to the autoencoder's size.

    The posterior mean (as SD does for training data), times scale_factor unless scaled=False.
    Computed in batches on the autoencoder's device; returned on the CPU.
    """
    device = next(vae.parameters()).device
    out = []
    for start in progress_bar(range(0, len(images), batch_size), progress, desc="encode"):
        x = _to_vae_size(vae, images[start : start + batch_size].to(device))
        z = vae.encode(x).mode()
        out.append((z * vae.config.scale_factor if scaled else z).cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_images(
    vae: AutoencoderKL, latents: torch.Tensor, image_size: int | None = None, batch_size: int = 500
) -> torch.Tensor:
    """Images from scaled latents, cropped to image_size (e.g. 28) if given."""
    device = next(vae.parameters()).device
    out = []
    for start in range(0, len(latents), batch_size):
        x = vae.decode_latents(latents[start : start + batch_size].to(device))
        out.append(x if image_size is None else crop_images(x, image_size))
    return torch.cat(out).to(latents.device)


def fit_scale_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Set vae.config.scale_factor to 1/std of the unscaled latents of `images`; return it.

    SD v1 did this once, on a batch of its training images, and got 0.18215. Use a few thousand
    images: the factor is a dataset statistic, not a per-batch one.
    """
    factor = compute_scale_factor(encode_images(vae, images, scaled=False))
    vae.config = replace(vae.config, scale_factor=factor)
    return factor


def fingerprint(module: nn.Module) -> str:
    """A short hash of a module's weights: tells cached latents which autoencoder made them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_latents(
    vae: AutoencoderKL, images: torch.Tensor, path: str | os.PathLike, progress: bool = True
) -> torch.Tensor:
    """Encode `images` once and keep the scaled latents in `path` (safetensors) for next time.

    The cache is reused only if it was made by the same weights, scale factor and image count;
    otherwise it is rebuilt (written atomically).
    """
    path = Path(path)
    key = {
        "autoencoder": fingerprint(vae),
        "scale_factor": vae.config.scale_factor,
        "n": len(images),
    }
    if path.is_file():
        tensors, meta = load_tensors(path)
        if all(meta.get(k) == v for k, v in key.items()):
            return tensors["latents"]
    latents = encode_images(vae, images, progress=progress)
    save_tensors(path, {"latents": latents.contiguous()}, key)
    return latents


def activation_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward call.

    This is the memory that grows with batch and image size (the weights do not), measured the
    same way on any device: every tensor saved for backward is counted once, except the weights.
    """
    # Counted by storage, the memory a saved tensor keeps alive: views of one activation count
    # once, and a slice of a weight (GEGLU's halves) is a weight. (Keyed by address and size
    # instead, a view with another offset or length counted again, and the sum moved with the
    # allocator's choices.)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    del out
    return sum(seen.values())


def training_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Floating-point operations of one forward and backward pass, as torch counts them.

    FlopCounterMode counts the matrix multiplications and convolutions (2 per multiply-add),
    which dominate a U-Net: a count, so it is the same on any machine, unlike a step time.
    """
    with FlopCounterMode(display=False) as counter:
        model(*inputs).float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def training_cost(
    model: nn.Module,
    sample_shape: tuple[int, ...],
    batch_size: int,
    steps: int = 5,
    warmup: int = 2,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Seconds per training step (forward, backward, AdamW), its FLOPs and activation memory.

    Trains `model` on random inputs to time it: pass a throwaway copy. The median of `steps`
    timed steps after `warmup` untimed ones.
    """
    model = model.to(device).train()
    optimizer = make_optimizer(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, *sample_shape, device=device)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    seconds = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = (model(x, t) - x).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if torch.cuda.is_available() and str(device).startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    seconds.sort()
    return {
        "seconds_per_step": seconds[len(seconds) // 2],
        "activation_bytes": activation_bytes(model, x, t),
        "flops_per_step": training_flops(model, x, t),
        "values_per_sample": int(torch.Size(sample_shape).numel()),
    }
