"""The benchmarks: minisd beside diffusers at identical weights and inputs.

Each function returns `Case`s (see harness). Models are built once per group and shared by its
cases; the diffusers twin of a minisd U-Net comes through diffusers' own converter
(`minisd.sd.to_diffusers_unet`), so both hold the same numbers. Training twins are copies, so
each optimiser updates its own weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from bench.harness import Case
from minisd import sd as sdmod
from minisd.summary import count_parameters
from minisd.unet import MNIST, SD_V1, UNetConfig, UNetModel

# The shape of the text-to-MNIST model at the width the issue measured: 4x8x8 latents, a 77x64
# context, attention at 8x8 and 4x4, 8.6M parameters.
SMALL_TEXT = UNetConfig(
    in_channels=4, out_channels=4, model_channels=64, num_res_blocks=2,
    attention_resolutions=(1, 2), channel_mult=(1, 2, 2), num_head_channels=32,
    context_dim=64, norm_num_groups=8,
)  # fmt: skip
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _autocast(dtype: str) -> contextlib.AbstractContextManager:
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=DTYPES[dtype])


def _random_unet(config: UNetConfig, seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(config).eval()
    sdmod.perturb_constants(unet, seed)  # every layer in play, as in the parity tests
    return unet


# ----- SD v1 at full size: U-Net forward, autoencoder decode -----------------------------------
def sd_unet_forward(batches=(1, 2), sides=(32, 64), dtypes=("fp32", "bf16")) -> Iterator[Case]:
    ours = _random_unet(SD_V1)
    ref = sdmod.to_diffusers_unet(ours)  # the same tensors under diffusers' names
    gen = torch.Generator().manual_seed(1)
    for dtype in dtypes:
        for side in sides:
            for batch in batches:
                x = torch.randn(batch, 4, side, side, generator=gen)
                t = torch.full((batch,), 601)
                ctx = torch.randn(batch, 77, 768, generator=gen)

                def run_ours(x=x, t=t, ctx=ctx, dtype=dtype):
                    with torch.no_grad(), _autocast(dtype):
                        return ours(x, t, ctx)

                def run_ref(x=x, t=t, ctx=ctx, dtype=dtype):
                    with torch.no_grad(), _autocast(dtype):
                        return ref(x, t, encoder_hidden_states=ctx).sample

                yield Case(
                    f"SD v1 U-Net forward, batch {batch}, {side}x{side} latents, {dtype}",
                    {"minisd": run_ours, "reference": run_ref},
                    note="batch 2 is one guided step" if batch == 2 else "",
                    extra={"parameters": count_parameters(ours)},
                )


def sd_vae_decode(sides=(32, 64)) -> Iterator[Case]:
    from minisd.vae import AutoencoderKL

    torch.manual_seed(0)
    ours = AutoencoderKL(sdmod.SD_VAE).eval()
    sdmod.perturb_constants(ours, 0)
    ref = sdmod.to_diffusers_vae(ours)
    gen = torch.Generator().manual_seed(1)
    for side in sides:
        z = torch.randn(1, 4, side, side, generator=gen)

        def run_ours(z=z):
            with torch.no_grad():
                return ours.decode(z)

        def run_ref(z=z):
            with torch.no_grad():
                return ref.decode(z).sample

        yield Case(
            f"SD v1 autoencoder decode, {side}x{side} latents ({8 * side}x{8 * side} image)",
            {"minisd": run_ours, "reference": run_ref},
            extra={"parameters": count_parameters(ours)},
        )


# ----- training throughput -------------------------------------------------------------------
def _train_step(model: torch.nn.Module, forward: Callable, target: torch.Tensor) -> Callable:
    """One step as `python -m minisd train` takes it: forward, MSE to the noise, backward,
    AdamW (lr 1e-4), gradients set to None between steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward(model), target)
        loss.backward()
        opt.step()
        return loss

    return step


