"""Stable Diffusion's text-to-image pipeline from the course's parts, with what it will cost.

    sd = load_checkpoint("v1-5-pruned-emaonly.safetensors")    # or random_stable_diffusion()
    print(estimate(sd, image_size=512, n=1, steps=50, guidance_scale=7.5))
    images = text_to_image(sd, ["a photo of an astronaut riding a horse"], steps=50)

Nothing here is SD-specific code: the prompts go through lesson 04's TextConditioner, the
sampler is lesson 02's or 05's, guidance is lesson 05's wrapper, `image_to_image` and `inpaint`
are lesson 06's. The cost is counted, not guessed: FLOPs and the activations the U-Net holds at
once are measured on the meta device (no memory, no compute), time from this machine's own
matrix-multiply rate.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from minisd.sampling import SD_V1_SAMPLER, SamplerConfig
from minisd.sd import StableDiffusion

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype for "fp32", "bf16" or "fp16", if this device runs it: fp16 needs a GPU
    (CPUs lack fast half-precision kernels; bf16 is their reduced precision)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose from {sorted(DTYPES)}")
    if name == "fp16" and torch.device(device).type == "cpu":
        raise ValueError("fp16 runs on a GPU; on a CPU use bf16 (or fp32)")
    return DTYPES[name]


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors alive during a forward pass, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                self.live += n
                weakref.finalize(t, self._freed, n)
        self.peak = max(self.peak, self.live)
        return out


def unet_cost(
    sd: StableDiffusion, latent_side: int, batch: int, dtype: torch.dtype = torch.float32
) -> tuple[int, int]:
    """(FLOPs, peak activation bytes) of one U-Net call on `batch` latents, counted on the meta
    device: a copy of the architecture without weights, so nothing is computed."""
    cfg = sd.unet.config
    with torch.device("meta"):
        unet = type(sd.unet)(cfg).to(dtype)
        x = torch.zeros(batch, cfg.in_channels, latent_side, latent_side, dtype=dtype)
        context = torch.zeros(batch, sd.text_encoder.max_length, cfg.context_dim, dtype=dtype)
        t = torch.zeros(batch, dtype=torch.long)
    with torch.no_grad():
        with FlopCounterMode(display=False) as flops:
            unet(x, t, context)
        live = _LiveBytes()
        with live:
            unet(x, t, context)
    return flops.get_total_flops(), live.peak


def matmul_rate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s this device reaches on 1024x1024 matrix products in dtype (a ~0.2 s probe)."""
    a = torch.randn(1024, 1024, device=device).to(dtype)
    a @ a  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ a
        n += 1
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return 2 * 1024**3 * n / (time.perf_counter() - start)


def copy_rate(device: torch.device | str = "cpu") -> float:
    """Bytes/s this device's memory moves (a ~0.2 s probe copying 64 MiB back and forth)."""
    a = torch.empty(16 * 1024**2, device=device)
    b = torch.empty_like(a)
    b.copy_(a)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        b.copy_(a)
        n += 1
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return 2 * a.numel() * a.element_size() * n / (time.perf_counter() - start)


@dataclass
class Estimate:
    """What a text-to-image run will take, before it starts."""

    weights_bytes: int
    activation_bytes: int
    unet_calls: int
    flops: int
    rate: float  # FLOP/s measured on this device
    unet_bytes: int  # the U-Net's weights: every call reads all of them
    bandwidth: float  # bytes/s measured on this device

    @property
    def seconds(self) -> float:
        """Compute at the measured rate plus reading the U-Net's weights once per call: a lower
        bound (small convolutions run below the matrix-multiply rate)."""
        return self.flops / self.rate + self.unet_calls * self.unet_bytes / self.bandwidth

    def __str__(self) -> str:
        gb = 1024**3
        return (
            f"memory: weights {self.weights_bytes / gb:.1f} GiB + U-Net activations "
            f"~{self.activation_bytes / gb:.1f} GiB; compute: {self.unet_calls} U-Net calls, "
            f"{self.flops / 1e12:.1f} TFLOP; time: at least ~{self.seconds:.0f} s at this "
            f"device's measured {self.rate / 1e9:.0f} GFLOP/s and {self.bandwidth / 1e9:.0f} GB/s"
        )


def estimate(
    sd: StableDiffusion,
    image_size: int = 512,
    n: int = 1,
    steps: int = 50,
    guidance_scale: float = 7.5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Estimate:
    """The memory and time of `text_to_image` with these settings (one image per U-Net batch;
    guidance doubles the batch), the U-Net's share: it dominates (the autoencoder's decoder
    runs once per image, the text encoder once per prompt)."""
    batch = 2 if guidance_scale != 1 else 1
    flops, peak = unet_cost(sd, image_size // sd.vae.config.downsampling_factor, batch, dtype)
    element = torch.empty(0, dtype=dtype).element_size()
    weights = sum(p.numel() for part in sd.parts().values() for p in part.parameters()) * element
    unet_bytes = sum(p.numel() for p in sd.unet.parameters()) * element
    calls = steps * n
    return Estimate(weights, peak, calls, flops * calls, matmul_rate(device, dtype), unet_bytes,
                    copy_rate(device))  # fmt: skip


def sampler_for(sampler: str = "ddim", steps: int = 50, **changes: Any) -> SamplerConfig:
    """SD's sampler settings (leading spacing offset by one, no clipping) with another sampler
    or number of steps."""
    return dataclasses.replace(SD_V1_SAMPLER, sampler=sampler, steps=steps, **changes)


@torch.no_grad()
def text_to_image(
    sd: StableDiffusion,
    prompts: list[str],
    *,
    negative: str | None = None,
    n: int = 1,
    image_size: int = 512,
    config: SamplerConfig | None = None,
    guidance_scale: float = 7.5,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """(len(prompts) x n, 3, H, W) images in [-1, 1]: each prompt n times, one U-Net batch per
    image (two with guidance), from one seeded generator. negative: a prompt to steer away from
    (it replaces the empty prompt in classifier-free guidance)."""
    from minisd.evaluation import generate

    model = sd.diffusion_model(image_size, config or sampler_for())
    cond = [p for p in prompts for _ in range(n)]
    return generate(model, len(cond), None, seed, batch_size=1, cond=cond,
                    guidance_scale=guidance_scale, negative=negative,
                    progress_steps=progress)  # fmt: skip
