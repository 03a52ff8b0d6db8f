"""Course conventions every notebook uses: device, seeding, quick/full profile, progress bars,
and the signature of a loss that `train.fit` trains with."""

from __future__ import annotations

import os
import platform
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

T = TypeVar("T")

# loss_fn(model, batch, generator) -> scalar loss: what `train.fit` calls every step, for the
# diffusion U-Net (diffusion.diffusion_loss_fn) and the autoencoder (vae.vae_loss_fn) alike.
LossFn = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.Generator], torch.Tensor]

PROFILE_ENV = "MINISD_PROFILE"
PROFILES = ("quick", "full")


def get_device(prefer: str | None = None) -> torch.device:
    """The best available device: cuda > mps > cpu, or `prefer` if given (e.g. "cpu")."""
    if prefer is not None:
        try:
            device = torch.device(prefer)
        except RuntimeError as err:
            raise ValueError(f"unknown device {prefer!r}; use cpu, cuda, cuda:N or mps") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("asked for cuda but torch.cuda.is_available() is False; use 'cpu'")
        if device.type == "mps" and not _mps_available():
            raise ValueError("asked for mps but it is not available on this machine; use 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded the same way."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Profile:
    """How much work a notebook does: "quick" (minutes on a laptop CPU) or "full" (a GPU)."""

    name: str

    @property
    def quick(self) -> bool:
        return self.name == "quick"

    def pick(self, quick: T, full: T) -> T:
        """The value for this profile, e.g. `steps = profile.pick(quick=200, full=20_000)`."""
        return quick if self.quick else full


def current_profile() -> Profile:
    """The profile named by $MINISD_PROFILE: "quick" (the default) or "full"."""
    name = os.environ.get(PROFILE_ENV, "quick").strip().lower() or "quick"
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r} is not a profile; set it to one of {PROFILES}")
    return Profile(name)


def progress(iterable: Iterable[T], enabled: bool = True, **kwargs) -> Iterator[T] | Iterable[T]:
    """Wrap a loop in a tqdm.auto bar (a widget in Jupyter, text in a terminal) when enabled."""
    return tqdm(iterable, **kwargs) if enabled else iterable


def hardware() -> dict[str, object]:
    """What a run or timing was measured on, for sidecars: CPU model, threads, torch, GPU."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
