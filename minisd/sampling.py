"""Samplers for the reverse process: DDPM ancestral sampling, DDIM and DPM-Solver++(2M).

Every sampler is a pure function with one signature,

    sampler(eps_fn, x_T, schedule, timesteps, *, generator=None, callback=None, progress=False,
            **options)

over a callable `eps_fn(x, t) -> eps`, with t a long tensor of shape (B,) holding 0-indexed
timesteps in [0, T-1] (as in diffusers). Which timesteps to visit is chosen by its own functions
(`ddpm_timesteps`, `ddim_timesteps`, `dpm_solver_timesteps`); `SAMPLERS` maps each sampler's
name to its function, and a frozen `SamplerConfig` holds one choice of sampler, steps and
options (`SD_V1_SAMPLER` is SD's).
Randomness comes only from the `generator` argument, so a seeded generator makes a sample
reproducible.

Notation (paper -> code). DDIM writes alpha_t for what DDPM (and this code) calls alpha-bar_t:
    x_t                      -> x_t                          (B, C, H, W), or any (B, ...)
    eps_theta(x_t, t)        -> eps
    x_0 predicted from x_t   -> x0_pred                      (DDPM eq. 15, DDIM eq. 9)
    alpha-bar_t              -> ab_t = schedule.alphas_cumprod[t]
    alpha-bar_{t_prev}       -> ab_prev                      (the step's target noise level)
    sigma_t^2                -> variance; sigma_t -> sigma   (DDPM sec. 3.2, DDIM eq. 16)
    eta                      -> eta                          (0: DDIM, 1: DDPM-like)
    z ~ N(0, I)              -> noise
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minisd.course import progress as progress_bar
from minisd.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]

VARIANCES: tuple[str, ...] = ("fixed_small", "fixed_large")
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
# diffusers clamps beta-tilde away from 0 (it is 0 at t = 0) because some variants take its log.
MIN_POSTERIOR_VARIANCE = 1e-20
# ldm's DDIM sampler adds 1 to its timesteps "to get the final alpha values right", so SD v1's
# scheduler config sets steps_offset=1: 50 "leading" steps run t = 981, 961, ..., 1 (not 980..0).
SD_V1_STEPS_OFFSET = 1


# ----- small helpers --------------------------------------------------------------------------
def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Scalar or (B,) float64 values as (B, 1, ...) in `like`'s dtype and device."""
    values = values.to(device=like.device, dtype=like.dtype)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _check_like(name: str, tensor: torch.Tensor, x_t: torch.Tensor, hint: str = "") -> None:
    if tensor.shape != x_t.shape:
        raise ValueError(
            f"{name} must have the shape of x_t {tuple(x_t.shape)}, got {tuple(tensor.shape)}{hint}"
        )


def _check_clip(clip_x0: float | None) -> None:
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be None (no clipping) or a positive range, got {clip_x0!r}")


def _check_eta(eta: float) -> None:
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")


def _check_final_alpha_cumprod(value: float | None) -> None:
    if value is not None and not 0 < value <= 1:
        raise ValueError(
            f"final_alpha_cumprod must lie in (0, 1], or be None for alphas_cumprod[0]; "
            f"got {value!r}"
        )


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (as diffusers does)."""
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _predict_x0(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    clip_x0: float | None,
) -> torch.Tensor:
    x0_pred = schedule._predict_x0(x_t, eps, t)  # t is checked by the caller
    # Clipping x0 to the data range keeps early, noisy predictions from overshooting.
    return x0_pred if clip_x0 is None else x0_pred.clamp(-clip_x0, clip_x0)


def _call_eps_fn(eps_fn: EpsFn, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
    eps = eps_fn(x, t_batch)
    _check_like("eps_fn(x, t)", eps, x, "; eps_fn must return one noise estimate per pixel")
    return eps, t_batch


# ----- DDPM -----------------------------------------------------------------------------------
def _ddpm_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor | int,
    noise: torch.Tensor | None,
    variance: str,
    clip_x0: float | None,
    generator: torch.Generator | None,
    checked: bool = False,
    last: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM step; returns (x_{t-1}, x0_pred).

    checked: the arguments were checked already (once per sampling call, by the sampler), so no
    check and no host sync runs here; `last` then says whether t is 0 for the whole batch.
    """
    if not checked:
        _check_choice("variance", variance, VARIANCES)
        _check_clip(clip_x0)
        _check_like("eps", eps, x_t)
        t = schedule.check_timesteps(t, batch=x_t.shape[0])
    t = t.to(x_t.device)
    x0_pred = _predict_x0(schedule, x_t, eps, t, clip_x0)
    mean = schedule._posterior_mean(x0_pred, x_t, t)  # DDPM eq. 7
    if last is None:
        last = not bool((t > 0).any())
    if last:
        return mean, x0_pred  # the last step (t = 0) adds no noise
    if variance == "fixed_small":  # sigma_t^2 = beta-tilde_t, the posterior's own variance
        var_t = schedule.table("posterior_variance", x_t.device)[t]
        var_t = var_t.clamp(min=MIN_POSTERIOR_VARIANCE)
    else:  # "fixed_large": sigma_t^2 = beta_t, the upper bound (DDPM sec. 3.2)
        var_t = schedule.table("betas", x_t.device)[t]
    sigma = var_t.sqrt() * (t > 0)
    if noise is None:
        noise = _randn_like(x_t, generator)
    if not checked:
        _check_like("noise", noise, x_t)
    return mean + _per_sample(sigma, x_t) * noise, x0_pred


