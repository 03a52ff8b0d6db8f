"""minisd.unet: SD v1's layout, parity with diffusers' U-Net at identical weights, input checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.embeddings import get_timestep_embedding
from helpers import assert_one_to_one, randomize, tagged

from minisd.schedule import NoiseSchedule
from minisd.summary import count_parameters
from minisd.unet import (
    MNIST,
    SD_V1,
    SD_V1_NUM_PARAMS,
    SD_V2,
    SD_V2_NUM_PARAMS,
    TINY,
    UNetConfig,
    UNetModel,
    timestep_embedding,
)

# The SD v1 checkpoint stores the U-Net under this prefix; diffusers' converter expects it.
LDM_PREFIX = "model.diffusion_model."


def _sd_v1_on_meta() -> UNetModel:
    with torch.device("meta"):  # shapes only, no memory: building 860M parameters takes ~0.1 s
        return UNetModel(SD_V1)


# ----- timestep embedding --------------------------------------------------------------------
@pytest.mark.parametrize("dim", [8, 7, 320])
def test_timestep_embedding_matches_diffusers_sd_convention(dim: int) -> None:
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    # SD's diffusers config uses flip_sin_to_cos=True, freq_shift=0: exactly ldm's cos-then-sin.
    want = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, dim), want)


def test_timestep_embedding_puts_cos_first() -> None:
    emb = timestep_embedding(torch.zeros(1), 6)
    torch.testing.assert_close(emb, torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]))


# ----- the Stable Diffusion v1 layout -------------------------------------------------------------
def test_sd_v1_has_the_known_parameter_count() -> None:
    assert count_parameters(_sd_v1_on_meta()) == SD_V1_NUM_PARAMS == 859_520_964


def test_sd_v1_state_dict_uses_checkpoint_key_names() -> None:
    sd = _sd_v1_on_meta().state_dict()
    assert len(sd) == 686  # tensors under model.diffusion_model. in sd-v1-4.ckpt
    shapes = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.transformer_blocks.0.attn1.to_out.0.weight": (1280, 1280),
        "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_sd_v1_keys_convert_one_to_one_onto_diffusers() -> None:
    """diffusers' ldm->diffusers converter must fill every key of its SD v1 U-Net, shapes equal."""
    ours = tagged(_sd_v1_on_meta().state_dict(), LDM_PREFIX)
    with torch.device("meta"):
        ref = UNet2DConditionModel(cross_attention_dim=768)  # the other defaults are SD v1's
    converted = convert_ldm_unet_checkpoint(ours, dict(ref.config))
    assert_one_to_one(converted, ref.state_dict(), len(ours))


# ----- Stable Diffusion 2.x: the same class; 64-channel heads, 1024-d context, Linear projections
def _sd_v2_reference() -> UNet2DConditionModel:
    """diffusers' U-Net built from SD 2.1's config (stabilityai/stable-diffusion-2-1, unet/)."""
    return UNet2DConditionModel(
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),  # heads per level: 320/64, 640/64, 1280/64
        use_linear_projection=True,
    )


def test_sd_v2_has_the_parameter_count_of_diffusers_sd21_unet() -> None:
    with torch.device("meta"):
        ours, ref = UNetModel(SD_V2), _sd_v2_reference()
    assert count_parameters(ours) == count_parameters(ref) == SD_V2_NUM_PARAMS == 865_910_724
    assert SD_V2.heads(320) == (5, 64) and SD_V2.heads(1280) == (20, 64)
    sd = ours.state_dict()
    assert tuple(sd["input_blocks.1.1.proj_in.weight"].shape) == (320, 320)  # Linear, not 1x1
    assert tuple(sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (320, 1024)


def test_sd_v2_keys_convert_one_to_one_onto_diffusers() -> None:
    with torch.device("meta"):
        ours, ref = UNetModel(SD_V2), _sd_v2_reference()
    tagged_ours = tagged(ours.state_dict(), LDM_PREFIX)
    converted = convert_ldm_unet_checkpoint(tagged_ours, dict(ref.config))
    assert_one_to_one(converted, ref.state_dict(), len(tagged_ours))


def test_linear_projection_transformer_matches_diffusers_at_identical_weights() -> None:
    """SD 2.x's Linear proj_in/proj_out through a whole small U-Net, via diffusers' converter."""
    cfg = dataclasses.replace(
        TINY, num_res_blocks=1, attention_resolutions=(1, 2), context_dim=12, num_heads=-1,
        num_head_channels=4, use_linear_in_transformer=True,
    )  # fmt: skip
    ours = UNetModel(cfg).eval()
    randomize(ours)
    ref = UNet2DConditionModel(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        attention_head_dim=(2, 4), norm_num_groups=4, use_linear_projection=True,
    ).eval()  # fmt: skip
    ldm_sd = {LDM_PREFIX + k: v for k, v in ours.state_dict().items()}
    ref.load_state_dict(convert_ldm_unet_checkpoint(ldm_sd, dict(ref.config)))
    x, t, context = torch.randn(2, 3, 8, 8), torch.tensor([3, 250]), torch.randn(2, 5, 12)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=context, return_dict=False)[0]
        torch.testing.assert_close(ours(x, t, context), want, rtol=1e-4, atol=1e-4)
    conv = UNetModel(dataclasses.replace(cfg, use_linear_in_transformer=False)).eval()
    assert set(conv.state_dict()) == set(ours.state_dict())  # same keys, other shapes


