"""The benchmarks: minisd beside diffusers at identical weights and inputs.

Each function returns `Case`s (see harness). Models are built once per group and shared by its
cases; the diffusers twin of a minisd U-Net comes through diffusers' own converter
(`minisd.sd.to_diffusers_unet`), so both hold the same numbers. Training twins are copies, so
each optimiser updates its own weights.

Groups: sd-unet, sd-vae (SD v1 at full size), train-mnist, train-text (training steps),
compile (the text U-Net's step with torch.compile on both sides, compile time reported),
variants (changes a profile suggested, each beside minisd's default: channels_last, bf16),
generate (text to MNIST end to end, with quality), latent-pixel (minisd's latent model beside
its pixel model), course (each notebook's quick run and `make test`, minisd alone).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.harness import Case, cpu_has
from minisd import sd as sdmod
from minisd.summary import count_parameters
from minisd.train import make_optimizer
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
_OPTIMISERS = "AdamW: fused in minisd (as `train` builds it), torch's default in diffusers"


def _train_step(
    model: torch.nn.Module, forward: Callable, target: torch.Tensor, ours: bool
) -> Callable:
    """One step: forward, MSE to the noise, backward, AdamW (lr 1e-4), gradients set to None
    between steps. minisd's side builds its optimiser as `python -m minisd train` does
    (`train.make_optimizer`: fused AdamW); diffusers' side as its training scripts do
    (`torch.optim.AdamW` with torch's defaults)."""
    model.train()
    if ours:
        opt = make_optimizer(model.parameters(), lr=1e-4)
    else:
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
        {"minisd": _train_step(ours, lambda m: m(x, t), target, ours=True),
         "reference": _train_step(twin, lambda m: m(x, t, encoder_hidden_states=None).sample,
                                  target, ours=False)},
        unit="img/s", images=batch,
        note="reference: diffusers UNet2DConditionModel, identical weights; " + _OPTIMISERS,
        extra={"parameters": n_ours},
    )  # fmt: skip
    yield Case(
        name + ", against UNet2DModel",
        {"minisd": _train_step(copy.deepcopy(ours), lambda m: m(x, t), target, ours=True),
         "reference": _train_step(plain, lambda m: m(x, t).sample, target, ours=False)},
        unit="img/s", images=batch,
        note=f"reference: diffusers UNet2DModel at the same widths and attention placement, "
        f"{n_plain / n_ours - 1:+.0%} parameters (one attention layer, no feed-forward); "
        + _OPTIMISERS,
        extra={"parameters": n_ours, "reference_parameters": n_plain},
    )  # fmt: skip


def train_text_unet(
    batch: int = 64, config: UNetConfig = SMALL_TEXT, compiled: bool = False
) -> Iterator[Case]:
    """The small text U-Net's training step; compiled: both models through torch.compile
    (inductor), each compiled by a first step whose time the row reports."""
    ours = _random_unet(config)
    ref = copy.deepcopy(sdmod.to_diffusers_unet(ours))  # same values, its own storage
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    ctx = torch.randn(batch, 77, config.context_dim, generator=gen)
    target = torch.randn(batch, 4, 8, 8, generator=gen)
    name = (f"training step, text-conditioned U-Net (4x8x8 latents, 77x{config.context_dim} "
            f"context, batch {batch})")  # fmt: skip
    note = "reference: diffusers UNet2DConditionModel, identical weights; " + _OPTIMISERS
    if compiled:
        ours, ref = torch.compile(ours), torch.compile(ref)
    run = {"minisd": _train_step(ours, lambda m: m(x, t, ctx), target, ours=True),
           "reference": _train_step(ref, lambda m: m(x, t, encoder_hidden_states=ctx).sample,
                                    target, ours=False)}  # fmt: skip
    extra = {"parameters": count_parameters(ours)}
    if compiled:
        for impl, step in run.items():
            start = time.perf_counter()
            step()  # compiles
            extra[f"{impl}_compile_s"] = time.perf_counter() - start
        name += ", torch.compile on both"
        note = (f"first step, compiling included: minisd {extra['minisd_compile_s']:.0f} s, "
                f"diffusers {extra['reference_compile_s']:.0f} s; " + note)  # fmt: skip
    yield Case(name, run, unit="img/s", images=batch, note=note, extra=extra,
               flops=not compiled, memory=not compiled)  # fmt: skip


