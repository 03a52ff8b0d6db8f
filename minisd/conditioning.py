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

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from minisd.latent import pad_images

if TYPE_CHECKING:  # the text encoders' interface; minisd.text imports transformers lazily
    from minisd.text import TextEncoder


class Conditioner(Protocol):
    """What training and sampling need to know about a kind of condition."""

    def batch(self, cond: Any, n: int, device: torch.device | str) -> torch.Tensor:
        """n conditions as one tensor: None is the null condition for all n. A batch this
        method returned (or a slice of one) passes through unchanged."""
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


class ImageConditioner:
    """An image stacked onto x_t as extra input channels: the U-Net's `concat` (SD's
    inpainting and upscaling models condition this way). The null image is all zeros."""

    def __init__(self, channels: int) -> None:
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels

    def __repr__(self) -> str:
        return f"ImageConditioner(channels={self.channels})"

    def batch(self, cond: Any, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n, channels, H, W) images; one (C, H, W) image is used for all n. None (no image)
        cannot say what size to be: pass zeros of the right shape for the null image."""
        if cond is None:
            raise ValueError(
                "an image condition needs an image: pass torch.zeros(n, C, H, W) for the null one"
            )
        images = torch.as_tensor(cond, device=device)
        if images.ndim == 3:
            images = images.expand(n, *images.shape)
        if images.ndim != 4 or images.shape[:2] != (n, self.channels):
            raise ValueError(
                f"need images of shape ({n}, {self.channels}, H, W) or one ({self.channels}, H, "
                f"W), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point, got {images.dtype}")
        return images

    def model_kwargs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"concat": batch}

    def drop(self, batch: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        if not p:
            return batch
        keep = torch.rand(batch.shape[0], generator=generator, device=batch.device) >= p
        return batch * keep[:, None, None, None].to(batch.dtype)


class TextConditioner(nn.Module):
    """Prompts as the U-Net's cross-attention `context` (and `context_mask`), through a text
    encoder (`minisd.text`); the empty prompt "" is the null condition, as in SD.

    A condition batch is the prompts' token ids, (n, max_length). A frozen encoder's embeddings
    are cached per distinct prompt, so training on a fixed set of captions encodes each once; a
    trainable one (jointly trained, `ConditionedUNet`) runs every time, with gradients.
    """

    def __init__(self, encoder: TextEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"TextConditioner({type(self.encoder).__name__}, dim={self.encoder.dim})"

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.encoder.parameters())

    @property
    def null_ids(self) -> torch.Tensor:
        return self.encoder.tokenize("")  # (1, L)

    def batch(self, cond: Any, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n, L) token ids from None (n empty prompts), one prompt for all, n prompts, or ids
        from an earlier batch."""
        if isinstance(cond, torch.Tensor):
            ids = self.encoder.check_ids(cond)
        elif cond is None:
            ids = self.null_ids
        else:
            ids = self.encoder.tokenize(cond)
        if len(ids) == 1:
            ids = ids.expand(n, -1)
        if len(ids) != n:
            raise ValueError(f"need one prompt or {n} prompts, got {len(ids)}")
        return ids.to(device)

    def model_kwargs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        kwargs = {"context": self.embed(batch)}
        mask = self.encoder.attention_mask(batch)
        if mask is not None:
            kwargs["context_mask"] = mask
        return kwargs

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, L, dim) embeddings of token ids; cached per prompt for a frozen encoder."""
        if self.trainable:
            return self.encoder(ids)
        rows = [tuple(r) for r in ids.tolist()]
        missing = list(dict.fromkeys(r for r in rows if r not in self._cache))
        if missing:
            with torch.no_grad():
                new = self.encoder(torch.tensor(missing, device=ids.device))
            self._cache.update(zip(missing, new, strict=True))
        return torch.stack([self._cache[r] for r in rows]).to(ids.device)

    def drop(self, batch: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        if not p:
            return batch
        dropped = torch.rand(batch.shape[0], generator=generator, device=batch.device) < p
        null = self.null_ids.to(batch.device).expand_as(batch)
        return torch.where(dropped[:, None], null, batch)

    def _apply(self, fn, *args, **kwargs):  # a moved encoder must not serve stale embeddings
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)


class ConditionedUNet(nn.Module):
    """A U-Net and the conditioner it is trained with, as one module, so `fit` trains (and
    averages, and checkpoints) a jointly learned text encoder with the U-Net (ldm's
    cond_stage_trainable). Calls go to the U-Net; `config` is the U-Net's."""

    def __init__(self, unet: nn.Module, conditioner: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner

    @property
    def config(self):
        return self.unet.config

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, **kwargs: Any) -> torch.Tensor:
        return self.unet(x, t, **kwargs)


