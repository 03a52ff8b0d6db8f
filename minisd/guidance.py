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

Classifier guidance (Dhariwal & Nichol 2021), the idea classifier-free guidance replaced, steers
an unconditional model with the gradient of a classifier trained on noisy inputs,
p(y | x_t, t) (`NoisyClassifier`): the score of p(x_t | y) is the model's score plus
grad log p(y | x_t), so in noise-prediction form

    eps = eps_u - s * sqrt(1 - alpha-bar_t) * grad_x log p_phi(y | x_t, t)     (their eq. 14)

`classifier_guidance` wraps an eps_fn that way; it needs a second network and a backward pass
through it at every step, and its gradient can raise the classifier's belief without making
the image look more like the class, which is why classifier-free guidance replaced it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minisd.conditioning import ClassConditioner
from minisd.pretrained import DiffusionModel
from minisd.sampling import EpsFn
from minisd.schedule import NoiseSchedule
from minisd.unet import Downsample, ResBlock, timestep_embedding

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

    # the conditions do not change between steps: batched once, not at every step
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond} if scale not in (0.0, 1.0) else {}

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1.0:
            return model_fn(x, t, **cond)
        if scale == 0.0:
            return model_fn(x, t, **uncond)
        eps_u, eps_c = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)  # (2B, ...)
        return eps_u + scale * (eps_c - eps_u)

    return eps_fn


# ----- classifier guidance ------------------------------------------------------------------------
@dataclass(frozen=True)
class NoisyClassifierConfig:
    """A noise-aware classifier: the U-Net's encoder half (ResBlocks reading the timestep
    embedding, downsampling between levels), then GroupNorm, global average pooling, a linear
    layer (ADM's EncoderUNetModel, pooled "adaptive", at MNIST-latent size)."""

    in_channels: int = 4
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    num_classes: int = 10
    norm_groups: int = 8

    def __post_init__(self) -> None:
        widths = [self.model_channels * m for m in self.channel_mult]
        if min(self.in_channels, self.num_classes, self.num_res_blocks, *widths) < 1 or any(
            w % self.norm_groups for w in widths
        ):
            raise ValueError(f"every width must be >= 1 and divide by norm_groups, got {self}")


class NoisyClassifier(nn.Module):
    """log p(y | x_t, t) for noisy inputs x_t at timestep t: logits (B, num_classes)."""

    def __init__(self, config: NoisyClassifierConfig = NoisyClassifierConfig()) -> None:
        super().__init__()
        self.config = cfg = config
        ch, emb = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.stem = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        blocks: list[nn.Module] = []
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, emb, out_channels=cfg.model_channels * mult,
                                       norm_groups=cfg.norm_groups))  # fmt: skip
                ch = cfg.model_channels * mult
            if level < len(cfg.channel_mult) - 1:
                blocks.append(Downsample(ch))
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(ch, cfg.num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected x_t of shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return self.out(h)


def noisy_classifier_loss_fn(schedule: NoiseSchedule):
    """A `fit` loss for batches (x0, labels): noise x0 to a uniformly drawn t, then the cross
    entropy of the classifier's logits for x_t at t."""

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...], gen: torch.Generator):
        x0, labels = batch
        t = torch.randint(0, schedule.num_timesteps, (len(x0),), generator=gen,
                          device=gen.device).to(x0.device)  # fmt: skip
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0)
        return F.cross_entropy(model(schedule.add_noise(x0, noise, t), t), labels.long())

    return loss_fn


def classifier_guidance(
    eps_fn: EpsFn,
    classifier: nn.Module,
    labels: torch.Tensor,
    scale: float,
    schedule: NoiseSchedule,
) -> EpsFn:
    """eps_fn(x, t) - scale * sqrt(1 - alpha-bar_t) * grad_x log p(labels | x, t): an
    unconditional model steered by a noise-aware classifier (Dhariwal & Nichol 2021, eq. 14).
    Scale 0 is the model itself. The classifier's gradient is taken even inside the samplers'
    no_grad."""
    scale = check_scale(scale)
    labels = torch.as_tensor(labels).long()

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = eps_fn(x, t)
        if scale == 0.0:
            return eps
        if labels.shape != (len(x),):
            raise ValueError(f"need one label per sample ({len(x)}), got {tuple(labels.shape)}")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
            chosen = log_probs.gather(1, labels.to(x.device)[:, None]).sum()
            grad = torch.autograd.grad(chosen, x_in)[0]
        ab = schedule.table("alphas_cumprod", x.device)[t].to(x.dtype)
        return eps - scale * (1 - ab).sqrt().view(-1, *[1] * (x.ndim - 1)) * grad

    return guided


@dataclass
class ClassifierGuided(DiffusionModel):
    """A `DiffusionModel` whose conditions are class labels drawn by classifier guidance: the
    wrapped model's unconditional prediction (its null condition, e.g. the empty prompt)
    steered by `classifier` at `classifier_scale`. Build one with `with_classifier_guidance`."""

    classifier: nn.Module | None = None
    classifier_scale: float = 1.0
    base_conditioner: Any = None  # the wrapped model's conditioner, for its null condition

    def guided_eps_fn(self, cond: Any, n: int, scale: float = 1.0, negative: Any = None) -> EpsFn:
        if check_scale(scale) != 1.0 or negative is not None:
            raise ValueError("a classifier-guided model has its own scale (classifier_scale); "
                             "pass no guidance_scale or negative")  # fmt: skip
        base = self.base_conditioner
        null = {} if base is None else base.model_kwargs(base.batch(None, n, self.device))
        eps_fn = self.eps_fn(**null)
        labels = self.conditioner.batch(cond, n, self.device)
        if bool((labels == self.conditioner.null_label).all()):  # no label: unconditional
            return eps_fn
        if bool((labels == self.conditioner.null_label).any()):
            raise ValueError("classifier guidance needs a label 0-9 for every sample")
        return classifier_guidance(eps_fn, self.classifier, labels, self.classifier_scale,
                                   self.schedule)  # fmt: skip


def with_classifier_guidance(
    model: DiffusionModel, classifier: nn.Module, scale: float
) -> ClassifierGuided:
    """`model` drawing labels 0-9 by classifier guidance at `scale`: `generate(guided, n,
    cond=labels)`. The classifier reads the U-Net's inputs (latents for a latent model)."""
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    return ClassifierGuided(**{**fields, "conditioner": ClassConditioner(10)},
                            classifier=classifier.eval(), classifier_scale=check_scale(scale),
                            base_conditioner=model.conditioner)  # fmt: skip
