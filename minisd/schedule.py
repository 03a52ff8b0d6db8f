"""Noise schedules and the forward process q(x_t | x_0) (Ho et al. 2020, DDPM).

Notation (paper -> code), with t counted from 0 as in diffusers and the ldm code:
    beta_t            -> betas[t]
    alpha_t = 1-beta_t -> alphas[t]
    alpha-bar_t        -> alphas_cumprod[t]      (product of alphas[0..t])
    SNR(t)             -> alphas_cumprod / (1 - alphas_cumprod)
    x_t                -> sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps      (DDPM eq. 4)
    q(x_{t-1}|x_t,x_0) -> N(posterior_mean, posterior_variance)                  (DDPM eqs. 6-7)
"""

from __future__ import annotations

import math
from typing import Literal

import torch

ScheduleKind = Literal["linear", "scaled_linear", "cosine", "sigmoid"]
SCHEDULE_KINDS: tuple[str, ...] = ("linear", "scaled_linear", "cosine", "sigmoid")

# Default beta ranges. DDPM used 1e-4..0.02 over 1000 steps; Stable Diffusion v1 uses
# 0.00085..0.012, but "linear in sqrt(beta)" (ldm calls this "linear"; diffusers "scaled_linear").
DEFAULT_BETA_RANGE: dict[str, tuple[float, float]] = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "sigmoid": (1e-4, 0.02),
}
# Nichol & Dhariwal clip cosine betas at 0.999 so the last step is not a division by zero.
COSINE_MAX_BETA = 0.999
# Nichol & Dhariwal's offset s, so that beta_0 is not vanishingly small.
COSINE_OFFSET = 0.008
# The sigmoid schedule squashes linspace(-6, 6): GeoDiff's (Xu et al. 2022), as diffusers has it.
SIGMOID_RANGE = 6.0
# Names diffusers' DDPMScheduler uses for the same schedules (for parity tests and loading).
DIFFUSERS_NAMES: dict[str, str] = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "sigmoid": "sigmoid",
}