def _diffusers_mnist_unet(config: UNetConfig):
    """diffusers' UNet2DModel at the MNIST preset's widths, attention placement and groups."""
    from diffusers import UNet2DModel

    levels = len(config.channel_mult)
    attends = [2**i in config.attention_resolutions for i in range(levels)]
    return UNet2DModel(
        in_channels=config.in_channels, out_channels=config.out_channels,
        block_out_channels=tuple(config.model_channels * m for m in config.channel_mult),
        layers_per_block=config.num_res_blocks, norm_num_groups=config.norm_num_groups,
        attention_head_dim=config.num_head_channels,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
    )  # fmt: skip


def train_mnist_unet(batch: int = 128) -> Iterator[Case]:
    """The pixel MNIST preset against two references: diffusers' UNet2DConditionModel holding
    the same weights (its attention layers attend to x when given no text, as ldm's do), and
    diffusers' UNet2DModel at the same widths and attention placement, whose attention is a
    single layer without the transformer's feed-forward (so fewer parameters)."""
    ours = _random_unet(MNIST)
    twin = copy.deepcopy(sdmod.to_diffusers_unet(ours))
    torch.manual_seed(0)
    plain = _diffusers_mnist_unet(MNIST)
    n_ours, n_plain = count_parameters(ours), count_parameters(plain)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    target = torch.randn(batch, 1, 28, 28, generator=gen)
    name = f"training step, MNIST preset U-Net (pixels 28x28, batch {batch})"
    yield Case(
        name,
        {"minisd": _train_step(ours, lambda m: m(x, t), target),
         "reference": _train_step(twin, lambda m: m(x, t, encoder_hidden_states=None).sample,
                                  target)},
        unit="img/s", images=batch,
        note="reference: diffusers UNet2DConditionModel, identical weights",
        extra={"parameters": n_ours},
    )  # fmt: skip
    yield Case(
        name + ", against UNet2DModel",
        {"minisd": _train_step(copy.deepcopy(ours), lambda m: m(x, t), target),
         "reference": _train_step(plain, lambda m: m(x, t).sample, target)},
        unit="img/s", images=batch,
        note=f"reference: diffusers UNet2DModel at the same widths and attention placement, "
        f"{n_plain / n_ours - 1:+.0%} parameters (one attention layer, no feed-forward)",
        extra={"parameters": n_ours, "reference_parameters": n_plain},
    )  # fmt: skip


def train_text_unet(batch: int = 64, config: UNetConfig = SMALL_TEXT) -> Iterator[Case]:
    ours = _random_unet(config)
    ref = copy.deepcopy(sdmod.to_diffusers_unet(ours))  # same values, its own storage
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    ctx = torch.randn(batch, 77, config.context_dim, generator=gen)
    target = torch.randn(batch, 4, 8, 8, generator=gen)
    yield Case(
        f"training step, text-conditioned U-Net (4x8x8 latents, 77x{config.context_dim} "
        f"context, batch {batch})",
        {"minisd": _train_step(ours, lambda m: m(x, t, ctx), target),
         "reference": _train_step(ref, lambda m: m(x, t, encoder_hidden_states=ctx).sample,
                                  target)},
        unit="img/s", images=batch,
        note="reference: diffusers UNet2DConditionModel, identical weights",
        extra={"parameters": count_parameters(ours)},
    )  # fmt: skip


# ----- the registry --------------------------------------------------------------------------
GROUPS: dict[str, Callable[[], Iterator[Case]]] = {
    "sd-unet": sd_unet_forward,
    "sd-vae": sd_vae_decode,
    "train-mnist": train_mnist_unet,
    "train-text": train_text_unet,
}
# what `make bench BENCH_ARGS=--quick` runs: the small cases, in seconds
QUICK = {
    "sd-unet": dict(batches=(1,), sides=(32,), dtypes=("fp32",)),
    "sd-vae": dict(sides=(32,)),
    "train-mnist": dict(batch=32),
    "train-text": dict(batch=16),
}


def tiny_case() -> Case:
    """A case small enough for the test suite: the harness end to end in a second."""
    cfg = dataclasses.replace(SMALL_TEXT, model_channels=16, num_head_channels=16,
                              norm_num_groups=4)  # fmt: skip
    return next(iter(train_text_unet(batch=2, config=cfg)))