def train_text_compiled(batch: int = 64) -> Iterator[Case]:
    """`train_text_unet` with both models compiled: the row beside the eager one."""
    return train_text_unet(batch, compiled=True)


# ----- end to end: text to MNIST ----------------------------------------------------------------
GENERATION_SAMPLERS = (("ddpm", 1000), ("ddim", 50), ("dpm++2m", 20))


def _diffusers_scheduler(config, schedule):
    """diffusers' scheduler for a minisd SamplerConfig, from the same betas, with the settings
    under which our samplers equal diffusers' (tests/test_sampling.py)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=schedule.num_timesteps,
                  trained_betas=schedule.betas.float().numpy(), clip_sample=False)  # fmt: skip
    if config.sampler == "ddpm":
        return DDPMScheduler(**common, variance_type=config.variance)
    if config.sampler == "ddim":
        return DDIMScheduler(
            **common, set_alpha_to_one=config.final_alpha_cumprod == 1.0,
            timestep_spacing=config.spacing, steps_offset=config.steps_offset,
        )  # fmt: skip
    common.pop("clip_sample")
    return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                       timestep_spacing=config.spacing,
                                       steps_offset=config.steps_offset)  # fmt: skip


def text_to_mnist(
    n_per_digit: int = 10, samplers=GENERATION_SAMPLERS, guidance: float = 3.0, seed: int = 0
) -> Iterator[Case]:
    """The shipped text-to-MNIST model generating digits from held-out phrasings with
    classifier-free guidance: minisd's `DiffusionModel.sample` (its sampler, guidance wrapper
    and autoencoder) against the loop diffusers' pipelines run (its scheduler, the guided batch
    through UNet2DConditionModel, AutoencoderKL's decode) at identical weights, noise and text
    embeddings. Quality: the shipped classifier's reading of each image against its prompt."""
    from minisd.evaluation import digit_accuracy, prompts_per_digit
    from minisd.latent import crop_images
    from minisd.pretrained import CHECKPOINTS, load_diffusion
    from minisd.text import HELD_OUT_TEMPLATES

    model = load_diffusion(CHECKPOINTS / "ldm_text_mnist.safetensors")
    unet_ref, vae_ref = sdmod.to_diffusers_unet(model.unet), sdmod.to_diffusers_vae(model.vae)
    prompts, digits = prompts_per_digit(HELD_OUT_TEMPLATES, n_per_digit)
    n = len(prompts)
    cond, null = model.condition(prompts, n), model.condition(None, n)  # cached embeddings
    both = {k: torch.cat([null[k], cond[k]]) for k in cond}  # diffusers: [uncond, cond]
    x_T = torch.randn(n, *model.noise_shape(), generator=torch.Generator().manual_seed(seed))

    def quality(images):
        acc = digit_accuracy(images, digits)
        return {"accuracy": acc["accuracy"], "confident": acc["confident_fraction"]}

    for name, steps in samplers:
        config = model.sampler_config(name, steps)

        def run_ours(config=config):
            gen = torch.Generator().manual_seed(seed + 1)
            return model.sample(x_T, config, cond=prompts, generator=gen, guidance_scale=guidance)

        def run_ref(config=config):
            gen = torch.Generator().manual_seed(seed + 1)
            scheduler = _diffusers_scheduler(config, model.schedule)
            scheduler.set_timesteps(config.steps)
            x = x_T.clone()
            with torch.no_grad():
                for t in scheduler.timesteps:
                    eps = unet_ref(
                        torch.cat([x, x]), t, encoder_hidden_states=both["context"],
                        encoder_attention_mask=both.get("context_mask"),
                    ).sample  # fmt: skip
                    uncond, text = eps.chunk(2)
                    eps = uncond + guidance * (text - uncond)
                    x = scheduler.step(eps, t, x, generator=gen).prev_sample
                images = vae_ref.decode(x / vae_ref.config.scaling_factor).sample
            return crop_images(images, model.image_size).clamp(-1, 1)

        yield Case(
            f"text to MNIST, {config.name}, guidance {guidance:g}, {n} images",
            {"minisd": run_ours, "reference": run_ref},
            quality=quality, flops=False, memory=False, compare=True,
            repeats=1 if steps > 100 else None, warmup=0 if steps > 100 else None,
            note=f"held-out phrasings, {n_per_digit} per digit; time for all {n} images",
            extra={"images": n, "sampler": config.name},
        )  # fmt: skip