@torch.no_grad()
def ddpm_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor | int,
    noise: torch.Tensor | None = None,
    variance: str = "fixed_small",
    clip_x0: float | None = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_{t-1} from x_t: one ancestral step via x0_pred and the posterior mean (DDPM, Alg. 2).

    `noise` (shaped like x_t) is drawn from `generator` when None; none is added where t == 0.
    """
    return _ddpm_step(schedule, x_t, eps, t, noise, variance, clip_x0, generator)[0]


def _check_x_T(x_T: torch.Tensor) -> None:
    """The starting noise: a floating-point tensor with a batch dimension, every value finite (a
    NaN or inf here spreads to every later step and comes out as a blank image)."""
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point() or x_T.ndim < 2:
        what = f"{x_T.dtype} {tuple(x_T.shape)}" if isinstance(x_T, torch.Tensor) else type(x_T)
        raise ValueError(
            f"x_T must be a floating-point tensor (B, C, H, W) of noise, got {what}; "
            "draw it with torch.randn(..., generator=...)"
        )
    if not bool(torch.isfinite(x_T).all()):
        bad = int((~torch.isfinite(x_T)).sum())
        raise ValueError(
            f"x_T has {bad} non-finite value(s) (NaN or inf) of {x_T.numel()}; the sampler needs "
            "finite noise: draw it with torch.randn, or check what produced it"
        )


def _check_sequence(schedule: NoiseSchedule, timesteps: Sequence[int] | torch.Tensor) -> list[int]:
    """The timesteps a sampler visits as a list of ints: 1-D, strictly descending, in [0, T-1]."""
    ts = torch.as_tensor(timesteps)
    if ts.ndim != 1 or ts.numel() == 0 or ts.is_floating_point() or ts.dtype == torch.bool:
        raise ValueError(
            f"timesteps must be a non-empty 1-D sequence of ints (e.g. ddim_timesteps(T, 50)), "
            f"got {timesteps!r}"
        )
    ts = schedule.check_timesteps(ts)
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(
            f"timesteps must run from noisy to clean (strictly descending), got {ts.tolist()}"
        )
    return ts.tolist()


def ddpm_timesteps(num_train_timesteps: int, start: int | None = None) -> torch.Tensor:
    """T-1, T-2, ..., 0: every step, as ancestral sampling needs (or start, ..., 0 to begin part
    way, from a partly noised image)."""
    T = num_train_timesteps
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {T!r}")
    start = T - 1 if start is None else start
    if not isinstance(start, int) or not 0 <= start < T:
        raise ValueError(f"start must be an int in [0, {T - 1}], got {start!r}")
    return torch.arange(start, -1, -1)


@torch.no_grad()
def sample_ddpm(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int] | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    variance: str = "fixed_small",
    clip_x0: float | None = 1.0,
) -> torch.Tensor:
    """Ancestral sampling, t = timesteps[0], ..., 0 one step at a time (Ho et al. 2020, Alg. 2).

    `ddpm_timesteps(T)` gives all T steps. Each step goes to t - 1; for fewer steps use
    `sample_ddim` with eta = 1, which is DDPM's posterior between the steps it visits.
    """
    _check_choice("variance", variance, VARIANCES)
    _check_clip(clip_x0)
    _check_x_T(x_T)
    ts = _check_sequence(schedule, timesteps)
    if ts[-1] != 0 or any(a - b != 1 for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError(
            f"DDPM steps through every timestep down to 0 (see ddpm_timesteps), got "
            f"{ts[:3]}...{ts[-1:]}; for fewer steps use sample_ddim with eta=1"
        )
    x = x_T
    for i, t in enumerate(progress_bar(ts, progress, desc="DDPM")):
        eps, t_batch = _call_eps_fn(eps_fn, x, t)
        noise = _randn_like(x, generator) if t > 0 else None
        x_prev, x0_pred = _ddpm_step(
            schedule, x, eps, t_batch, noise, variance, clip_x0, None, checked=True, last=t == 0
        )
        if callback is not None:
            callback({"i": i, "t": t, "x_t": x, "x0_pred": x0_pred, "eps": eps, "x_prev": x_prev})
        x = x_prev
    return x


# ----- DDIM -----------------------------------------------------------------------------------
def ddim_timesteps(
    num_train_timesteps: int,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    """Descending (num_steps,) timesteps as diffusers' DDIM (spacings of Lin et al. 2023, tab. 2).

    Like diffusers, only "leading" adds `steps_offset` (SD v1 uses SD_V1_STEPS_OFFSET).
    """
    _check_choice("spacing", spacing, SPACINGS)
    T = num_train_timesteps
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {T!r}")
    if not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(
            f"num_steps must be an int in [1, {T}] (the schedule's training steps), got "
            f"{num_steps!r}; pick fewer sampling steps"
        )
    if not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative int, got {steps_offset!r}")
    # NumPy, as in diffusers: its float rounding decides ties like 499.5 (torch's can differ).
    if spacing == "leading":  # ..., 2k, k, 0 with k = T // n: may never reach T-1
        timesteps = np.arange(num_steps)[::-1] * (T // num_steps) + steps_offset
    elif spacing == "trailing":  # T-1, T-1-k, ...: always starts at the noisiest step
        # [:num_steps]: the float step sometimes adds a last value near 0 (T=17, n=7 gives 8).
        timesteps = np.round(np.arange(T, 0, -T / num_steps)[:num_steps]) - 1
    else:  # "linspace": both ends, 0 and T-1, included
        timesteps = np.linspace(0, T - 1, num_steps).round()[::-1]
    timesteps = torch.from_numpy(timesteps.astype(np.int64))
    if timesteps[0] >= T:
        raise ValueError(
            f"leading spacing with steps_offset={steps_offset} reaches t={timesteps[0].item()}, "
            f"past the last timestep {T - 1}; use fewer than {num_steps} steps or steps_offset=0"
        )
    return timesteps


def _ddim_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    eta: float,
    noise: torch.Tensor | None,
    clip_x0: float | None,
    final_alpha_cumprod: float | None,
    generator: torch.Generator | None,
    checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step; returns (x_{t_prev}, x0_pred). checked: as for `_ddpm_step`."""
    if not checked:
        _check_eta(eta)
        _check_clip(clip_x0)
        _check_final_alpha_cumprod(final_alpha_cumprod)
        _check_like("eps", eps, x_t)
        t = schedule.check_timesteps(t, batch=x_t.shape[0])
        t_prev = torch.as_tensor(t_prev).to(t.device)
        if t_prev.is_floating_point() or t_prev.shape not in ((), t.shape) or (t_prev >= t).any():
            raise ValueError(
                f"t_prev must be an integer scalar or shape {tuple(t.shape)} below t (a step "
                f"towards less noise; negative for the final step), got {t_prev.tolist()} for "
                f"t={t.tolist()}"
            )
    device = x_t.device
    t, t_prev = t.to(device), t_prev.to(device).long()
    ab = schedule.table("alphas_cumprod", device)
    final = (
        ab[0]
        if final_alpha_cumprod is None
        else torch.tensor(final_alpha_cumprod, dtype=ab.dtype, device=device)
    )
    ab_t = ab[t]
    ab_prev = torch.where(t_prev >= 0, ab[t_prev.clamp(min=0)], final)
    # DDIM eq. 16: eta = 1 gives the DDPM posterior variance between t and t_prev.
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
    x0_pred = _predict_x0(schedule, x_t, eps, t, clip_x0)
    # eta > 1 can push 1 - ab_prev - sigma^2 below 0; the direction term then vanishes.
    dir_coef = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
    # DDIM eq. 12: predicted x0, "direction pointing to x_t", random noise.
    x_prev = _per_sample(ab_prev.sqrt(), x_t) * x0_pred + _per_sample(dir_coef, x_t) * eps
    if eta > 0:
        if noise is None:
            noise = _randn_like(x_t, generator)
        if not checked:
            _check_like("noise", noise, x_t)
        x_prev = x_prev + _per_sample(sigma, x_t) * noise
    return x_prev, x0_pred


