"""Attention and the spatial transformer that lets a U-Net read a text prompt (Rombach et al. 2022).

Module and attribute names are CompVis ldm's (`ldm/modules/attention.py`), so a Stable Diffusion
v1 checkpoint's keys (`...transformer_blocks.0.attn2.to_k.weight`) load without renaming.

Notation (paper -> code):
    Q = W_Q x, K = W_K c, V = W_V c   -> to_q(x), to_k(context), to_v(context)
    softmax(Q K^T / sqrt(d)) V         -> F.scaled_dot_product_attention(q, k, v)
    d (channels per head)              -> dim_head

A key-padding mask (B, M), True for real tokens, keeps padding out of the softmax. Inside
`record_attention(model)` every attention layer also keeps its softmax(Q K^T / sqrt(d)) maps,
computed from the same q and k; outside it the forward pass is `scaled_dot_product_attention`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# ldm's SpatialTransformer normalises with GroupNorm(32, eps=1e-6), not the 1e-5 of its ResBlocks.
TRANSFORMER_NORM_EPS = 1e-6


class CrossAttention(nn.Module):
    """Multi-head attention of x over context; self-attention when context is None."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        kv_dim = query_dim if context_dim is None else context_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.recorder: AttentionRecorder | None = None  # set by record_attention
        self.name = ""  # this layer's name in its model, for recorded maps

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: (B, N, query_dim), context: (B, M, context_dim) or None, mask: (B, M) bool or None
        if context is None:
            context = x
        if context.shape[-1] != self.to_k.in_features:
            what = "context" if context is not x else "x (self-attention: no context was given)"
            raise ValueError(
                f"{what}: expected last dim {self.to_k.in_features} (context_dim), "
                f"got shape {tuple(context.shape)}"
            )
        if mask is not None:
            mask = key_padding_mask(mask, context.shape[0], context.shape[1])
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N|M, h*d)
        q, k, v = (self._split_heads(z) for z in (q, k, v))  # (B, h, N|M, d)
        if self.recorder is None:
            keep = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, h, N, d)
        else:
            probs = attention_probs(q, k, mask)  # (B, h, N, M)
            self.recorder.maps.append(AttentionMap(self.name, probs.detach().float().cpu()))
            out = probs @ v  # (B, h, N, d)
        out = out.transpose(1, 2).flatten(2)  # (B, N, h*d)
        return self.to_out(out)  # (B, N, query_dim)

    def _split_heads(self, z: torch.Tensor) -> torch.Tensor:
        b, n, _ = z.shape
        return z.view(b, n, self.heads, -1).transpose(1, 2)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over the keys, (B, h, N, d) x (B, h, M, d) -> (B, h, N, M);
    keys where mask (B, M) is False get zero weight."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, N, M)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def key_padding_mask(mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """A (batch, length) bool mask, True for tokens to attend to; at least one per row."""
    if mask.shape != (batch, length):
        raise ValueError(
            f"mask must have shape ({batch}, {length}), one entry per context token, "
            f"got {tuple(mask.shape)}"
        )
    mask = mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("every mask row needs at least one True (a token to attend to)")
    return mask


@dataclass
class AttentionMap:
    """One attention layer's softmax weights at one call: (B, heads, queries, keys)."""

    layer: str
    probs: torch.Tensor

    @property
    def side(self) -> int:
        """Height (= width) of the square feature map the queries are the pixels of."""
        return math.isqrt(self.probs.shape[2])


@dataclass
class AttentionRecorder:
    """What `record_attention` collects: every recorded layer's maps, in call order."""

    maps: list[AttentionMap] = field(default_factory=list)

    def layers(self) -> list[str]:
        return list(dict.fromkeys(m.layer for m in self.maps))

    def token_maps(self, side: int | None = None, layer: str | None = None) -> torch.Tensor:
        """(B, M, side, side): attention to each key token, averaged over heads, calls and
        layers (those of one feature-map size, the largest unless `side`, or one `layer`)."""
        maps = [m for m in self.maps if layer is None or m.layer == layer]
        if not maps:
            raise ValueError(
                f"no attention maps recorded (layer={layer!r}); sample inside "
                "record_attention(unet) first"
            )
        side = side or max(m.side for m in maps)
        picked = [m.probs.mean(1) for m in maps if m.side == side]  # (B, N, M) each
        if not picked:
            raise ValueError(f"no recorded layer works at {side}x{side}")
        mean = torch.stack(picked).mean(0)  # (B, N, M)
        return mean.transpose(1, 2).reshape(mean.shape[0], -1, side, side)


