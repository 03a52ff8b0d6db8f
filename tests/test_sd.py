"""minisd.sd: SD's single-file checkpoints read into the course's classes, and parity with
diffusers at full size (slow: ~1 min and ~8 GB of memory each)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from helpers import randomize
from transformers import CLIPTextConfig

from minisd import sd as sdmod
from minisd.text import CLIPTextEncoder
from minisd.unet import SD_V2, TINY, UNetModel
from minisd.vae import SD_V1 as SD_V1_VAE
from minisd.vae import TINY as TINY_VAE
from minisd.vae import AutoencoderKL

# A small model in SD's layout: a 2-level cross-attention U-Net, a 2-level autoencoder, a
# 2-layer CLIP text encoder with the real tokenizer; the loading code cannot tell the difference.
SMALL_UNET = dataclasses.replace(
    TINY, in_channels=2, out_channels=2, num_res_blocks=1, attention_resolutions=(1, 2),
    context_dim=16, num_heads=2,
)  # fmt: skip
SMALL_TEXT = dict(
    vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=1, hidden_act="quick_gelu",
)  # fmt: skip


def small_configs():
    return SMALL_UNET, TINY_VAE, CLIPTextEncoder(CLIPTextConfig(**SMALL_TEXT))


def small_sd(seed: int = 0) -> sdmod.StableDiffusion:
    torch.manual_seed(seed)
    unet_cfg, vae_cfg, text = small_configs()
    unet, vae = UNetModel(unet_cfg).eval(), AutoencoderKL(vae_cfg).eval()
    randomize(unet, seed, 0.1)
    randomize(vae, seed + 1, 0.1)
    return sdmod.StableDiffusion(unet, vae, text.eval(), sdmod.sd_schedule(), "eps", "sd-v1")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# ----- the single file, both layouts -----------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_written_single_file_loads_back_weight_for_weight(tmp_path, suffix) -> None:
    ours = small_sd()
    state = sdmod.to_checkpoint(ours)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state  # SD's name
    path = tmp_path / f"model{suffix}"
    if suffix == ".ckpt":  # ldm's Lightning layout: the weights nested under "state_dict"
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[
            None
        ]
        torch.save({"state_dict": state, "global_step": 470000}, path)
    else:
        sdmod.save_checkpoint(ours, path)
    back = sdmod.load_state(sdmod.read_checkpoint(path), configs=small_configs())
    for name, part in ours.parts().items():
        _same_weights(part, back.parts()[name])
    assert back.info["schedule"] == "checked" and back.prediction == "eps"


def test_the_ema_copy_is_used_when_present_unless_refused() -> None:
    ours = small_sd()
    state = sdmod.to_checkpoint(ours, ema=True)
    key = "input_blocks.0.0.weight"
    assert sdmod.ema_key(key) == "model_ema.diffusion_modelinput_blocks00weight"
    state[sdmod.ema_key(key)] = state[sdmod.ema_key(key)] + 1.0  # EMA differs from the raw
    with_ema = sdmod.load_state(state, configs=small_configs())
    raw = sdmod.load_state(state, ema=False, configs=small_configs())
    torch.testing.assert_close(with_ema.unet.state_dict()[key], ours.unet.state_dict()[key] + 1)
    torch.testing.assert_close(raw.unet.state_dict()[key], ours.unet.state_dict()[key])
    assert with_ema.info["ema"] == "used" and raw.info["ema"] == "raw weights"
    with pytest.raises(ValueError, match="no EMA copy"):
        sdmod.load_state(sdmod.to_checkpoint(ours), ema=True, configs=small_configs())


def test_a_mismatch_lists_missing_and_unexpected_keys() -> None:
    state = sdmod.to_checkpoint(small_sd())
    del state["model.diffusion_model.out.2.weight"]
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing .*out\.2\.weight.*1 unexpected.*extra"):
        sdmod.load_state(state, configs=small_configs())


def test_a_wrong_schedule_is_refused() -> None:
    state = sdmod.to_checkpoint(small_sd())
    state["alphas_cumprod"] = state["alphas_cumprod"] ** 2
    with pytest.raises(ValueError, match="alphas_cumprod is not SD's schedule"):
        sdmod.load_state(state, configs=small_configs())
    del state["alphas_cumprod"]
    assert sdmod.load_state(state, configs=small_configs()).info["schedule"] == "not stored"


def test_the_preset_is_guessed_from_the_unets_shapes() -> None:
    for preset in sdmod.PRESETS:
        with torch.device("meta"):
            unet = UNetModel(sdmod.unet_config(preset))
        parts = {"unet": unet.state_dict()}
        assert sdmod.guess_preset(parts) == preset
    with pytest.raises(ValueError, match="no SD U-Net"):
        sdmod.guess_preset({"unet": {}})


def test_a_v2_file_must_say_what_it_predicts() -> None:
    with torch.device("meta"):
        unet = UNetModel(SD_V2)
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match='prediction="v"'):
        sdmod.load_state(state)


def test_unsafe_pickles_and_other_files_are_refused(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("this would have run",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        sdmod.read_checkpoint(path)
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match=".safetensors or .ckpt"):
        sdmod.read_checkpoint(tmp_path / "model.onnx")
    with pytest.raises(FileNotFoundError, match="v1-5-pruned-emaonly"):
        sdmod.read_checkpoint(tmp_path / "absent.safetensors")


# ----- SD 2.x's OpenCLIP text tower -------------------------------------------------------------
def test_openclip_keys_convert_to_a_clip_text_model_with_the_same_output() -> None:
    """An OpenCLIP text transformer's penultimate layer, then ln_final (what SD 2.x reads), equals
    transformers' CLIPTextModel with one layer fewer, loaded through openclip_to_transformers."""
    from open_clip.transformer import TextTransformer

    torch.manual_seed(0)
    ref = TextTransformer(
        context_length=77, vocab_size=49408, width=32, heads=4, layers=3, output_dim=16
    ).eval()
    randomize(ref, 0, 0.05)
    state = {"openclip." + k: v for k, v in ref.state_dict().items()}
    cfg = dict(SMALL_TEXT, hidden_size=32, intermediate_size=128, num_attention_heads=4,
               num_hidden_layers=2, hidden_act="gelu")  # fmt: skip
    ours = CLIPTextEncoder(CLIPTextConfig(**cfg)).eval()
    converted = sdmod.openclip_to_transformers(state, layers=2)
    ours.transformer.load_state_dict(sdmod._as_module_names(converted, ours.transformer))
    ids = ours.tokenize(["a photo of a cat", ""])
    with torch.no_grad():
        x = ref.token_embedding(ids) + ref.positional_embedding
        for block in ref.transformer.resblocks[:-1]:  # all but the last: the penultimate layer
            x = block(x, attn_mask=ref.attn_mask)
        want = ref.ln_final(x)
        torch.testing.assert_close(ours(ids), want, rtol=1e-5, atol=1e-5)