@torch.no_grad()
def ddim_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_x0: float | None = None,
    final_alpha_cumprod: float | None = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_{t_prev} from x_t by DDIM's generalized step (Song et al. 2021, eq. 12).

    t_prev < 0 is the final step to alpha-bar = `final_alpha_cumprod`: 1.0 is diffusers'
    set_alpha_to_one=True; None uses alphas_cumprod[0], i.e. set_alpha_to_one=False (SD v1).
    """
    return _ddim_step(
        schedule, x_t, eps, t, t_prev, eta, noise, clip_x0, final_alpha_cumprod, generator
    )[0]


@torch.no_grad()
def sample_ddim(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int] | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 0.0,
    final_alpha_cumprod: float | None = 1.0,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """DDIM sampling over descending `timesteps`, e.g. ddim_timesteps(T, 50) (Song et al. 2021,
    eq. 12). Each step goes to the next timestep; the last to alpha-bar = final_alpha_cumprod."""
    _check_eta(eta)
    _check_clip(clip_x0)
    _check_final_alpha_cumprod(final_alpha_cumprod)
    _check_x_T(x_T)
    ts = _check_sequence(schedule, timesteps)
    x = x_T
    t_prevs = ts[1:] + [-1]
    # checked once here; the steps' targets live on the sampling device (no copy per step)
    t_prevs_on_device = torch.tensor(t_prevs, device=x.device)
    steps = list(zip(ts, t_prevs, strict=True))
    for i, (t, t_prev) in enumerate(progress_bar(steps, progress, desc="DDIM")):
        eps, t_batch = _call_eps_fn(eps_fn, x, t)
        noise = _randn_like(x, generator) if eta > 0 else None
        x_prev, x0_pred = _ddim_step(
            schedule, x, eps, t_batch, t_prevs_on_device[i], eta, noise, clip_x0,
            final_alpha_cumprod, None, checked=True,
        )  # fmt: skip
        if callback is not None:
            callback(
                {
                    "i": i,
                    "t": t,
                    "t_prev": t_prev,
                    "x_t": x,
                    "x0_pred": x0_pred,
                    "eps": eps,
                    "x_prev": x_prev,
                }
            )
        x = x_prev
    return x


# ----- DPM-Solver++(2M) -------------------------------------------------------------------------
def dpm_solver_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "linspace", steps_offset: int = 0
) -> torch.Tensor:
    """Descending (num_steps,) timesteps as diffusers' DPMSolverMultistepScheduler chooses them.

    Its last step goes to the clean sample (sigma = 0), so "linspace" and "leading" lay out
    num_steps + 1 points as DDIM would and drop the cleanest one; "trailing" is DDIM's.
    """
    if spacing == "trailing":
        return ddim_timesteps(num_train_timesteps, num_steps, spacing)
    if not isinstance(num_steps, int) or not 1 <= num_steps < num_train_timesteps:
        raise ValueError(
            f"num_steps must be an int in [1, {num_train_timesteps - 1}] for {spacing} spacing, "
            f"got {num_steps!r}; pick fewer sampling steps"
        )
    return ddim_timesteps(num_train_timesteps, num_steps + 1, spacing, steps_offset)[:-1]


@torch.no_grad()
def sample_dpm_solver(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int] | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    order: int = 2,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """DPM-Solver++ (Lu et al. 2022), multistep, of order 1 or 2 ("2M"): about as good in 20
    steps as DDIM in 50. `dpm_solver_timesteps(T, 20)` gives diffusers' default steps.

    The probability-flow ODE is solved in lambda = log(alpha / sigma) (alpha = sqrt(ab),
    sigma = sqrt(1 - ab)), where its linear part is exact: from x_s to x_t with h = lambda_t -
    lambda_s,  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D,  where D is the predicted
    x0 (order 1: exactly DDIM's step) or, order 2, the x0 prediction extrapolated along lambda
    with the previous step's, D = x0 + (x0 - x0_prev) h / (2 h_prev) (the "midpoint" form of
    diffusers). The first step has no previous prediction and the last one, to sigma = 0, needs
    none: both are first order. No randomness: `generator` is accepted for the one signature.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2 (DPM-Solver++ 1 is DDIM; 2M), got {order!r}")
    _check_clip(clip_x0)
    _check_x_T(x_T)
    ts = _check_sequence(schedule, timesteps)
    ab = schedule.alphas_cumprod.to(torch.float64)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = alpha.log() - sigma.log()  # log signal-to-noise ratio / 2, rising towards t = 0
    x, x0_prev, h_prev = x_T, None, None
    for i, t in enumerate(progress_bar(ts, progress, desc=f"DPM++{order}M")):
        eps, t_batch = _call_eps_fn(eps_fn, x, t)
        x0_pred = _predict_x0(schedule, x, eps, t_batch, clip_x0)
        if i == len(ts) - 1:  # to sigma = 0: e^{-h} = 0, so x_t = D = x0_pred
            x_prev, h = x0_pred, None
        else:
            s, t_next = t, ts[i + 1]
            h = (lam[t_next] - lam[s]).item()
            d = x0_pred
            if order == 2 and x0_prev is not None:
                d = x0_pred + (x0_pred - x0_prev) * (h / (2 * h_prev))
            ratio, coef = (sigma[t_next] / sigma[s]).item(), (alpha[t_next] * math.expm1(-h)).item()
            x_prev = ratio * x - coef * d
        if callback is not None:
            callback({"i": i, "t": t, "x_t": x, "x0_pred": x0_pred, "eps": eps, "x_prev": x_prev})
        x, x0_prev, h_prev = x_prev, x0_pred, h
    return x


