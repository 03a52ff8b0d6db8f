"""The KL autoencoder: images <-> the latents diffusion runs on (Rombach et al. 2022, sec. 3.1).

`AutoencoderKL` encodes an image x (B, C, H, W) into a diagonal Gaussian q(z|x) over latents
(B, embed_dim, H/f, W/f) and decodes a latent back; f = 2**(len(ch_mult) - 1) is the
downsampling factor (SD v1: f = 8, 512x512x3 -> 64x64x4). A small KL term pulls q(z|x) towards
N(0, I), so the latent space stays smooth without becoming a VAE that blurs everything.

Attribute names are CompVis ldm's (`ldm/models/autoencoder.py`,
`ldm/modules/diffusionmodules/model.py`): `AutoencoderKL(SD_V1)`'s state-dict keys equal the
SD v1 checkpoint's keys after the prefix `first_stage_model.` is stripped.

Notation (paper -> code):
    E(x), D(z)          -> encoder + quant_conv, post_quant_conv + decoder
    mu, log sigma^2     -> posterior.mean, posterior.logvar
    z = mu + sigma eps  -> posterior.sample(generator)  (the reparameterisation trick)
    z * scale_factor    -> encode_latents(x): what the diffusion model sees
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from minisd.blocks import Upsample  # nearest x2 + 3x3 conv `conv`: the same module in both
from minisd.course import LossFn

# ldm's Normalize(): GroupNorm with eps=1e-6 everywhere in the autoencoder.
NORM_EPS = 1e-6
# ldm clamps the log-variance so exp() can neither overflow nor underflow.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# SD v1's latent scale: 1 / std of its (unscaled) latents, measured once on a batch of images.
SD_V1_SCALE_FACTOR = 0.18215
RECONSTRUCTIONS = ("l1", "mse")


@dataclass(frozen=True)
class AutoencoderConfig:
    """Hyper-parameters of `AutoencoderKL`, named as in ldm's `first_stage_config.params.ddconfig`.

    attn_resolutions: feature-map sizes (in pixels, for an input of side `resolution`) whose
    level gets an AttnBlock after every ResnetBlock, as in ldm; the middle block always has one.
    embed_dim: latent channels; z_channels: channels of the encoder's output (ldm keeps them
    equal). scale_factor: multiplies latents for diffusion (see `compute_scale_factor`).
    """

    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    attn_resolutions: tuple[int, ...] = ()
    resolution: int | None = None
    double_z: bool = True  # the encoder emits mean and log-variance: 2 * z_channels
    dropout: float = 0.0
    norm_num_groups: int = 32
    scale_factor: float = 1.0

    def __post_init__(self) -> None:
        ints = ("in_channels", "out_ch", "ch", "num_res_blocks", "z_channels", "embed_dim")
        for name in (*ints, "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be positive ints, e.g. (1, 2, 4), got {self.ch_mult}")
        if self.ch % self.norm_num_groups:
            raise ValueError(
                f"ch {self.ch} must divide by norm_num_groups {self.norm_num_groups}; "
                "lower norm_num_groups (e.g. 8) for small models"
            )
        if not self.double_z:
            raise ValueError("double_z must be True: the encoder outputs both mean and logvar")
        if not 0.0 <= self.dropout < 1.0 or not self.scale_factor > 0:
            raise ValueError(
                f"dropout must be in [0, 1) and scale_factor > 0, "
                f"got {self.dropout} and {self.scale_factor}"
            )
        sizes = (
            [self.resolution // 2**i for i in range(len(self.ch_mult))] if self.resolution else []
        )
        if not set(self.attn_resolutions) <= set(sizes):
            raise ValueError(
                f"attn_resolutions are feature-map sizes for inputs of side resolution="
                f"{self.resolution}; choose from {sizes}, got {self.attn_resolutions}"
            )

    @property
    def downsampling_factor(self) -> int:
        """f: latents are H/f x W/f (one halving per level after the first)."""
        return 2 ** (len(self.ch_mult) - 1)

    def has_attention(self, level: int) -> bool:
        """Whether the encoder and decoder levels `level` (0 = full resolution) use AttnBlocks."""
        return self.resolution is not None and self.resolution // 2**level in self.attn_resolutions


# For tests (11k parameters): 2 levels of 4 and 8 channels, 2 latent channels at half resolution.
TINY = AutoencoderConfig(
    in_channels=3,
    out_ch=3,
    ch=4,
    ch_mult=(1, 2),
    num_res_blocks=1,
    z_channels=2,
    embed_dim=2,
    norm_num_groups=2,
)
# MNIST, padded to 32x32 with background (`minisd.latent.pad_images`), as LeNet-5 did: 28 is
# not a multiple of 8. Factor 4: 8x8x4 = 256 latent values for 784 pixels.
MNIST_F4 = AutoencoderConfig(
    in_channels=1,
    out_ch=1,
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    z_channels=4,
    embed_dim=4,
    resolution=32,
    norm_num_groups=8,
)
# Factor 8 with 4 channels, SD's own latent shape: 4x4x4 = 64 values, 12x fewer than the pixels.
MNIST_F8 = replace(MNIST_F4, ch_mult=(1, 2, 2, 2))
# CompVis configs/stable-diffusion/v1-inference.yaml, first_stage_config.params.
SD_V1 = AutoencoderConfig(
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    z_channels=4,
    embed_dim=4,
    resolution=256,
    scale_factor=SD_V1_SCALE_FACTOR,
)
# Known parameter count of the SD v1 autoencoder (checked in tests on the meta device).
SD_V1_NUM_PARAMS = 83_653_863


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a skip (DDPM's ResNet block without the time embedding)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        same = in_channels == out_channels  # a 1x1 conv matches the skip's channels otherwise
        self.nin_shortcut = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W pixels, 1x1 convs as projections, plus a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        q, k, v = (conv(x_norm).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H*W, C), scale 1/sqrt(C)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve H and W: pad one pixel right and bottom only (ldm's choice), then a stride-2 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Level(nn.Module):
    """One resolution: ResnetBlocks `block[i]`, each followed by `attn[i]` if attention is on.

    Encoder and decoder add `downsample` / `upsample`: nn.Identity (no weights, so no keys) where
    ldm has none."""

    def __init__(self, cfg: AutoencoderConfig, level: int, in_ch: int, out_ch: int, n: int) -> None:
        super().__init__()
        groups = cfg.norm_num_groups
        self.block = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, cfg.dropout, groups) for i in range(n)
        )
        n_attn = n if cfg.has_attention(level) else 0
        self.attn = nn.ModuleList(AttnBlock(out_ch, groups) for _ in range(n_attn))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

    def __init__(self, cfg: AutoencoderConfig, channels: int) -> None:
        super().__init__()
        groups = cfg.norm_num_groups
        self.block_1 = ResnetBlock(channels, channels, cfg.dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, cfg.dropout, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> (B, 2*z_channels, H/f, W/f): mean and log-variance."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch, last = cfg.ch, len(cfg.ch_mult) - 1
        for level, mult in enumerate(cfg.ch_mult):
            down = Level(cfg, level, ch, cfg.ch * mult, cfg.num_res_blocks)
            ch = cfg.ch * mult
            down.downsample = Downsample(ch) if level < last else nn.Identity()
            self.down.append(down)
        self.mid = MidBlock(cfg, ch)
        self.norm_out = _norm(ch, cfg.norm_num_groups)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for down in self.down:
            h = down.downsample(down(h))
        h = self.mid(h)  # (B, ch * ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = MidBlock(cfg, ch)
        levels: list[Level] = []
        for level in reversed(range(len(cfg.ch_mult))):
            up = Level(cfg, level, ch, cfg.ch * cfg.ch_mult[level], cfg.num_res_blocks + 1)
            ch = cfg.ch * cfg.ch_mult[level]
            up.upsample = Upsample(ch) if level > 0 else nn.Identity()
            levels.insert(0, up)  # built bottom-up, stored so that up[i] is level i (as ldm)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch, cfg.norm_num_groups)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for up in reversed(self.up):
            h = up.upsample(up(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """q(z|x) = N(mean, diag(exp(logvar))) from the encoder's (B, 2*C, h, w) output, as ldm."""

    def __init__(self, parameters: torch.Tensor) -> None:
        if parameters.ndim < 2 or parameters.shape[1] % 2:
            raise ValueError(
                f"parameters must be (B, 2*C, ...): mean and logvar stacked on dim 1, "
                f"got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I): differentiable in mean and std."""
        m = self.mean
        eps = torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
        return m + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample, summed over all latent values: (B,)."""
        dims = tuple(range(1, self.mean.ndim))
        return 0.5 * (self.mean**2 + self.var - 1.0 - self.logvar).sum(dims)

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """-log q(sample|x) per sample, summed over all latent values: (B,)."""
        dims = tuple(range(1, self.mean.ndim))
        sq = (sample - self.mean) ** 2 / self.var
        return 0.5 * (math.log(2 * math.pi) + self.logvar + sq).sum(dims)


class AutoencoderKL(nn.Module):
    """ldm's KL-regularised autoencoder: encode to q(z|x), decode z (no loss module inside)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, in_channels, H, W) -> q(z|x) over latents (B, embed_dim, H/f, W/f)."""
        self._check(x, self.config.in_channels, "x", "in_channels", self.config.downsampling_factor)
        self._check_placement(x, "x")
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, embed_dim, h, w) -> images (B, out_ch, h*f, w*f)."""
        self._check(z, self.config.embed_dim, "z", "embed_dim", 1)
        self._check_placement(z, "z")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """(reconstruction, posterior); decodes a sample of q(z|x), or its mean if not sampling."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """The latents diffusion runs on: the posterior mean (or a sample) times scale_factor."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.config.scale_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Images from scaled latents (a diffusion sample): undo scale_factor, then decode."""
        return self.decode(z / self.config.scale_factor)

    def _check_placement(self, x: torch.Tensor, name: str) -> None:
        """x on the weights' device and, outside autocast, in their dtype."""
        weight = self.post_quant_conv.weight
        if x.device != weight.device:
            raise ValueError(
                f"{name} is on {x.device}, the autoencoder on {weight.device}; "
                f"pass {name}.to({str(weight.device)!r})"
            )
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"{name} is {x.dtype}, the autoencoder's weights {weight.dtype}; "
                f"pass {name}.to({weight.dtype}) (or convert the model with .to(dtype))"
            )

    @staticmethod
    def _check(x: torch.Tensor, channels: int, name: str, field: str, factor: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(
                f"{name} must have shape (B, {channels}, H, W) for this autoencoder "
                f"({field}={channels}), got {tuple(x.shape)}"
            )
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} must be a multiple of the downsampling factor "
                f"{factor} in height and width; pad or resize the images (MNIST: pad 28x28 to "
                "32x32 with minisd.latent.pad_images), or use fewer ch_mult levels"
            )