@contextlib.contextmanager
def record_attention(model: nn.Module, cross_only: bool = True) -> Iterator[AttentionRecorder]:
    """Keep the attention maps of `model`'s layers while inside the block (cross-attention
    only unless cross_only=False); the forward pass computes them explicitly there."""
    recorder = AttentionRecorder()
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, CrossAttention) and (not cross_only or name.endswith("attn2"))
    ]
    if not layers:
        raise ValueError("this model has no attention layers to record")
    for name, m in layers:
        m.recorder, m.name = recorder, name
    try:
        yield recorder
    finally:
        for _, m in layers:
            m.recorder = None


class GEGLU(nn.Module):
    """Gated GELU projection: a * gelu(b) with a, b halves of one Linear (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same map as proj(x).chunk(2): each half from its own rows of the one weight (the
        # checkpoint's layout), so both halves come out contiguous. Chunking one output leaves
        # strided halves, and the multiply, GELU and their backward ran slower on them, with a
        # copy to reassemble the gradient (~5% of a small text U-Net's training step).
        w, b = self.proj.weight, self.proj.bias
        half = w.shape[0] // 2
        value = F.linear(x, w[:half], None if b is None else b[:half])  # (..., dim_out)
        gate = F.linear(x, w[half:], None if b is None else b[half:])  # (..., dim_out)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer MLP as ldm builds it: GEGLU (dim -> mult*dim), dropout, Linear back."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(
            GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        # Without a context_dim attn2 is a second self-attention (as in ldm), so every
        # configuration keeps Stable Diffusion's key layout.
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: (B, N, dim), context: (B, M, context_dim) or None, context_mask: (B, M) or None
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, None if context is None else context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A transformer over the pixels of a feature map, wrapped in 1x1 convs and a residual."""

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        norm_groups: int = 32,
        use_linear: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = n_heads * d_head
        self.context_dim, self.use_linear = context_dim, use_linear
        self.norm = nn.GroupNorm(norm_groups, in_channels, eps=TRANSFORMER_NORM_EPS)
        # SD v1 projects with 1x1 convs; SD v2 with Linear layers on the flattened pixels
        # (ldm's use_linear_in_transformer): the same map, stored as (D, C) instead of (D, C, 1, 1).
        proj = nn.Linear if use_linear else partial(nn.Conv2d, kernel_size=1)
        self.proj_in = proj(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim)
            for _ in range(depth)
        )
        self.proj_out = proj(inner_dim, in_channels)
        # Zero-init so the block starts as the identity (ldm's zero_module).
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: (B, C, H, W), context: (B, M, context_dim) or None, context_mask: (B, M) or None
        check_context(context, self.context_dim, x.shape[0])
        b, _, h, w = x.shape
        hidden = self.norm(x)
        if self.use_linear:  # flatten, then project: (B, H*W, C) -> (B, H*W, D)
            hidden = self.proj_in(hidden.flatten(2).transpose(1, 2))
        else:  # project, then flatten: (B, D, H, W) -> (B, H*W, D)
            hidden = self.proj_in(hidden).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, context_mask)
        # back to (B, C, H, W) in the standard (contiguous) layout: the transposed view would be
        # channels-last, and the convolutions after it run slower on that layout
        if self.use_linear:
            return x + self.proj_out(hidden).transpose(1, 2).reshape(x.shape).contiguous()
        return x + self.proj_out(hidden.transpose(1, 2).reshape(b, -1, h, w).contiguous())


def check_context(context: torch.Tensor | None, context_dim: int | None, batch: int) -> None:
    """Raise a ValueError unless context is (batch, M, context_dim), or None when context_dim is."""
    if context_dim is None:
        if context is not None:
            raise ValueError(
                "this model has no cross-attention (context_dim=None) but got a context of shape "
                f"{tuple(context.shape)}; pass context=None or build the model with a context_dim"
            )
        return
    if context is None:
        raise ValueError(
            f"this model cross-attends to a context of shape (B, M, {context_dim}), got None; pass "
            "the text encoder's output (the empty prompt's embedding for an unconditional step)"
        )
    if context.ndim != 3 or context.shape[-1] != context_dim:
        raise ValueError(
            f"context must have shape (B, M, {context_dim}): expected last dim {context_dim}, "
            f"got shape {tuple(context.shape)}"
        )
    if context.shape[0] != batch:
        raise ValueError(f"context batch {context.shape[0]} must equal the input batch {batch}")
