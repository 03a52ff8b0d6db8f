"""Conditioning as an interface: what a condition is, and how it reaches the U-Net.

A conditioner turns a batch of conditions (class labels now; text and images in lessons 04-06)
into the U-Net's keyword arguments, gives the "null" condition (no condition at all, which
classifier-free guidance contrasts with the real one), and drops conditions to null during
training so one network learns both p(x | c) and p(x) (Ho & Salimans 2022).

    conditioner = conditioner_for(unet)              # None for an unconditional U-Net
    kwargs = conditioner.model_kwargs(labels)        # {"y": labels}
    eps = unet(x_t, t, **kwargs)

Training (`diffusion_loss_fn`) and sampling (`DiffusionModel.sample`) both go through it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class Conditioner(Protocol):
    """What training and sampling need to know about a kind of condition."""

    def batch(self, cond: Any, n: int, device: torch.device | str) -> torch.Tensor:
        """n conditions as one tensor: None is the null condition for all n."""
        ...

    def model_kwargs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The U-Net's keyword arguments for a batch of conditions."""
        ...

    def drop(self, batch: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        """The batch with each condition replaced by the null one with probability p."""
        ...


class ClassConditioner:
    """Class labels 0..num_classes-1 as the U-Net's `y`; label num_classes is the null class.

    ldm's class-conditional models embed the label and add it to the timestep embedding; the
    extra row of `UNetModel.label_emb` is the learned embedding of "no label".
    """

    def __init__(self, num_classes: int) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes

    @property
    def null_label(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        return f"ClassConditioner(num_classes={self.num_classes})"

    def batch(self, cond: Any, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n,) long labels from None (all null), one label for all, or n labels."""
        if cond is None:
            return torch.full((n,), self.null_label, dtype=torch.long, device=device)
        labels = torch.as_tensor(cond, device=device)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"class labels must be integers, got dtype {labels.dtype}")
        labels = labels.long()
        if labels.ndim == 0:
            labels = labels.expand(n)
        if labels.shape != (n,):
            raise ValueError(f"need one label or {n} labels, got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_label):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes - 1}] (or {self.null_label}, the null "
                f"class), got range [{labels.min().item()}, {labels.max().item()}]"
            )
        return labels

    def model_kwargs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": batch}

    def drop(self, batch: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        if not p:
            return batch
        dropped = torch.rand(batch.shape, generator=generator, device=batch.device) < p
        return torch.where(dropped, torch.full_like(batch, self.null_label), batch)


def conditioner_for(unet: nn.Module) -> Conditioner | None:
    """The conditioner a U-Net's config asks for: class labels if num_classes, else None."""
    config = getattr(unet, "config", None)
    num_classes = getattr(config, "num_classes", None)
    return None if num_classes is None else ClassConditioner(num_classes)