def compute_scale_factor(latents: torch.Tensor) -> float:
    """1 / std of a batch of unscaled latents, so scaled latents have unit variance like the noise.

    This is how SD v1 got 0.18215 (ldm's `scale_by_std`): its autoencoder's latents have std
    ~5.5, and diffusion schedules assume data of roughly unit variance.
    """
    std = latents.detach().float().flatten().std().item() if latents.numel() > 1 else 0.0
    if not std > 0:
        raise ValueError(
            f"latents of shape {tuple(latents.shape)} have std {std}: encode a batch of real images"
        )
    return 1.0 / std


Features = Callable[[torch.Tensor], torch.Tensor]


def vae_loss(
    model: AutoencoderKL,
    x: torch.Tensor,
    kl_weight: float,
    generator: torch.Generator | None = None,
    reconstruction: str = "l1",
    perceptual: Features | None = None,
    perceptual_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """rec + kl_weight * KL / D (+ perceptual_weight * feature distance): ldm's autoencoder loss.

    ldm sums |x - x_rec| and the KL over each image and averages over the batch. Here both sums
    are divided by D = C*H*W pixel values: rec is the mean absolute (or squared) error, the KL is
    per pixel value. That is ldm's loss over D, so kl_weight means what it does in ldm (SD: 1e-6)
    and the loss stays O(1) at any image size. logs: loss, rec, kl (nats per image) as floats.

    ldm adds LPIPS, a distance between a pretrained network's features of x and x_rec, and a GAN
    loss; neither is available offline. `perceptual` plays LPIPS' role with any frozen feature
    network (the course uses its MNIST classifier): the mean squared feature difference.
    """
    _check_loss_args(kl_weight, reconstruction, perceptual, perceptual_weight)
    x_rec, posterior = model(x, sample_posterior=True, generator=generator)
    error = (x_rec.float() - x.float()).abs()
    rec = (error if reconstruction == "l1" else error**2).mean()
    kl = posterior.kl().float().mean()  # (B,) -> nats per image
    loss = rec + kl_weight * kl / x[0].numel()
    logs = {"rec": rec.item(), "kl": kl.item()}
    if perceptual is not None and perceptual_weight > 0:
        with torch.no_grad():
            target = perceptual(x.float())
        p_loss = (perceptual(x_rec.float()) - target).pow(2).mean()
        loss = loss + perceptual_weight * p_loss
        logs["perceptual"] = p_loss.item()
    return loss, {"loss": loss.item(), **logs}


def _check_loss_args(
    kl_weight: float, reconstruction: str, perceptual: Features | None, perceptual_weight: float
) -> None:
    if not kl_weight >= 0:
        raise ValueError(f"kl_weight must be >= 0 (ldm's SD autoencoder: 1e-6), got {kl_weight}")
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
    if not perceptual_weight >= 0 or (perceptual_weight > 0 and perceptual is None):
        raise ValueError(
            f"perceptual_weight must be >= 0 and needs a `perceptual` feature network, got "
            f"{perceptual_weight} with perceptual={perceptual!r}"
        )


def vae_loss_fn(
    kl_weight: float,
    reconstruction: str = "l1",
    perceptual: Features | None = None,
    perceptual_weight: float = 0.0,
) -> LossFn:
    """A `fit` loss for batches (images, ...): `vae_loss` on batch[0], with fit's generator."""
    _check_loss_args(kl_weight, reconstruction, perceptual, perceptual_weight)

    def loss_fn(
        model: nn.Module, batch: tuple[torch.Tensor, ...], gen: torch.Generator
    ) -> torch.Tensor:
        args = (kl_weight, gen, reconstruction, perceptual, perceptual_weight)
        return vae_loss(model, batch[0], *args)[0]

    return loss_fn


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE), per image then averaged.

    data_range is max - min of the pixel scale: 2.0 for [-1, 1], 1.0 for [0, 1]. Identical
    images give inf. Averaging per-image values (not one MSE over the batch) is the usual way.
    """
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(
            f"x and y must be batches of the same shape (B, ...), "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(data_range**2 / mse)).mean().item()
