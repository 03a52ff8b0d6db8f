"""Inpainting: fill a masked region so it agrees with the rest of the image.

Two ways, both in latent space (lesson 06):
- with any trained model, by *replacement*: at every step the known region of x_t is what the
  forward process makes of the known latent z0 (Song et al. 2021's imputation; ldm's DDIM `mask`).
  `known_region` does it as an eps_fn wrapper, so every sampler inpaints; `sample_repaint` adds
  RePaint's resampling (Lugmayr et al. 2022), which lets the filled region and the known one
  agree better by going back and forth between noise levels.
- with a model trained for it (SD's inpainting checkpoint): the U-Net sees the masked image's
  latent and the mask concatenated to x_t (9 channels in SD; 4 + 4 + 1 here), made by
  `inpainting_condition`.

Convention (SD's): a mask is 1 where the image is to be filled ("white is repainted"), 0 where it
is kept; (N, 1, H, W) at pixel resolution, `latent_mask` brings it to the latents'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from minisd.conditioning import ImageConditioner
from minisd.course import progress as progress_bar
from minisd.latent import encode_images
from minisd.sampling import Callback, EpsFn, _call_eps_fn, _check_sequence, _ddim_step
from minisd.schedule import NoiseSchedule
from minisd.vae import AutoencoderKL

# The fixed masks of the lesson's measurements: which part of a 28x28 digit is hidden.
MASKS = ("top", "bottom", "left", "right", "center")
# the side of the hidden square of the "center" mask, in pixels
CENTER_SIDE = 14


def check_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """A float (N, 1, H, W) mask of 0s and 1s matching images (N, C, H, W); one (1, H, W) or
    (H, W) mask is used for all N."""
    mask = torch.as_tensor(mask)
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    n, _, h, w = images.shape
    if mask.shape[1] != 1 or mask.shape[-2:] != (h, w) or mask.shape[0] not in (1, n):
        raise ValueError(
            f"need a mask of shape ({n}, 1, {h}, {w}) (or one {h}x{w} mask for all) for images "
            f"{tuple(images.shape)}, got {tuple(mask.shape)}"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("a mask holds 1 where the image is to be filled and 0 where it is kept")
    return mask.to(images.device, images.dtype).expand(n, 1, h, w)


def fixed_mask(kind: str, size: int = 28) -> torch.Tensor:
    """One (1, size, size) mask hiding the top, bottom, left or right half, or the center."""
    mask = torch.zeros(1, size, size)
    half = size // 2
    if kind == "top":
        mask[:, :half] = 1
    elif kind == "bottom":
        mask[:, half:] = 1
    elif kind == "left":
        mask[:, :, :half] = 1
    elif kind == "right":
        mask[:, :, half:] = 1
    elif kind == "center":
        lo = (size - CENTER_SIDE) // 2
        mask[:, lo : lo + CENTER_SIDE, lo : lo + CENTER_SIDE] = 1
    else:
        raise ValueError(f"unknown mask {kind!r}: choose from {MASKS}")
    return mask


def random_masks(n: int, generator: torch.Generator, size: int = 28) -> torch.Tensor:
    """(n, 1, size, size) training masks: a random box (sides size/5 to 3/4 of size) in 60%, a
    random half in 30%, one or two random stripes in 5%, and everything in 5% (the model then
    learns plain generation too, as SD's inpainting training did)."""
    masks = torch.zeros(n, 1, size, size)
    kind = torch.rand(n, generator=generator)
    lo, hi = size // 5, 3 * size // 4
    for i in range(n):
        if kind[i] < 0.6:
            h, w = torch.randint(lo, hi + 1, (2,), generator=generator).tolist()
            top = torch.randint(0, size - h + 1, (1,), generator=generator).item()
            left = torch.randint(0, size - w + 1, (1,), generator=generator).item()
            masks[i, :, top : top + h, left : left + w] = 1
        elif kind[i] < 0.9:
            which = MASKS[torch.randint(0, 4, (1,), generator=generator).item()]
            masks[i] = fixed_mask(which, size)
        elif kind[i] < 0.95:
            for _ in range(torch.randint(1, 3, (1,), generator=generator).item()):
                width = torch.randint(3, 8, (1,), generator=generator).item()
                start = torch.randint(0, size - width + 1, (1,), generator=generator).item()
                if torch.rand(1, generator=generator).item() < 0.5:
                    masks[i, :, start : start + width] = 1
                else:
                    masks[i, :, :, start : start + width] = 1
        else:
            masks[i] = 1
    return masks


def masked_images(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The images with the masked pixels set to 0, mid-grey in [-1, 1] (SD's masked_image):
    neither ink nor background, so the model cannot mistake the hole for either."""
    return images * (1 - check_mask(mask, images))


def latent_mask(mask: torch.Tensor, vae: AutoencoderKL, size: int | None = None) -> torch.Tensor:
    """A pixel mask (N, 1, H, W) at the latents' resolution: padded like the images (the padding
    is kept), then a latent cell is to be filled if any of its pixels is (max-pooling)."""
    size = size or vae.config.resolution or mask.shape[-1]
    mask = F.pad(mask, [(size - mask.shape[-1]) // 2] * 2 + [(size - mask.shape[-2]) // 2] * 2)
    return F.max_pool2d(mask, vae.config.downsampling_factor)


@torch.no_grad()
def inpainting_condition(
    vae: AutoencoderKL, images: torch.Tensor, mask: torch.Tensor, batch_size: int = 500
) -> torch.Tensor:
    """What an inpainting U-Net is concatenated with: the masked images' scaled latents and the
    latent-resolution mask, (N, embed_dim + 1, h, w), on the CPU."""
    mask = check_mask(mask, images).cpu()
    z = encode_images(vae, masked_images(images.cpu(), mask), batch_size)
    return torch.cat([z, latent_mask(mask, vae)], dim=1)


def paste(images: torch.Tensor, result: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The known pixels from images, the masked ones from result: the final composite SD's
    pipelines offer, so what was kept is kept exactly (the autoencoder is lossy)."""
    mask = check_mask(mask, images)
    return mask * result + (1 - mask) * images


def known_region(
    eps_fn: EpsFn, z0: torch.Tensor, mask: torch.Tensor, schedule: NoiseSchedule
) -> EpsFn:
    """Inpainting by replacement with any sampler: where mask is 0 the returned noise is the
    one that makes the step's prediction of x0 equal the known latent z0.

    eps = (x_t - sqrt(ab_t) z0) / sqrt(1 - ab_t) there, so x0_pred = z0 exactly, and a DDIM
    or DPM-Solver step keeps the known region at sqrt(ab) z0 + sqrt(1 - ab) eps_T: the forward
    process applied to z0 with the starting noise, which is the replacement method with its
    noise drawn once. mask: (N, 1, h, w) at latent resolution (`latent_mask`), 1 = fill.
    """
    if mask.ndim != 4 or mask.shape[-2:] != z0.shape[-2:] or mask.shape[1] != 1:
        raise ValueError(
            f"the mask must be (N, 1, {z0.shape[-2]}, {z0.shape[-1]}) at the latents' "
            f"resolution (see latent_mask), got {tuple(mask.shape)}"
        )

    def eps_known(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = eps_fn(x, t)
        ab = schedule.table("alphas_cumprod", x.device)[t].to(x.dtype).view(-1, 1, 1, 1)
        forced = (x - ab.sqrt() * z0.to(x)) / (1 - ab).sqrt()
        m = mask.to(x)
        return m * eps + (1 - m) * forced

    return eps_known


@torch.no_grad()
def sample_repaint(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int] | torch.Tensor,
    z0: torch.Tensor,
    mask: torch.Tensor,
    *,
    resample: int = 5,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Alg. 1) over descending timesteps with DDPM-like (eta = 1)
    steps: each step the known region is replaced by a fresh forward sample of z0, and the step
    is redone `resample` times, going back up by forward noise q(x_t | x_t_prev) in between, so
    the generated region has time to agree with the known one. resample=1 is plain replacement."""
    if not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be an int >= 1 (1: no resampling), got {resample!r}")
    ts = _check_sequence(schedule, timesteps)
    m = mask.to(x_T)
    ab = schedule.table("alphas_cumprod", x_T.device)

    def noise_like(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def forward(t: int) -> torch.Tensor:  # q(x_t | z0), t < 0 is z0 itself
        if t < 0:
            return z0.to(x_T)
        return ab[t].sqrt().to(x_T) * z0.to(x_T) + (1 - ab[t]).sqrt().to(x_T) * noise_like(z0)

    x = m * x_T + (1 - m) * forward(ts[0])
    steps = list(zip(ts, ts[1:] + [-1], strict=True))
    for i, (t, t_prev) in enumerate(progress_bar(steps, progress, desc="RePaint")):
        rounds = resample if t_prev >= 0 else 1  # the last step has nothing to agree with
        for u in range(rounds):
            eps, t_batch = _call_eps_fn(eps_fn, x, t)
            x_prev, x0_pred = _ddim_step(
                schedule, x, eps, t_batch, torch.tensor(t_prev), 1.0, noise_like(x), None,
                1.0, None, checked=True,
            )  # fmt: skip
            x_prev = m * x_prev + (1 - m) * forward(t_prev)
            if u < rounds - 1:  # back up: x_t ~ q(x_t | x_t_prev)
                ratio = (ab[t] / ab[t_prev]).to(x_T)
                x = ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise_like(x_prev)
        if callback is not None:
            callback({"i": i, "t": t, "t_prev": t_prev, "x_t": x, "x0_pred": x0_pred})
        x = x_prev
    return x


# ----- the three ways, behind one function -----------------------------------------------------
METHODS = ("replace", "repaint", "model")


def _sampling_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """The mask at the resolution the sampler works at: the latents', or the pixels'."""
    return mask if model.vae is None else latent_mask(mask, model.vae)


@torch.no_grad()
def inpaint(
    model,
    images: torch.Tensor,
    mask: torch.Tensor,
    cond=None,
    config=None,
    *,
    method: str = "replace",
    resample: int = 5,
    guidance_scale: float = 1.0,
    negative=None,
    seed: int = 0,
) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] with the masked region filled, the rest pasted back.

    model: a `DiffusionModel`. method "replace": any model, the known region held by
    `known_region` (any sampler); "repaint": any model, `sample_repaint` with `resample` rounds
    per step; "model": a model trained for inpainting, given `inpainting_condition` (it takes no
    other condition). cond, guidance_scale, negative: the prompt, as in `DiffusionModel.sample`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown inpainting method {method!r}: choose from {METHODS}")
    mask = check_mask(mask, images).cpu()
    images = images.cpu()
    n, config = len(images), config or model.sampler
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, *model.noise_shape(images.shape[-1]), generator=generator)
    x_T = x_T.to(model.device)
    if method == "model":
        if not model.unet.config.concat_channels or model.vae is None:
            raise ValueError(
                "method='model' needs a latent model trained for inpainting (its U-Net takes the "
                "masked image and mask as concat_channels); use 'replace' or 'repaint' otherwise"
            )
        concat = inpainting_condition(model.vae, images, mask).to(model.device)
        if isinstance(model.conditioner, ImageConditioner):  # the mask is its only condition
            if cond is not None:
                raise ValueError("this inpainting model takes no prompt: pass cond=None")
            out = model.sample(x_T, config, cond=concat, generator=generator)
            return paste(images, out.cpu(), mask)
        # SD's inpainting U-Net: the prompt by cross-attention, the masked image by concatenation
        eps_fn = model.guided_eps_fn(cond, n, guidance_scale, negative, {"concat": concat})
        x0 = config.sample(eps_fn, x_T, model.schedule, generator=generator)
        return paste(images, model.decode(x0).clamp(-1, 1).cpu(), mask)
    if model.unet.config.concat_channels:
        raise ValueError(
            f"method={method!r} runs a plain model; this one is trained for inpainting (its U-Net "
            "takes the masked image as concat_channels): use method='model'"
        )
    z0 = model.encode(images)
    m = _sampling_mask(model, mask).to(model.device)
    eps_fn = model.guided_eps_fn(cond, n, guidance_scale, negative)
    if method == "replace":
        eps_fn = known_region(eps_fn, z0, m, model.schedule)
        x0 = config.sample(eps_fn, x_T, model.schedule, generator=generator)
    else:
        timesteps = config.timesteps(model.schedule.num_timesteps)
        x0 = sample_repaint(
            eps_fn, x_T, model.schedule, timesteps, z0, m, resample=resample, generator=generator
        )
    return paste(images, model.decode(x0).clamp(-1, 1).cpu(), mask)