# ----- the one list of samplers, and one choice of sampler and options --------------------------
Sampler = Callable[..., torch.Tensor]
SAMPLERS: dict[str, Sampler] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpm++2m": sample_dpm_solver,
}


@dataclass(frozen=True)
class SamplerConfig:
    """One way to sample: the sampler, its number of steps, how they are spaced, its options.

    A model carries one (`DiffusionModel.sampler`); pixel models clip x0 to the data range
    [-1, 1], latent models do not (latents are unbounded). `steps` counts network evaluations:
    DDPM always takes all T. Options a sampler does not have are ignored by it.
    """

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0  # DDIM: 0 deterministic, 1 DDPM's posterior between the visited steps
    spacing: str = "leading"  # DDIM, DPM++: which `steps` of the T timesteps (ddim_timesteps)
    steps_offset: int = 0
    final_alpha_cumprod: float | None = 1.0  # DDIM's last step; None: alphas_cumprod[0] (SD v1)
    clip_x0: float | None = None
    variance: str = "fixed_small"  # DDPM

    def __post_init__(self) -> None:
        _check_choice("sampler", self.sampler, tuple(SAMPLERS))
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        _check_eta(self.eta)
        _check_choice("spacing", self.spacing, SPACINGS)
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative int, got {self.steps_offset!r}")
        _check_final_alpha_cumprod(self.final_alpha_cumprod)
        _check_clip(self.clip_x0)
        _check_choice("variance", self.variance, VARIANCES)

    @property
    def name(self) -> str:
        """e.g. "DDIM-50", "DDIM-20 eta=0.5", "DDPM-1000", "DPM++2M-20"."""
        return f"{self.sampler.upper()}-{self.steps}" + (f" eta={self.eta:g}" if self.eta else "")

    def timesteps(self, num_train_timesteps: int) -> torch.Tensor:
        if self.sampler == "ddpm":
            if self.steps != num_train_timesteps:
                raise ValueError(
                    f"DDPM runs all {num_train_timesteps} steps, got {self.steps}; "
                    f"for fewer steps use DDIM (eta=1 is DDPM-like)"
                )
            return ddpm_timesteps(num_train_timesteps)
        if self.sampler == "dpm++2m":
            return dpm_solver_timesteps(
                num_train_timesteps, self.steps, self.spacing, self.steps_offset
            )
        return ddim_timesteps(num_train_timesteps, self.steps, self.spacing, self.steps_offset)

    def options(self) -> dict[str, Any]:
        """The keyword options of this config's sampler function."""
        if self.sampler == "ddpm":
            return {"variance": self.variance, "clip_x0": self.clip_x0}
        if self.sampler == "dpm++2m":
            return {"order": 2, "clip_x0": self.clip_x0}
        return {
            "eta": self.eta,
            "final_alpha_cumprod": self.final_alpha_cumprod,
            "clip_x0": self.clip_x0,
        }

    def sample(
        self,
        eps_fn: EpsFn,
        x_T: torch.Tensor,
        schedule: NoiseSchedule,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = False,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run this config's sampler from x_T over its timesteps (or the given ones: the tail
        of them starts part-way down, as image-to-image does)."""
        if timesteps is None:
            timesteps = self.timesteps(schedule.num_timesteps)
        return SAMPLERS[self.sampler](
            eps_fn, x_T, schedule, timesteps,
            generator=generator, callback=callback, progress=progress, **self.options(),
        )  # fmt: skip


# Stable Diffusion v1's DDIM settings (its scheduler config): leading spacing shifted by one,
# the last step to alphas_cumprod[0] (set_alpha_to_one=False), no clipping of latents.
SD_V1_SAMPLER = SamplerConfig(
    "ddim", 50, steps_offset=SD_V1_STEPS_OFFSET, final_alpha_cumprod=None, clip_x0=None
)