def make_betas(
    kind: str,
    num_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
) -> torch.Tensor:
    """Return the float64 betas of a named schedule (shape (T,))."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
    if kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule has no beta range; leave beta_start/end as None")
        return _cosine_betas(num_timesteps)
    default_start, default_end = DEFAULT_BETA_RANGE[kind]
    start = default_start if beta_start is None else float(beta_start)
    end = default_end if beta_end is None else float(beta_end)
    if not (0.0 < start < 1.0 and 0.0 < end < 1.0):
        raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {start} and {end}")
    if kind == "linear":
        return torch.linspace(start, end, num_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        # Linear in sqrt(beta): ldm's (and so SD's) "linear" schedule.
        return torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64) ** 2
    ramp = torch.linspace(-SIGMOID_RANGE, SIGMOID_RANGE, num_timesteps, dtype=torch.float64)
    return torch.sigmoid(ramp) * (end - start) + start


def _cosine_betas(num_timesteps: int) -> torch.Tensor:
    """Betas whose alpha-bar follows cos^2 (Nichol & Dhariwal 2021, eq. 17)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), COSINE_MAX_BETA)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha-bar) so the last step is pure noise (Lin et al. 2023, alg. 1)."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """A discrete variance schedule and the closed-form forward process it defines.

    Tables are kept in float64 (cumulative products of 1000 numbers lose digits in float32)
    and cast to the input's dtype when used.
    """

    def __init__(
        self,
        kind: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        zero_terminal_snr: bool = False,
    ) -> None:
        betas = make_betas(kind, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.kind = kind
        self.zero_terminal_snr = zero_terminal_snr
        # The range asked for (before any rescaling): what rebuilds this schedule (`to_dict`).
        default = DEFAULT_BETA_RANGE.get(kind, (None, None))
        self.beta_start = default[0] if beta_start is None else float(beta_start)
        self.beta_end = default[1] if beta_end is None else float(beta_end)
        self._set_betas(betas)

    def to_dict(self) -> dict:
        """What rebuilds this schedule (`from_dict`): its arguments, or a custom one's betas."""
        if self.kind == "custom":
            return {"kind": "custom", "betas": self.betas.tolist()}
        return {
            "kind": self.kind,
            "num_timesteps": self.num_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "zero_terminal_snr": self.zero_terminal_snr,
        }

    @classmethod
    def from_dict(cls, d: dict) -> NoiseSchedule:
        """The schedule `to_dict` describes (as stored in a checkpoint's metadata)."""
        if d.get("kind") == "custom":
            return cls.from_betas(d["betas"])
        # Files from before to_dict stored betas[0] and betas[-1] for the cosine schedule too.
        no_range = d["kind"] == "cosine"
        return cls(
            d["kind"],
            d["num_timesteps"],
            None if no_range else d.get("beta_start"),
            None if no_range else d.get("beta_end"),
            zero_terminal_snr=d.get("zero_terminal_snr", False),
        )

    @classmethod
    def from_betas(cls, betas: torch.Tensor | list[float]) -> NoiseSchedule:
        """Build a schedule from explicit betas (each in (0, 1]; 1 only at the last step)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(
                f"betas must be a 1-D sequence of >= 2 values, got {tuple(betas.shape)}"
            )
        self = cls.__new__(cls)
        self.kind = "custom"
        self.beta_start = self.beta_end = None
        self.zero_terminal_snr = bool(betas[-1] == 1)
        self._set_betas(betas)
        return self

    def _set_betas(self, betas: torch.Tensor) -> None:
        inner_ok = bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all())
        # A zero-terminal-SNR schedule ends with beta = 1 exactly: alpha-bar_T = 0.
        last_ok = bool(0 < betas[-1] <= 1)
        if not (inner_ok and last_ok) or not torch.isfinite(betas).all():
            raise ValueError(
                f"betas must lie in (0, 1), got min {betas.min().item():.3g}, "
                f"max {betas.max().item():.3g}; check beta_start/beta_end"
            )
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat(
            [torch.ones(1, dtype=betas.dtype), self.alphas_cumprod[:-1]]
        )
        # DDPM eq. 7: variance and mean coefficients of q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef1 = (
            betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)
        )
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def table(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """A table (e.g. "alphas_cumprod") on `device`, copied there once and kept: float64, or
        float32 where the device has no float64 (Apple's MPS)."""
        device = torch.device(device)
        key = (name, device)
        if key not in self._on_device:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._on_device[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._on_device[key]

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def __repr__(self) -> str:
        extra = ", zero_terminal_snr=True" if self.zero_terminal_snr else ""
        return (
            f"NoiseSchedule({self.kind!r}, T={self.num_timesteps}, "
            f"beta={self.betas[0].item():.3g}..{self.betas[-1].item():.3g}{extra})"
        )

    # ----- validation helpers -------------------------------------------------------------
    def check_timesteps(self, t: torch.Tensor | int, batch: int | None = None) -> torch.Tensor:
        """Return t as a long tensor, checking it is integral, in [0, T-1] and fits the batch."""
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(
                f"timesteps must be integers in [0, {self.num_timesteps - 1}], got dtype {t.dtype}"
            )
        t = t.long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps - 1}] for this "
                f"{self.num_timesteps}-step "
                f"schedule, got range [{t.min().item()}, {t.max().item()}]"
            )
        if batch is not None and t.ndim > 0 and t.shape != (batch,):
            raise ValueError(
                f"timesteps must be a scalar or shape ({batch},) to match the batch, "
                f"got {tuple(t.shape)}"
            )
        if t.ndim > 1:
            raise ValueError(f"timesteps must be a scalar or 1-D, got shape {tuple(t.shape)}")
        return t

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped (B, 1, 1, ...) to broadcast over `like`, in its dtype and device."""
        values = self.table(name, like.device)[t.to(like.device)]
        return values.to(like.dtype).reshape(values.shape + (1,) * (like.ndim - values.ndim))

    # ----- the forward process -----------------------------------------------------------
    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """Signal-to-noise ratio alpha-bar_t / (1 - alpha-bar_t) (float64)."""
        t = self.check_timesteps(t)
        ab = self.alphas_cumprod[t]
        return ab / (1 - ab)

    def log_snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """log SNR(t); -inf at a zero-terminal-SNR step."""
        return self.snr(t).log()

    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int
    ) -> torch.Tensor:
        """Sample q(x_t | x_0) in closed form: sqrt(ab_t) x0 + sqrt(1 - ab_t) noise (DDPM eq. 4)."""
        if noise.shape != x0.shape:
            raise ValueError(
                f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}"
            )
        if x0.ndim < 1:
            raise ValueError("x0 must have a batch dimension")
        t = self.check_timesteps(t, batch=x0.shape[0])
        sqrt_ab = self._gather("sqrt_alphas_cumprod", t, x0)
        sqrt_one_minus_ab = self._gather("sqrt_one_minus_alphas_cumprod", t, x0)
        return sqrt_ab * x0 + sqrt_one_minus_ab * noise

    def add_noise_step(
        self, x_prev: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int
    ) -> torch.Tensor:
        """One forward step q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (eq. 2)."""
        if noise.shape != x_prev.shape:
            raise ValueError(
                f"noise must have the shape of x_prev {tuple(x_prev.shape)}, "
                f"got {tuple(noise.shape)}"
            )
        t = self.check_timesteps(t, batch=x_prev.shape[0])
        beta = self._gather("betas", t, x_prev)
        return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise

    def velocity(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int
    ) -> torch.Tensor:
        """The v-prediction target sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)."""
        if noise.shape != x0.shape:
            raise ValueError(
                f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}"
            )
        t = self.check_timesteps(t, batch=x0.shape[0])
        sqrt_ab = self._gather("sqrt_alphas_cumprod", t, x0)
        sqrt_one_minus_ab = self._gather("sqrt_one_minus_alphas_cumprod", t, x0)
        return sqrt_ab * noise - sqrt_one_minus_ab * x0

    # ----- what the reverse process needs ------------------------------------------------
    def predict_x0(
        self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int
    ) -> torch.Tensor:
        """Invert eq. 4 for x_0 given a noise estimate: (x_t - sqrt(1 - ab) eps) / sqrt(ab)."""
        return self._predict_x0(x_t, eps, self.check_timesteps(t, batch=x_t.shape[0]))

    def _predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """predict_x0 for a t already checked (the samplers check theirs once per call)."""
        sqrt_ab = self._gather("sqrt_alphas_cumprod", t, x_t)
        sqrt_one_minus_ab = self._gather("sqrt_one_minus_alphas_cumprod", t, x_t)
        return (x_t - sqrt_one_minus_ab * eps) / sqrt_ab

    def posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance (shaped (B, 1, ...)) of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7)."""
        if x0.shape != x_t.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and x_t {tuple(x_t.shape)} must have one shape")
        t = self.check_timesteps(t, batch=x_t.shape[0])
        return self._posterior_mean(x0, x_t, t), self._gather("posterior_variance", t, x_t)

    def _posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The mean of q(x_{t-1} | x_t, x_0) for a t already checked."""
        return (
            self._gather("posterior_mean_coef1", t, x_t) * x0
            + self._gather("posterior_mean_coef2", t, x_t) * x_t
        )