# ----- export to diffusers -----------------------------------------------------------------------
def test_the_diffusers_export_loads_in_diffusers_and_computes_the_same(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    ours = small_sd()
    sdmod.export_diffusers(ours, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    ids = ours.text_encoder.tokenize(["a cat"])
    x, t = torch.randn(1, 2, 8, 8), torch.tensor([500])
    with torch.no_grad():
        context = ours.text_encoder(ids)
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, context)
        want = pipe.unet(x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(ours.unet(x, t, context), want, rtol=1e-4, atol=1e-5)
        z = torch.randn(1, 2, 4, 4)
        torch.testing.assert_close(
            ours.vae.decode(z), pipe.vae.decode(z).sample, rtol=1e-4, atol=1e-5
        )
    assert pipe.tokenizer("a cat")["input_ids"] == ours.text_encoder.tokenizer("a cat")["input_ids"]
    assert (
        pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.set_alpha_to_one is False
    )


# ----- full-size parity with diffusers (the proof of architecture) ------------------------------
def test_perturb_constants_wakes_the_zeroed_layers_and_leaves_the_rest() -> None:
    torch.manual_seed(0)
    unet = UNetModel(SMALL_UNET)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    assert not before["out.2.weight"].any()  # zero-initialised, as in ldm
    sdmod.perturb_constants(unet, 0)
    after = unet.state_dict()
    assert after["out.2.weight"].any() and after["out.0.weight"].std() > 0  # GroupNorm's 1s
    torch.testing.assert_close(after["input_blocks.0.0.weight"], before["input_blocks.0.0.weight"])


def _architecture(model) -> dict:
    """A diffusers model's config without its bookkeeping (`_use_default_values`, ...)."""
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd-v1", "sd-v2"])
def test_full_size_unet_equals_diffusers(preset: str) -> None:
    cfg = sdmod.unet_config(preset)
    torch.manual_seed(0)
    ours = UNetModel(cfg).eval()
    sdmod.perturb_constants(ours, 0)
    ref_cfg = (
        dict(cross_attention_dim=768)
        if preset == "sd-v1"
        else dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True)
    )  # fmt: skip
    with torch.device("meta"):
        ref = UNet2DConditionModel(**ref_cfg)
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    ref.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(ref.config)), assign=True)
    del ldm
    # the library's reference builder (export, notebook) makes the same model
    assert _architecture(sdmod.to_diffusers_unet(ours)) == _architecture(ref)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 32, 32, generator=gen)
    context = torch.randn(1, 77, cfg.context_dim, generator=gen)
    t = torch.tensor([601])
    with torch.no_grad():
        want = ref.eval()(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    assert sdmod.max_relative_error(got, want) < 1e-4


@pytest.mark.slow
def test_full_size_autoencoder_equals_diffusers() -> None:
    torch.manual_seed(0)
    ours = AutoencoderKL(sdmod.SD_VAE).eval()
    sdmod.perturb_constants(ours, 0)
    with torch.device("meta"):
        ref = DiffusersVAE(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        )  # fmt: skip
    ldm = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    ref.load_state_dict(convert_ldm_vae_checkpoint(ldm, dict(ref.config)), assign=True)
    mine, theirs = _architecture(sdmod.to_diffusers_vae(ours)), _architecture(ref)
    assert mine.pop("scaling_factor") == 0.18215 and theirs.pop("scaling_factor") == 0.18215
    assert mine == theirs
    assert dataclasses.replace(SD_V1_VAE, resolution=None) == sdmod.SD_VAE
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 256, 256, generator=gen) * 2 - 1  # 32x32 latents
    z = torch.randn(1, 4, 32, 32, generator=gen)
    with torch.no_grad():
        post, ref_post = ours.encode(image), ref.eval().encode(image).latent_dist
        assert sdmod.max_relative_error(post.mean, ref_post.mean) < 1e-4
        assert sdmod.max_relative_error(post.logvar, ref_post.logvar) < 1e-4
        assert sdmod.max_relative_error(ours.decode(z), ref.decode(z).sample) < 1e-4


def test_a_unet_without_text_equals_diffusers_with_no_encoder_states() -> None:
    from minisd.unet import MNIST

    torch.manual_seed(0)
    ours = UNetModel(MNIST).eval()
    sdmod.perturb_constants(ours, 0)
    ref = sdmod.to_diffusers_unet(ours)  # both attention layers attend to x, as ldm's do
    assert ref.config.cross_attention_dim == 64 and sum(p.numel() for p in ref.parameters()) == sum(
        p.numel() for p in ours.parameters()
    )
    x, t = (
        torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1)),
        torch.tensor([3, 700]),
    )
    with torch.no_grad():
        assert (
            sdmod.max_relative_error(ours(x, t), ref(x, t, encoder_hidden_states=None).sample)
            < 1e-5
        )
    with pytest.raises(ValueError, match="attends at widths"):
        sdmod.to_diffusers_unet(UNetModel(dataclasses.replace(MNIST, attention_resolutions=(1, 4))))