# ----- latent beside pixel -------------------------------------------------------------------
def latent_vs_pixel(batch: int = 128) -> Iterator[Case]:
    """One training step of the MNIST preset U-Net on 4x8x8 latents (the f4 autoencoder's, as
    lesson 03 trains on cached latents) beside the same widths on 1x28x28 pixels."""
    from minisd.pretrained import CHECKPOINTS, load_autoencoder

    vae = load_autoencoder(CHECKPOINTS / "vae_mnist_f4.safetensors")
    latent_shape = (vae.config.z_channels, 8, 8)
    shapes = {"minisd": latent_shape, "reference": (1, 28, 28)}
    steps = {}
    gen = torch.Generator().manual_seed(1)
    for impl, shape in shapes.items():
        config = dataclasses.replace(MNIST, in_channels=shape[0], out_channels=shape[0])
        unet = _random_unet(config)
        x = torch.randn(batch, *shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        target = torch.randn(batch, *shape, generator=gen)
        steps[impl] = _train_step(unet, lambda m, x=x, t=t: m(x, t), target, ours=True)
    yield Case(
        f"training step, MNIST preset widths, latents {'x'.join(map(str, latent_shape))} vs "
        f"pixels 1x28x28, batch {batch}",
        steps, unit="img/s", images=batch, reference_label="pixel",
        note="reference column: the same U-Net widths on pixels; latents come from a cache",
    )  # fmt: skip


# ----- changes tried on minisd's own step ------------------------------------------------------
VARIANT_LABEL = "minisd default"


def _text_step(batch: int, channels_last: bool = False, bf16: bool = False) -> Callable:
    """The small text U-Net's training step as minisd runs it, or with one change: the model
    and batch in channels_last memory, or the forward pass under bf16 autocast."""
    unet = _random_unet(SMALL_TEXT)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    ctx = torch.randn(batch, 77, SMALL_TEXT.context_dim, generator=gen)
    target = torch.randn(batch, 4, 8, 8, generator=gen)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def forward(m):
        with _autocast("bf16" if bf16 else "fp32"):
            return m(x, t, ctx).float()

    return _train_step(unet, forward, target, ours=True)


def minisd_variants(batch: int = 64, sd_side: int = 32) -> Iterator[Case]:
    """What a profile suggested and did not pay, kept measurable: each change beside minisd's
    default on the same step (ratio = the change / the default)."""
    bf16 = "native bf16 on this CPU" if cpu_has("avx512_bf16") else "no native bf16 on this CPU"
    for what, kwargs, note in (
        ("channels_last model and batch", dict(channels_last=True), ""),
        ("bf16 autocast", dict(bf16=True), bf16),
    ):
        yield Case(
            f"training step, text-conditioned U-Net (batch {batch}), {what}",
            {"minisd": _text_step(batch, **kwargs), "reference": _text_step(batch)},
            unit="img/s", images=batch, reference_label=VARIANT_LABEL, note=note,
            flops=False, memory=False,
        )  # fmt: skip
    x = torch.randn(1, 4, sd_side, sd_side, generator=torch.Generator().manual_seed(1))
    t, ctx = torch.full((1,), 601), torch.randn(1, 77, 768)
    runs = {}
    for impl, layout in (("minisd", torch.channels_last), ("reference", torch.contiguous_format)):
        unet = _random_unet(SD_V1).to(memory_format=layout)  # seeded: the same weights twice
        x_in = x.contiguous(memory_format=layout)
        runs[impl] = torch.no_grad()(lambda unet=unet, x_in=x_in: unet(x_in, t, ctx))
    yield Case(
        f"SD v1 U-Net forward, batch 1, {sd_side}x{sd_side} latents, fp32, channels_last",
        runs, reference_label=VARIANT_LABEL, flops=False, memory=False,
    )  # fmt: skip


# ----- the course's own run times ---------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{tail}")


def course_times(
    notebooks: tuple[str, ...] | None = None, make_test: bool = True
) -> Iterator[Case]:
    """Each notebook run top to bottom in its default (quick) profile, as `make notebooks` runs
    it, into a temporary folder; then the whole `make test` (lint, tests, strict nbval)."""
    found = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    chosen = [nb for nb in found if notebooks is None or nb.stem[:2] in notebooks]
    jupyter = str(Path(sys.executable).with_name("jupyter"))
    for nb in chosen:

        def run(nb=nb):
            with tempfile.TemporaryDirectory() as tmp:
                _run([jupyter, "nbconvert", "--to", "notebook", "--execute", "--output-dir", tmp,
                      "--ExecutePreprocessor.timeout=1800", str(nb)], nb.parent)  # fmt: skip

        yield Case(
            f"notebook {nb.stem}, quick profile", {"minisd": run}, repeats=1, warmup=0,
            flops=False, memory=False, note="jupyter nbconvert --execute, top to bottom",
        )  # fmt: skip
    if make_test:
        yield Case(
            "make test (lint, unit tests, every notebook under strict nbval, the browser tests)",
            {"minisd": lambda: _run(["make", "test"], ROOT)}, repeats=1, warmup=0,
            flops=False, memory=False, note="the CI command",
        )  # fmt: skip


# ----- the registry --------------------------------------------------------------------------
GROUPS: dict[str, Callable[[], Iterator[Case]]] = {
    "sd-unet": sd_unet_forward,
    "sd-vae": sd_vae_decode,
    "train-mnist": train_mnist_unet,
    "train-text": train_text_unet,
    "compile": train_text_compiled,
    "generate": text_to_mnist,
    "latent-pixel": latent_vs_pixel,
    "variants": minisd_variants,
    "course": course_times,
}
# what `make bench BENCH_ARGS=--quick` runs: the small cases, in seconds
QUICK = {
    "sd-unet": dict(batches=(1,), sides=(32,), dtypes=("fp32",)),
    "sd-vae": dict(sides=(32,)),
    "train-mnist": dict(batch=32),
    "train-text": dict(batch=16),
    "compile": dict(batch=16),
    "generate": dict(n_per_digit=1, samplers=(("ddim", 10), ("dpm++2m", 10))),
    "latent-pixel": dict(batch=16),
    "variants": dict(batch=16, sd_side=16),
    "course": dict(notebooks=("01",), make_test=False),
}


# SMALL_TEXT's layout at a width the test suite trains in a second
TINY_TEXT = dataclasses.replace(SMALL_TEXT, model_channels=16, num_head_channels=16,
                                norm_num_groups=4)  # fmt: skip


def tiny_case(compiled: bool = False) -> Case:
    """A case small enough for the test suite: the harness end to end in a second."""
    return next(iter(train_text_unet(batch=2, config=TINY_TEXT, compiled=compiled)))
