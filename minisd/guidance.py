"""Guidance: steer a conditional denoiser towards its condition while sampling (lesson 05).

Classifier-free guidance (Ho & Salimans 2022) needs one network trained with and without its
condition (conditioning dropout, as every conditional model of this course is). At each step it
predicts the noise twice, with the condition (eps_c) and with the null condition (eps_u), and
extrapolates from the unconditional prediction through the conditional one:

    eps = eps_u + s * (eps_c - eps_u)      Stable Diffusion's convention, "guidance scale" s;
        = (1 + w) * eps_c - w * eps_u      Ho & Salimans' guidance weight w, with s = 1 + w.

s = 1 is the plain conditional model, s = 0 the unconditional one; s > 1 moves each step further
in the direction the condition pulls. A negative prompt takes the null condition's place, so the
samples are pushed away from it. `classifier_free` turns a model function into the `eps_fn`
every sampler takes, unchanged; both halves go through the network as one batch of 2B.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from minisd.sampling import EpsFn

ModelFn = Callable[..., torch.Tensor]  # model_fn(x_t, t, **condition_kwargs) -> eps


def check_scale(scale: float) -> float:
    """A guidance scale as a float: finite and >= 0 (0: unconditional, 1: conditional)."""
    try:
        scale = float(scale)
    except (TypeError, ValueError) as err:
        raise TypeError(f"guidance scale must be a number, got {scale!r}") from err
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(
            f"guidance scale must be finite and >= 0 (1 = no guidance, SD uses 7.5), got {scale}"
        )
    return scale


def classifier_free(
    model_fn: ModelFn,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    scale: float,
) -> EpsFn:
    """eps_fn(x, t) = eps_u + scale * (eps_c - eps_u), both predictions in one forward pass.

    cond and uncond are the model's keyword arguments for the condition and for the null (or
    negative) one, batched like x (a conditioner's `model_kwargs`). Scale 1 skips the
    unconditional half and scale 0 the conditional one: the same numbers, half the work.
    """
    scale = check_scale(scale)
    if set(cond) != set(uncond):
        raise ValueError(
            f"cond and uncond must give the same arguments, got {sorted(cond)} vs {sorted(uncond)}"
        )

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1.0:
            return model_fn(x, t, **cond)
        if scale == 0.0:
            return model_fn(x, t, **uncond)
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}  # (2B, ...)
        eps_u, eps_c = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return eps_fn