def test_tiny_unet_matches_diffusers_at_identical_weights() -> None:
    """Full forward parity (time, text and class conditioning, skips) via diffusers' converter."""
    cfg = dataclasses.replace(
        TINY, num_res_blocks=2, attention_resolutions=(1, 2), context_dim=12, num_classes=3
    )
    ours = UNetModel(cfg).eval()
    randomize(ours)
    ref = UNet2DConditionModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=(1, 2),  # diffusers' legacy name for the number of heads
        norm_num_groups=4,
        num_class_embeds=cfg.num_classes + 1,  # our null class is the extra row
    ).eval()
    ldm_sd = {LDM_PREFIX + k: v for k, v in ours.state_dict().items()}
    ref.load_state_dict(convert_ldm_unet_checkpoint(ldm_sd, dict(ref.config)))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 250])
    context, y = torch.randn(2, 5, 12), torch.tensor([1, ours.null_class])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=context, class_labels=y, return_dict=False)[0]
        torch.testing.assert_close(ours(x, t, context, y), want, rtol=1e-4, atol=1e-4)


# ----- shapes, presets and invariants -------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_output_has_the_input_shape(channels: int) -> None:
    model = UNetModel(dataclasses.replace(TINY, in_channels=channels, out_channels=channels))
    x = torch.randn(2, channels, 8, 12)
    assert model(x, torch.tensor([0, 99])).shape == x.shape


def test_out_channels_can_differ_from_in_channels() -> None:
    model = UNetModel(dataclasses.replace(TINY, in_channels=4, out_channels=8))
    assert model(torch.randn(1, 4, 8, 8), 5).shape == (1, 8, 8, 8)


def test_presets_have_the_advertised_sizes() -> None:
    assert count_parameters(UNetModel(TINY)) < 100_000
    mnist = UNetModel(MNIST)
    assert 2_000_000 < count_parameters(mnist) < 4_000_000
    assert mnist(torch.randn(1, 1, 28, 28), 10).shape == (1, 1, 28, 28)


def test_scalar_timestep_broadcasts_over_the_batch() -> None:
    model = UNetModel(TINY).eval()
    randomize(model)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 7), model(x, torch.full((3,), 7)))


def test_eval_mode_is_deterministic_and_dropout_is_wired() -> None:
    model = UNetModel(dataclasses.replace(TINY, dropout=0.5))
    randomize(model)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 50])
    with torch.no_grad():
        assert not torch.equal(model.train()(x, t), model(x, t))
        assert torch.equal(model.eval()(x, t), model(x, t))


def test_class_conditioning_has_a_null_class() -> None:
    model = UNetModel(dataclasses.replace(TINY, num_classes=10))
    assert model.null_class == 10 and model.label_emb.num_embeddings == 11
    randomize(model)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 50])
    with torch.no_grad():
        assert not torch.allclose(
            model(x, t, y=torch.tensor([3, 3])), model(x, t, y=torch.full((2,), 10))
        )


def test_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = UNetModel(TINY)
    schedule = NoiseSchedule("linear", 100)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([5, 30, 60, 95])
    x_t = schedule.add_noise(x0, noise, t)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x_t, t), noise)  # epsilon prediction (DDPM eq. 14)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ----- the three ways to condition (lesson 04) ------------------------------------------------
def test_scale_shift_resblock_matches_diffusers() -> None:
    from diffusers.models.resnet import ResnetBlock2D

    from minisd.unet import ResBlock

    ours = ResBlock(8, 32, out_channels=16, norm_groups=4, use_scale_shift_norm=True).eval()
    ref = ResnetBlock2D(
        in_channels=8,
        out_channels=16,
        temb_channels=32,
        groups=4,
        eps=1e-5,
        time_embedding_norm="scale_shift",
    ).eval()
    randomize(ours)
    names = {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    }
    state = {}
    for k, v in ours.state_dict().items():
        module, param = k.rsplit(".", 1)
        state[f"{names[module]}.{param}"] = v
    ref.load_state_dict(state)
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, emb), ref(x, emb))
    assert ours.emb_layers[1].out_features == 32  # a scale and a shift per channel


