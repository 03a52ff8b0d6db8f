"""minisd.attention against diffusers at identical weights, plus its input checks."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from minisd.attention import GEGLU, BasicTransformerBlock, CrossAttention, SpatialTransformer


def _randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Overwrite every parameter with noise so zero-inits and defaults cannot hide a mismatch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.mark.parametrize("context_dim", [None, 12])
def test_cross_attention_matches_diffusers(context_dim: int | None) -> None:
    ours = CrossAttention(16, context_dim, heads=2, dim_head=8).eval()
    ref = Attention(16, cross_attention_dim=context_dim, heads=2, dim_head=8).eval()
    _randomize(ours)
    ref.load_state_dict(ours.state_dict())  # strict: to_q, to_k, to_v, to_out.0 line up
    x = torch.randn(2, 5, 16)
    context = None if context_dim is None else torch.randn(2, 7, context_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, context), ref(x, encoder_hidden_states=context))


@pytest.mark.parametrize("context_dim", [None, 12])
def test_spatial_transformer_matches_diffusers(context_dim: int | None) -> None:
    ours = SpatialTransformer(16, 2, 8, depth=2, context_dim=context_dim, norm_groups=4).eval()
    # Without text ldm's attn2 is a second self-attention: diffusers' double_self_attention.
    ref = Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=16,
        num_layers=2,
        norm_num_groups=4,
        cross_attention_dim=context_dim,
        double_self_attention=context_dim is None,
        use_linear_projection=False,
    ).eval()
    _randomize(ours)
    # The key names are SD's in both, so no mapping is needed: a strict load is the check.
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 4, 6)
    context = None if context_dim is None else torch.randn(2, 7, context_dim)
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=context, return_dict=False)[0]
        torch.testing.assert_close(ours(x, context), want, rtol=1e-4, atol=1e-5)


def test_transformer_block_keeps_sd_key_layout_without_text() -> None:
    keys = set(BasicTransformerBlock(16, 2, 8).state_dict())
    for name in ("attn1.to_q.weight", "attn2.to_k.weight", "attn2.to_out.0.bias", "norm2.weight"):
        assert name in keys
    assert {"ff.net.0.proj.weight", "ff.net.2.weight", "norm3.bias"} <= keys


def test_spatial_transformer_starts_as_identity() -> None:
    x = torch.randn(1, 16, 4, 4)
    block = SpatialTransformer(16, 2, 8, context_dim=12, norm_groups=4)
    torch.testing.assert_close(block(x, torch.randn(1, 3, 12)), x)


def test_context_dim_mismatch_says_expected_and_got() -> None:
    block = SpatialTransformer(16, 2, 8, context_dim=12, norm_groups=4)
    x = torch.randn(1, 16, 4, 4)
    with pytest.raises(ValueError, match=r"expected last dim 12.*\(1, 3, 10\)"):
        block(x, torch.randn(1, 3, 10))
    with pytest.raises(ValueError, match="got None"):
        block(x, None)
    with pytest.raises(ValueError, match="context batch 2"):
        block(x, torch.randn(2, 3, 12))
    with pytest.raises(ValueError, match="no cross-attention"):
        SpatialTransformer(16, 2, 8, norm_groups=4)(x, torch.randn(1, 3, 12))
    with pytest.raises(ValueError, match="last dim 12"):
        CrossAttention(16, 12, heads=2, dim_head=8)(torch.randn(1, 5, 16), torch.randn(1, 3, 16))


# ----- masks and recorded maps (lesson 04) -----------------------------------------------------
def _naive_attention(attn: CrossAttention, x, context, keep=None):
    """softmax(Q K^T / sqrt(d)) V written out per batch item and head, loops and all."""
    h = attn.heads
    out = torch.zeros(x.shape[0], x.shape[1], attn.to_q.out_features)
    for b in range(x.shape[0]):
        ctx = context[b] if keep is None else context[b][keep[b]]
        q, k, v = attn.to_q(x[b]), attn.to_k(ctx), attn.to_v(ctx)
        d = q.shape[-1] // h
        for i in range(h):
            sl = slice(i * d, (i + 1) * d)
            w = torch.softmax(q[:, sl] @ k[:, sl].T / d**0.5, dim=-1)
            out[b, :, sl] = w @ v[:, sl]
    return attn.to_out(out)


def test_attention_with_and_without_a_mask_matches_a_naive_reference() -> None:
    attn = CrossAttention(16, 12, heads=2, dim_head=8).eval()
    _randomize(attn)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(3, 5, 16, generator=g), torch.randn(3, 7, 12, generator=g)
    keep = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7, [1, 0, 1, 0, 1, 0, 0]]).bool()
    with torch.no_grad():
        torch.testing.assert_close(attn(x, context), _naive_attention(attn, x, context))
        masked = attn(x, context, keep)
        torch.testing.assert_close(masked, _naive_attention(attn, x, context, keep))
        # the padded keys change nothing: row 0 equals attention over its 3 real tokens only
        torch.testing.assert_close(masked[:1], attn(x[:1], context[:1, :3]))
        assert not torch.allclose(masked[0], attn(x, context)[0], atol=1e-3)


def test_recorded_path_gives_the_same_output_and_maps_that_sum_to_one() -> None:
    from minisd.attention import record_attention

    block = SpatialTransformer(16, 2, 8, context_dim=12, norm_groups=4).eval()
    _randomize(block)
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 6, 12, generator=g)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()
    with torch.no_grad():
        fast = block(x, context, keep)
        with record_attention(block) as rec:
            slow = block(x, context, keep)
        after = block(x, context, keep)
    torch.testing.assert_close(slow, fast)
    assert torch.equal(after, fast)  # recording switched off again
    assert rec.layers() == ["transformer_blocks.0.attn2"] and len(rec.maps) == 1
    probs = rec.maps[0].probs  # (B, heads, H*W, M)
    assert probs.shape == (2, 2, 16, 6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 16))
    assert probs[0, ..., 4:].abs().max() == 0 and probs[1, ..., 2:].abs().max() == 0
    maps = rec.token_maps()  # (B, M, 4, 4): heads averaged, queries back on the grid
    assert maps.shape == (2, 6, 4, 4)
    torch.testing.assert_close(maps[1, 1], probs[1, :, :, 1].mean(0).view(4, 4))
    with pytest.raises(ValueError, match="no attention maps"):
        rec.token_maps(layer="nope")


def test_bad_masks_say_what_was_expected() -> None:
    attn = CrossAttention(16, 12, heads=2, dim_head=8)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    with pytest.raises(ValueError, match=r"shape \(2, 7\)"):
        attn(x, context, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one True"):
        attn(x, context, torch.zeros(2, 7, dtype=torch.bool))


def test_geglu_equals_diffusers_geglu_forward_and_backward():
    """GEGLU computes each half from its own weight rows; the map and its gradients are still
    diffusers' GEGLU (one projection, chunked) at identical weights."""
    from diffusers.models.activations import GEGLU as RefGEGLU

    torch.manual_seed(0)
    ours, ref = GEGLU(16, 24), RefGEGLU(16, 24)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = ours(xa), ref(xb)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out_a)
    out_a.backward(grad)
    out_b.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.proj.weight.grad, ref.proj.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.proj.bias.grad, ref.proj.bias.grad, rtol=1e-5, atol=1e-6)
    assert out_a.abs().min() > 0  # a real output, not a zero the two could share by accident
