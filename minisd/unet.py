"""The denoising U-Net eps_theta(x_t, t, c) from MNIST to Stable Diffusion v1 (Rombach et al. 2022).

One class, `UNetModel`, with presets `TINY`, `MNIST`, `CIFAR` and `SD_V1`. Attribute names are
CompVis ldm's (`ldm/modules/diffusionmodules/openaimodel.py`), so `UNetModel(SD_V1)`'s state-dict
keys equal the SD v1 checkpoint's keys after the prefix `model.diffusion_model.` is stripped.

Layout (ldm numbering): `input_blocks[0]` is the stem conv; then per level `num_res_blocks`
ResBlocks (each followed by a SpatialTransformer where attention is on) and, except at the last
level, a Downsample. `output_blocks` mirror them with `num_res_blocks + 1` blocks per level, each
eating one skip connection, and an Upsample closing every level but the top one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minisd.attention import SpatialTransformer, check_context
from minisd.blocks import Upsample

# ldm passes t through sin/cos features of period up to 10000 (Vaswani et al. 2017).
MAX_PERIOD = 10_000
# The time-embedding MLP widens model_channels by 4 (DDPM's choice, kept by ldm and SD).
TIME_EMBED_MULT = 4


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of `UNetModel`, named as in ldm's `unet_config.params`.

    attention_resolutions are downsampling factors (1 = full resolution, 2 = after one
    Downsample, ...). num_heads == -1 means "use num_head_channels"; if both are set
    num_head_channels wins, as in ldm. context_dim None: no text, attn2 is self-attention.
    num_classes: adds `label_emb` with one extra row, index num_classes, the null class.

    The three ways to condition (Rombach et al. 2022, sec. 3.3; ldm's conditioning_key):
    - adaptive normalization, use_scale_shift_norm: the time (+ class) embedding predicts a
      scale and shift of each ResBlock's second GroupNorm (ldm/openaimodel; "FiLM"), instead of
      being added to the features;
    - concatenation, concat_channels: that many of the in_channels come from the condition (a
      low-resolution or masked image), concatenated to x_t by `forward(..., concat=...)` (SD's
      inpainting U-Net has in_channels=9: 4 noisy latents + 4 masked-image latents + 1 mask);
    - cross-attention, context_dim: every SpatialTransformer attends to a sequence of text
      embeddings (`forward(..., context=...)`).
    """

    in_channels: int
    out_channels: int
    model_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    channel_mult: tuple[int, ...]
    num_heads: int = -1
    num_head_channels: int = -1
    dropout: float = 0.0
    context_dim: int | None = None
    transformer_depth: int = 1
    num_classes: int | None = None
    norm_num_groups: int = 32
    use_scale_shift_norm: bool = False
    concat_channels: int = 0
    use_linear_in_transformer: bool = False  # SD 2.x: Linear proj_in/proj_out, not 1x1 convs

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be positive ints, got {self.channel_mult}")
        if self.model_channels % self.norm_num_groups:
            raise ValueError(
                f"model_channels {self.model_channels} must divide by norm_num_groups "
                f"{self.norm_num_groups}; lower norm_num_groups (e.g. 8) for small models"
            )
        factors = {2**i for i in range(len(self.channel_mult))}
        if not set(self.attention_resolutions) <= factors:
            raise ValueError(
                f"attention_resolutions are downsampling factors; with {len(self.channel_mult)} "
                f"levels choose from {sorted(factors)}, got {self.attention_resolutions}"
            )
        for name in ("context_dim", "num_classes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be None or >= 1, got {getattr(self, name)}")
        if not 0 <= self.concat_channels < self.in_channels:
            raise ValueError(
                f"concat_channels must be in [0, in_channels={self.in_channels}): in_channels "
                f"counts x_t's channels plus the concatenated ones, got {self.concat_channels}"
            )
        if self.transformer_depth < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("transformer_depth must be >= 1 and dropout in [0, 1)")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        for ch in self._attention_channels():
            self.heads(ch)

    def _attention_channels(self) -> set[int]:
        mults = [m for i, m in enumerate(self.channel_mult) if 2**i in self.attention_resolutions]
        return {self.model_channels * m for m in mults + [self.channel_mult[-1]]}

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of a SpatialTransformer over `channels`.

        As ldm with a spatial transformer: num_heads fixes the head count at every level
        (SD v1: 8 heads of 40, 80, 160 channels); num_head_channels fixes the head width.
        """
        split = self.num_head_channels if self.num_head_channels != -1 else self.num_heads
        if split < 1 or channels % split:
            what = "num_head_channels" if self.num_head_channels != -1 else "num_heads"
            raise ValueError(
                f"an attention level has {channels} channels: not divisible by {what}={split}"
            )
        if self.num_head_channels != -1:
            return channels // split, split
        return split, channels // split

    @property
    def noise_channels(self) -> int:
        """Channels of x_t itself: in_channels less the concatenated condition's."""
        return self.in_channels - self.concat_channels

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this (one halving per extra level)."""
        return 2 ** (len(self.channel_mult) - 1)


# For tests: 2 levels, 8 and 16 channels, attention at the downsampled level.
TINY = UNetConfig(
    in_channels=3,
    out_channels=3,
    model_channels=8,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_head_channels=8,
    norm_num_groups=4,
)
# 28x28 digits: 28 -> 14 -> 7 allows two downsamplings; attention at 7x7 (factor 4).
# For class-conditional lessons use dataclasses.replace(MNIST, num_classes=10).
MNIST = UNetConfig(
    in_channels=1,
    out_channels=1,
    model_channels=32,
    num_res_blocks=2,
    attention_resolutions=(4,),
    channel_mult=(1, 2, 2),
    num_head_channels=32,
    norm_num_groups=8,
)
# 32x32 colour images: 32 -> 16 -> 8, attention at 16x16 and 8x8.
CIFAR = UNetConfig(
    in_channels=3,
    out_channels=3,
    model_channels=64,
    num_res_blocks=2,
    attention_resolutions=(2, 4),
    channel_mult=(1, 2, 2),
    num_head_channels=32,
    norm_num_groups=32,
)
# CompVis configs/stable-diffusion/v1-inference.yaml, unet_config.params.
SD_V1 = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=2,
    attention_resolutions=(4, 2, 1),
    channel_mult=(1, 2, 4, 4),
    num_heads=8,
    context_dim=768,
    transformer_depth=1,
)
# Known parameter count of the SD v1 U-Net (checked in tests on the meta device).
SD_V1_NUM_PARAMS = 859_520_964
# Stability-AI/stablediffusion configs/stable-diffusion/v2-inference-v.yaml (SD 2.0 / 2.1 at
# 768 px, v-prediction): 64-channel heads instead of 8 heads, OpenCLIP ViT-H's 1024-d context,
# Linear projections in the transformers. The same class, the same blocks.
SD_V2 = dataclasses.replace(
    SD_V1, num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True
)
SD_V2_NUM_PARAMS = 865_910_724


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal features of (maybe fractional) timesteps, (B,) -> (B, dim); cos first, as ldm."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    return F.pad(emb, (0, dim % 2))  # (B, dim): odd dims get a zero column


def _zero(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so its residual branch starts switched off (ldm's zero_module)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding in between (DDPM's ResNet block).

    The embedding is added to the features, or with use_scale_shift_norm predicts the second
    GroupNorm's scale and shift: h = norm(h) * (1 + scale) + shift (adaptive normalization).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        norm_groups: int = 32,
        use_scale_shift_norm: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        same = out_channels == channels
        self.skip_connection = nn.Identity() if same else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W), emb: (B, E)
        h = self.in_layers(x)  # (B, C', H, W)
        e = self.emb_layers(emb)[:, :, None, None].to(h.dtype)  # (B, C' or 2C', 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)  # (B, C', 1, 1) each
            norm, rest = self.out_layers[0], self.out_layers[1:]
            return self.skip_connection(x) + rest(norm(h) * (1 + scale) + shift)
        return self.skip_connection(x) + self.out_layers(h + e)


class Downsample(nn.Module):
    """Halve height and width with a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C, H/2, W/2)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands emb to ResBlocks and context to SpatialTransformers."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