def test_adaptive_normalization_carries_time_and_class() -> None:
    cfg = dataclasses.replace(TINY, use_scale_shift_norm=True, num_classes=10)
    model = UNetModel(cfg).eval()
    randomize(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x, 10, y=torch.tensor([3, 3]))
        assert not torch.allclose(out, model(x, 10, y=torch.tensor([4, 4])), atol=1e-4)
        assert not torch.allclose(out, model(x, 500, y=torch.tensor([3, 3])), atol=1e-4)
    # the default keeps today's additive embedding, so old checkpoints load unchanged
    assert UNetModel(TINY).state_dict().keys() == model.state_dict().keys() - {"label_emb.weight"}
    UNetModel(TINY).load_state_dict(UNetModel(dataclasses.replace(TINY)).state_dict())


def test_concatenation_stacks_the_condition_onto_x_t() -> None:
    cfg = dataclasses.replace(TINY, in_channels=5, concat_channels=2)
    model = UNetModel(cfg).eval()
    randomize(model)
    assert cfg.noise_channels == 3 and model.input_blocks[0][0].in_channels == 5
    x, image = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        out = model(x, 5, concat=image)
        assert out.shape == (2, 3, 8, 8)
        assert not torch.allclose(out, model(x, 5, concat=-image), atol=1e-4)
        # the same as one U-Net fed the 5 channels by hand
        plain = UNetModel(dataclasses.replace(TINY, in_channels=5)).eval()
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(plain(torch.cat([x, image], 1), 5), out)
    with pytest.raises(ValueError, match=r"concatenates an image of shape \(2, 2, 8, 8\)"):
        model(x, 5)
    with pytest.raises(ValueError, match="takes no concatenated image"):
        UNetModel(TINY)(x, 5, concat=image)
    with pytest.raises(ValueError, match="concat_channels must be in"):
        dataclasses.replace(TINY, concat_channels=3)


def test_cross_attention_reads_the_text_and_ignores_masked_padding() -> None:
    model = UNetModel(dataclasses.replace(TINY, context_dim=12)).eval()
    randomize(model)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).bool()
    with torch.no_grad():
        out = model(x, 7, context, context_mask=keep)
        assert not torch.allclose(out, model(x, 7, -context, context_mask=keep), atol=1e-4)
        # what the mask hides cannot matter: new values in the padding leave the output alone
        noisy = torch.where(keep[..., None], context, torch.randn(2, 5, 12, generator=g))
        torch.testing.assert_close(model(x, 7, noisy, context_mask=keep), out)
        assert not torch.allclose(model(x, 7, noisy), out, atol=1e-4)
    with pytest.raises(ValueError, match="context_mask without a context"):
        UNetModel(TINY)(x, 7, context_mask=keep)


# ----- helpful errors -------------------------------------------------------------------------
def test_bad_inputs_raise_helpful_errors() -> None:
    model = UNetModel(TINY)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*got \(2, 1, 8, 8\)"):
        model(torch.randn(2, 1, 8, 8), t)
    with pytest.raises(ValueError, match=r"\(9, 8\) must be a multiple of 2.*pad or resize"):
        model(torch.randn(2, 3, 9, 8), t)
    with pytest.raises(ValueError, match=r"\(30, 30\) must be a multiple of 4"):
        UNetModel(MNIST)(torch.randn(1, 1, 30, 30), 0)
    with pytest.raises(ValueError, match=r"t must be a scalar or shape \(2,\)"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="no cross-attention"):
        model(x, t, context=torch.randn(2, 4, 12))
    with pytest.raises(ValueError, match="not class-conditional"):
        model(x, t, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"expected last dim 12, got shape \(2, 4, 10\)"):
        UNetModel(dataclasses.replace(TINY, context_dim=12))(x, t, torch.randn(2, 4, 10))


def test_bad_labels_raise_helpful_errors() -> None:
    model = UNetModel(dataclasses.replace(TINY, num_classes=10))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"pass y of shape \(2,\).*10 \(model.null_class\)"):
        model(x, t)
    with pytest.raises(ValueError, match=r"labels in \[0, 10\]"):
        model(x, t, y=torch.tensor([0, 11]))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"norm_num_groups": 32}, "lower norm_num_groups"),
        ({"attention_resolutions": (4,)}, r"choose from \[1, 2\], got \(4,\)"),
        ({"num_head_channels": 3}, "not divisible by num_head_channels=3"),
        ({"num_head_channels": -1}, "set num_heads or num_head_channels"),
        ({"channel_mult": ()}, "channel_mult"),
    ],
)
def test_bad_configs_raise_helpful_errors(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.model_channels = 16  # type: ignore[misc]
    assert isinstance(SD_V1, UNetConfig)