def conditioner_for(unet: nn.Module) -> Conditioner | None:
    """The conditioner a model carries (`ConditionedUNet`) or its config asks for: an image if
    concat_channels, class labels if num_classes, else None (a text model's conditioner must be
    given: it needs an encoder)."""
    own = getattr(unet, "conditioner", None)
    if own is not None:
        return own
    config = getattr(unet, "config", None)
    if getattr(config, "concat_channels", 0):
        return ImageConditioner(config.concat_channels)
    num_classes = getattr(config, "num_classes", None)
    return None if num_classes is None else ClassConditioner(num_classes)


# ----- the three mechanisms, side by side (notebook 04, `python -m minisd compare-conditioning`) --
MECHANISMS = {
    "class": "class label / adaptive norm",
    "concat": "low-res image / concatenation",
    "minilm": "text / cross-attention, frozen MiniLM",
    "joint": "text / cross-attention, joint encoder",
}


def low_resolution(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """The concatenation mechanism's condition: 28x28 digits padded to 32x32 and averaged over
    factor x factor cells, so (N, 1, 8, 8) for factor 4, aligned with the f=4 latents."""
    if images.ndim != 4 or images.shape[-2:] != (28, 28):
        raise ValueError(f"need MNIST images (N, C, 28, 28), got {tuple(images.shape)}")
    return F.avg_pool2d(pad_images(images, 32), factor)


def mechanism(name: str, base, text_max_length: int | None = None) -> tuple[nn.Module, Any]:
    """The U-Net of one conditioning mechanism, built from the `base` UNetConfig (an
    unconditional one), and its conditioner. A jointly trained encoder comes inside the module
    (`ConditionedUNet`), so training updates both; the others' conditioners stand apart."""
    from minisd.text import (
        TEXT_MAX_LENGTH,
        PretrainedTextEncoder,
        TransformerTextConfig,
        TransformerTextEncoder,
    )
    from minisd.unet import UNetModel

    if name not in MECHANISMS:
        raise ValueError(f"unknown mechanism {name!r}: choose from {sorted(MECHANISMS)}")
    if base.num_classes is not None or base.context_dim is not None or base.concat_channels:
        raise ValueError("base must be an unconditional UNetConfig: each mechanism adds its own")
    length = text_max_length or TEXT_MAX_LENGTH
    if name == "class":
        cfg = dataclasses.replace(base, num_classes=10, use_scale_shift_norm=True)
        return UNetModel(cfg), ClassConditioner(10)
    if name == "concat":
        cfg = dataclasses.replace(base, in_channels=base.in_channels + 1, concat_channels=1)
        return UNetModel(cfg), ImageConditioner(1)
    if name == "minilm":
        encoder = PretrainedTextEncoder(max_length=length)
    else:
        encoder = TransformerTextEncoder(TransformerTextConfig(max_length=length))
    conditioner = TextConditioner(encoder)
    unet = UNetModel(dataclasses.replace(base, context_dim=encoder.dim))
    return (ConditionedUNet(unet, conditioner) if name == "joint" else unet), conditioner


def mechanism_conditions(
    name: str, conditioner: Any, labels: torch.Tensor, images: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """What a mechanism is trained on, one condition per image: its label, its low-resolution
    self, or a caption in a random training phrasing (drawn with `seed`)."""
    from minisd.text import TRAIN_TEMPLATES, random_captions

    if name == "class":
        return conditioner.batch(labels, len(labels))
    if name == "concat":
        return conditioner.batch(low_resolution(images), len(images))
    captions = random_captions(labels, TRAIN_TEMPLATES, torch.Generator().manual_seed(seed))
    return conditioner.batch(captions, len(captions))
