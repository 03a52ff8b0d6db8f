"""Shipped diffusion models: a U-Net's weights plus the schedule and target it was trained with."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minisd.checkpoint import load_json, load_tensors, save_tensors
from minisd.sampling import EpsFn, v_to_eps_fn
from minisd.schedule import NoiseSchedule
from minisd.unet import UNetConfig, UNetModel

CHECKPOINTS = Path(__file__).resolve().parent.parent / "data" / "checkpoints"
FORMAT = "minisd.diffusion/1"


@dataclass
class DiffusionModel:
    """A trained noise predictor and everything needed to sample from it."""

    unet: UNetModel
    schedule: NoiseSchedule
    prediction: str  # "eps" or "v"
    metadata: dict[str, Any]

    def eps_fn(self, **model_kwargs: Any) -> EpsFn:
        """The callable samplers take: eps_theta(x_t, t), whatever the model predicts."""

        @torch.no_grad()
        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.unet(x, t, **model_kwargs)

        return model_fn if self.prediction == "eps" else v_to_eps_fn(model_fn, self.schedule)


def save_diffusion(
    path: str | os.PathLike,
    unet: UNetModel,
    schedule: NoiseSchedule,
    prediction: str,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Save a U-Net's weights (fp16 by default: half the size, same samples) with how to use it."""
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in unet.state_dict().items()}
    meta = {
        "format": FORMAT,
        "unet_config": dataclasses.asdict(unet.config),
        "schedule": {
            "kind": schedule.kind,
            "num_timesteps": schedule.num_timesteps,
            "beta_start": schedule.betas[0].item(),
            "beta_end": schedule.betas[-1].item(),
            "zero_terminal_snr": schedule.zero_terminal_snr,
        },
        "prediction": prediction,
    }
    return save_tensors(path, tensors, meta)


def load_diffusion(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusionModel:
    """Load a model written by `save_diffusion` (or `python -m minisd train --export`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no diffusion checkpoint at {path}; the shipped ones are in {CHECKPOINTS}, and "
            "`python -m minisd train --export PATH` writes new ones"
        )
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a minisd diffusion checkpoint (format {meta.get('format')!r})"
        )
    cfg = meta["unet_config"]
    cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    unet = UNetModel(cfg)
    unet.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    s = meta["schedule"]
    kind = s["kind"]
    betas = (None, None) if kind == "cosine" else (s["beta_start"], s["beta_end"])
    schedule = NoiseSchedule(
        kind, s["num_timesteps"], *betas, zero_terminal_snr=s["zero_terminal_snr"]
    )
    sidecar = path.with_suffix(".json")
    meta["sidecar"] = load_json(sidecar) if sidecar.is_file() else {}
    return DiffusionModel(unet.to(device).eval(), schedule, meta["prediction"], meta)
