"""Image-to-image (SDEdit, Meng et al. 2022): noise an image part of the way, then denoise it
under a new condition.

    strength near 0 returns the input; 1 starts at the sampler's first timestep, where little
    of it is left (SD: sqrt(alpha-bar_981) = 0.08 of the signal). In between, the noise
    level t = strength x T decides how much of the input survives: its layout and strokes (the
    coarse structure, decided early in sampling) stay, the details follow the new prompt.

The sampler runs the last `strength` share of its own timesteps (as diffusers' img2img does),
from q(x_t | encode(image)).
"""

from __future__ import annotations

from typing import Any

import torch

from minisd.pretrained import DiffusionModel
from minisd.sampling import SamplerConfig


def strength_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a descending timestep sequence that image-to-image runs at `strength`:
    round(strength x steps) of them (at least one)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(
            f"strength must be in (0, 1]: 0 would return the input unchanged, 1 starts from "
            f"(nearly) pure noise; got {strength}"
        )
    n = len(timesteps)
    keep = min(n, max(1, round(strength * n)))
    return timesteps[n - keep :]


@torch.no_grad()
def image_to_image(
    model: DiffusionModel,
    images: torch.Tensor,
    cond: Any,
    strength: float,
    config: SamplerConfig | None = None,
    *,
    guidance_scale: float = 1.0,
    negative: Any = None,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] redrawn under cond (a prompt, label, or one per image):
    encoded, noised to the first kept timestep, sampled down with the model's sampler."""
    config = config or model.sampler
    timesteps = strength_timesteps(config.timesteps(model.schedule.num_timesteps), strength)
    z0 = model.encode(images)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=generator).to(z0)
    x_t = model.schedule.add_noise(z0, noise, int(timesteps[0]))
    eps_fn = model.guided_eps_fn(cond, len(z0), guidance_scale, negative)
    x0 = config.sample(
        eps_fn, x_t, model.schedule, generator=generator, progress=progress, timesteps=timesteps
    )
    return model.decode(x0).clamp(-1, 1)
