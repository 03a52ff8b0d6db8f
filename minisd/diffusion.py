"""The diffusion objective in one place: what the network predicts, the loss it is trained
with, and the conversions between predictions.

    eps-prediction   target eps                                   (DDPM, Ho et al. 2020)
    v-prediction     target v = sqrt(ab) eps - sqrt(1 - ab) x0    (Salimans & Ho 2022)
    the loss         E || target - model(x_t, t, cond) ||^2, optionally Min-SNR weighted
    conversions      eps_from_v: a v-model's output as the noise the samplers take

The samplers (`minisd.sampling`) take any eps_fn; `v_to_eps_fn` turns a v-model into one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minisd.conditioning import Conditioner, conditioner_for
from minisd.course import LossFn
from minisd.sampling import EpsFn
from minisd.schedule import NoiseSchedule

PREDICTIONS = ("eps", "v")


# ----- v-prediction ---------------------------------------------------------------------------
@torch.no_grad()
def eps_from_v(
    v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, schedule: NoiseSchedule
) -> torch.Tensor:
    """Noise from a v-prediction: sqrt(ab) v + sqrt(1 - ab) x_t (Salimans & Ho 2022, sec. 4)."""
    if v.shape != x_t.shape:
        raise ValueError(f"v must have the shape of x_t {tuple(x_t.shape)}, got {tuple(v.shape)}")
    t = schedule.check_timesteps(t, batch=x_t.shape[0])
    sqrt_ab = schedule._gather("sqrt_alphas_cumprod", t, x_t)
    sqrt_one_minus_ab = schedule._gather("sqrt_one_minus_alphas_cumprod", t, x_t)
    return sqrt_ab * v + sqrt_one_minus_ab * x_t


def v_to_eps_fn(v_fn: EpsFn, schedule: NoiseSchedule) -> EpsFn:
    """Wrap a v-prediction model `v_fn(x, t)` as an `eps_fn(x, t)` the samplers accept."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps_from_v(v_fn(x, t), x, t, schedule)

    return eps_fn


# ----- the diffusion objective -----------------------------------------------------------------
def diffusion_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    generator: torch.Generator,
    prediction: str = "eps",
    min_snr_gamma: float | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """MSE between the model's output and the target at uniformly drawn t (DDPM Alg. 1).

    min_snr_gamma: Min-SNR-gamma weighting (Hang et al. 2023): each sample's error is weighted by
    min(SNR(t), gamma) / SNR(t) for eps (/ (SNR(t) + 1) for v), which turns down the nearly clean
    steps that dominate training and lets the noisy steps, where shapes are decided, count more.
    None: the plain loss (every step weighted equally in eps).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    _check_gamma(min_snr_gamma)
    t = torch.randint(
        0, schedule.num_timesteps, (x0.shape[0],), generator=generator, device=x0.device
    )
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.add_noise(x0, noise, t)
    target = noise if prediction == "eps" else schedule.velocity(x0, noise, t)
    output = model(x_t, t, **model_kwargs).float()
    if min_snr_gamma is None:
        return F.mse_loss(output, target.float())
    per_sample = (output - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    snr = schedule.snr(t.cpu()).float().to(x0.device)
    weight = snr.clamp(max=min_snr_gamma) / (snr if prediction == "eps" else snr + 1)
    return (weight * per_sample).mean()


def _check_gamma(min_snr_gamma: float | None) -> None:
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(
            f"min_snr_gamma must be > 0 (the paper uses 5) or None, got {min_snr_gamma}"
        )


def diffusion_loss_fn(
    schedule: NoiseSchedule,
    prediction: str = "eps",
    class_dropout: float = 0.0,
    min_snr_gamma: float | None = None,
    conditioner: Conditioner | None = None,
) -> LossFn:
    """A `fit` loss for batches (x0,) or (x0, conditions); each condition is dropped to the null
    one with probability class_dropout, so one model learns p(x|c) and p(x) (Ho & Salimans 2022).

    The conditioner (class labels, text, ...) turns conditions into the model's keyword
    arguments; None asks the model's config (`conditioner_for`): labels if it has num_classes.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if not 0.0 <= class_dropout < 1.0:
        raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")
    _check_gamma(min_snr_gamma)

    def loss_fn(
        model: nn.Module, batch: tuple[torch.Tensor, ...], gen: torch.Generator
    ) -> torch.Tensor:
        x0 = batch[0]
        kwargs = {}
        cond = conditioner or conditioner_for(model)
        if cond is not None:
            if len(batch) < 2:
                raise ValueError(
                    f"a conditional model ({cond!r}) needs batches of (images, conditions)"
                )
            c = cond.batch(batch[1], len(x0), x0.device)
            kwargs = cond.model_kwargs(cond.drop(c, class_dropout, gen))
        return diffusion_loss(model, schedule, x0, gen, prediction, min_snr_gamma, **kwargs)

    return loss_fn