def _res_and_attention(cfg: UNetConfig, in_ch: int, out_ch: int, factor: int) -> list[nn.Module]:
    """A ResBlock in_ch -> out_ch, plus a SpatialTransformer if `factor` has attention."""
    layers: list[nn.Module] = [_resblock(cfg, in_ch, out_ch)]
    if factor in cfg.attention_resolutions:
        layers.append(_transformer(cfg, out_ch))
    return layers


def _resblock(cfg: UNetConfig, in_ch: int, out_ch: int) -> ResBlock:
    emb_dim = cfg.model_channels * TIME_EMBED_MULT
    groups, scale_shift = cfg.norm_num_groups, cfg.use_scale_shift_norm
    return ResBlock(in_ch, emb_dim, cfg.dropout, out_ch, groups, scale_shift)


def _transformer(cfg: UNetConfig, channels: int) -> SpatialTransformer:
    n_heads, d_head = cfg.heads(channels)
    depth, groups = cfg.transformer_depth, cfg.norm_num_groups
    return SpatialTransformer(channels, n_heads, d_head, depth, cfg.dropout, cfg.context_dim,
                              groups, cfg.use_linear_in_transformer)  # fmt: skip


def _input_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder, and the channel count of each skip connection it leaves behind."""
    ch = cfg.model_channels
    blocks = [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))]
    skip_channels = [ch]
    for level, mult in enumerate(cfg.channel_mult):
        factor = 2**level
        for _ in range(cfg.num_res_blocks):
            out_ch = cfg.model_channels * mult
            blocks.append(TimestepEmbedSequential(*_res_and_attention(cfg, ch, out_ch, factor)))
            ch = out_ch
            skip_channels.append(ch)
        if level < len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
    return nn.ModuleList(blocks), skip_channels


def _output_blocks(cfg: UNetConfig, skip_channels: list[int]) -> nn.ModuleList:
    """The decoder: every block concatenates one skip connection (popped in reverse)."""
    skips = list(skip_channels)
    ch = cfg.model_channels * cfg.channel_mult[-1]
    blocks = []
    for level in reversed(range(len(cfg.channel_mult))):
        out_ch = cfg.model_channels * cfg.channel_mult[level]
        for i in range(cfg.num_res_blocks + 1):
            layers = _res_and_attention(cfg, ch + skips.pop(), out_ch, 2**level)
            ch = out_ch
            if level > 0 and i == cfg.num_res_blocks:
                layers.append(Upsample(ch))
            blocks.append(TimestepEmbedSequential(*layers))
    return nn.ModuleList(blocks)


class UNetModel(nn.Module):
    """eps_theta(x_t, t, context, y): ldm's UNetModel, conditioned on time, text and class."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        cfg = self.config = config
        emb_dim = cfg.model_channels * TIME_EMBED_MULT
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if cfg.num_classes is not None:
            # The extra last row is the null class, the "no label" input of classifier-free
            # guidance (Ho & Salimans 2022); ldm's label_emb has num_classes rows, no null row.
            self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim)
        self.input_blocks, skip_channels = _input_blocks(cfg)
        ch = cfg.model_channels * cfg.channel_mult[-1]
        self.middle_block = TimestepEmbedSequential(
            _resblock(cfg, ch, ch), _transformer(cfg, ch), _resblock(cfg, ch, ch)
        )
        self.output_blocks = _output_blocks(cfg, skip_channels)
        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_num_groups, cfg.model_channels),
            nn.SiLU(),
            _zero(nn.Conv2d(cfg.model_channels, cfg.out_channels, 3, padding=1)),
        )

    @property
    def null_class(self) -> int:
        """The label that means "no class" (for classifier-free guidance)."""
        if self.config.num_classes is None:
            raise ValueError("this model is not class-conditional (num_classes=None)")
        return self.config.num_classes

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Map x_t (B, C, H, W) at timesteps t (scalar or (B,)) to (B, out_channels, H, W).

        context: (B, M, context_dim) text embeddings, context_mask: (B, M) True for real tokens;
        y: (B,) class labels; concat: (B, concat_channels, H, W) images stacked onto x_t.
        """
        t = self._check_inputs(x, t, context, y, context_mask, concat)
        t_emb = timestep_embedding(t, self.config.model_channels)  # (B, model_channels)
        emb = self.time_embed(t_emb.to(x.dtype))  # (B, 4*model_channels)
        if y is not None:
            emb = emb + self.label_emb(y)
        h, skips = x if concat is None else torch.cat([x, concat.to(x.dtype)], dim=1), []
        for block in self.input_blocks:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, context_mask)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = block(h, emb, context, context_mask)
        return self.out(h)

    def _check_inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int,
        context: torch.Tensor | None,
        y: torch.Tensor | None,
        context_mask: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raise a ValueError for any malformed input; return t as a (B,) tensor."""
        cfg = self.config
        c = cfg.noise_channels
        if x.ndim != 4 or x.shape[1] != c:
            extra = f", plus concat_channels={cfg.concat_channels} in concat" * bool(
                cfg.concat_channels
            )
            raise ValueError(
                f"x must have shape (B, {c}, H, W) for this model (in_channels="
                f"{cfg.in_channels}{extra}), got {tuple(x.shape)}"
            )
        self._check_concat(concat, x)
        weight = self.time_embed[0].weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"x is {x.dtype} but this U-Net's weights are {weight.dtype}; convert one to the "
                f"other (x.to({weight.dtype}) or unet.to({x.dtype})), or run under torch.autocast"
            )
        if context_mask is not None and context is None:
            raise ValueError("context_mask without a context: pass both or neither")
        k = cfg.downsample_factor
        if x.shape[-2] % k or x.shape[-1] % k:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} must be a multiple of {k} in height and width "
                f"({len(cfg.channel_mult) - 1} downsamplings); pad or resize the images"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or shape ({x.shape[0]},), got {tuple(t.shape)}")
        check_context(context, cfg.context_dim, x.shape[0])
        self._check_labels(y, x.shape[0])
        return t

    def _check_concat(self, concat: torch.Tensor | None, x: torch.Tensor) -> None:
        k = self.config.concat_channels
        if not k:
            if concat is not None:
                raise ValueError(
                    "this model takes no concatenated image (concat_channels=0); pass concat=None"
                )
            return
        want = (x.shape[0], k, *x.shape[2:])
        if concat is None or tuple(concat.shape) != want:
            got = None if concat is None else tuple(concat.shape)
            raise ValueError(f"this model concatenates an image of shape {want} to x_t, got {got}")

    def _check_labels(self, y: torch.Tensor | None, batch: int) -> None:
        n = self.config.num_classes
        if n is None:
            if y is not None:
                raise ValueError("model is not class-conditional (num_classes=None); pass y=None")
            return
        if y is None:
            raise ValueError(
                f"this model is class-conditional: pass y of shape ({batch},) with labels in "
                f"[0, {n - 1}], or {n} (model.null_class) for no class"
            )
        if y.shape != (batch,) or y.is_floating_point() or y.min() < 0 or y.max() > n:
            raise ValueError(
                f"y must be {batch} integer labels in [0, {n}] ({n} = null class), "
                f"got shape {tuple(y.shape)}, dtype {y.dtype}"
            )
