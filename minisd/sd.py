"""Stable Diffusion at full size: the course's own classes with SD's presets, and SD's files.

    sd = load_checkpoint("v1-5-pruned-emaonly.safetensors")  # the official single file
    model = sd.diffusion_model()                            # a DiffusionModel, as in lesson 05
    images = model.sample(x_T, cond=["a photo of a cat"], guidance_scale=7.5)

A single-file checkpoint (CompVis' `.ckpt`, or its `.safetensors` conversion) holds the three
parts under ldm's prefixes: the U-Net under `model.diffusion_model.`, the autoencoder under
`first_stage_model.`, the text encoder under `cond_stage_model.transformer.` (SD v1, a
transformers CLIPTextModel) or `cond_stage_model.model.` (SD 2.x, OpenCLIP's layout), plus the
schedule's tables (`alphas_cumprod`, ...) and, in the full files, an EMA copy of the U-Net under
`model_ema.` with the dots of its names removed. Our modules carry ldm's names, so loading is a
prefix strip: `split_checkpoint` does it, `load_checkpoint` checks and loads strictly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minisd import unet as unet_presets
from minisd import vae as vae_presets
from minisd.pretrained import UNET_PREFIX, VAE_PREFIX
from minisd.schedule import NoiseSchedule
from minisd.unet import UNetConfig, UNetModel
from minisd.vae import AutoencoderKL

# SD v1's text encoder (transformers' CLIPTextModel keys) and SD 2.x's (OpenCLIP's keys)
CLIP_PREFIX, OPENCLIP_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."
# SD v1's files name the text weights as transformers 4 did (text_model.embeddings...);
# transformers 5's CLIPTextModel dropped that level, so its keys are matched either way.
TEXT_MODEL = "text_model."
# ldm's EMA copy: "model_ema." + the U-Net key after "model." with its dots removed
EMA_PREFIX = "model_ema."
# the schedule ldm stores with the weights; checked against the one we sample with
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev")
# SD 2.x reads OpenCLIP's penultimate layer (ldm's FrozenOpenCLIPEmbedder, layer="penultimate")
OPENCLIP_LAYERS_USED = 23
PREDICTIONS_OF = {"sd-v1": "eps", "sd-v1-inpainting": "eps"}  # SD 2.x: "eps" (base) or "v" (768)
PRESETS = ("sd-v1", "sd-v1-inpainting", "sd-v2", "sd-v2-inpainting")
# SD's inpainting U-Net: x_t (4) + the masked image's latent (4) + the mask (1)
INPAINTING_CONCAT_CHANNELS = 5
# SD's autoencoder at any image size: it is fully convolutional (no attention at a fixed
# resolution), and v1-inference.yaml's resolution 256 only recorded its training crops.
SD_VAE = dataclasses.replace(vae_presets.SD_V1, resolution=None)


def unet_config(preset: str) -> UNetConfig:
    """The U-Net config of an SD preset name (`PRESETS`)."""
    _check_preset(preset)
    base = unet_presets.SD_V2 if preset.startswith("sd-v2") else unet_presets.SD_V1
    if preset.endswith("inpainting"):
        c = INPAINTING_CONCAT_CHANNELS
        base = dataclasses.replace(base, in_channels=base.in_channels + c, concat_channels=c)
    return base


def text_encoder(preset: str):
    """SD's text encoder for a preset, random weights: CLIP ViT-L/14's (v1), OpenCLIP ViT-H/14's
    penultimate layers (v2), each with CLIP's BPE tokenizer."""
    from minisd.text import SD_V2_PAD_TOKEN, CLIPTextEncoder, sd_v2_text_config

    _check_preset(preset)
    if preset.startswith("sd-v2"):
        return CLIPTextEncoder(sd_v2_text_config(), pad_token=SD_V2_PAD_TOKEN)
    return CLIPTextEncoder()


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown Stable Diffusion preset {preset!r}: choose from {PRESETS}")


def sd_schedule() -> NoiseSchedule:
    """SD's training schedule: 1000 steps, linear in sqrt(beta) from 0.00085 to 0.012."""
    return NoiseSchedule("scaled_linear", 1000)


@dataclass
class StableDiffusion:
    """The three parts of a Stable Diffusion model, and what they were trained with."""

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: Any  # minisd.text.CLIPTextEncoder
    schedule: NoiseSchedule
    prediction: str  # "eps" or "v"
    preset: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def diffusion_model(self, image_size: int = 512, sampler=None):
        """A `DiffusionModel` (lesson 05's) over these parts: prompts through the text encoder,
        SD's DDIM sampler unless `sampler`, images of image_size x image_size."""
        from minisd.conditioning import TextConditioner
        from minisd.pretrained import DiffusionModel
        from minisd.sampling import SD_V1_SAMPLER

        if image_size % self.vae.config.downsampling_factor:
            raise ValueError(
                f"image_size must be a multiple of {self.vae.config.downsampling_factor} (the "
                f"autoencoder's factor), got {image_size}"
            )
        meta = {"format": "stable-diffusion", "preset": self.preset, **self.info}
        return DiffusionModel(
            self.unet, self.schedule, self.prediction, meta, self.vae, image_size,
            sampler or SD_V1_SAMPLER, TextConditioner(self.text_encoder),
        )  # fmt: skip

    def to(self, device=None, dtype: torch.dtype | None = None) -> StableDiffusion:
        for part in self.parts().values():
            part.to(device=device, dtype=dtype)
        return self


def perturb_constants(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Give every constant tensor (zero-initialised output layers, norms at 1 and 0) small
    random values: with default init those layers hide, and a wrong weight there would pass a
    comparison unseen. Random weights exercise every layer this way."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            if bool((flat == flat[0]).all()):
                p.add_(torch.randn(p.shape, generator=generator).to(p) * std)


def random_stable_diffusion(preset: str = "sd-v1", seed: int = 0) -> StableDiffusion:
    """SD's architecture with freshly initialised (untrained) weights, every layer in play
    (`perturb_constants`): what runs offline."""
    torch.manual_seed(seed)
    unet = UNetModel(unet_config(preset)).eval()
    vae = AutoencoderKL(SD_VAE).eval()
    perturb_constants(unet, seed)
    perturb_constants(vae, seed + 1)
    prediction = PREDICTIONS_OF.get(preset, "eps")
    info = {"weights": "random (untrained)", "seed": seed}
    return StableDiffusion(unet, vae, text_encoder(preset).eval(), sd_schedule(), prediction,
                           preset, info)  # fmt: skip


# ----- reading the single file ----------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint: `.safetensors`, or a `.ckpt`/`.pt` read with
    `torch.load(weights_only=True)` (never full unpickling: a pickle can run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: download an SD v1.x/2.x single file (e.g. "
            "v1-5-pruned-emaonly.safetensors) and pass its path"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:  # truncated, damaged, or not safetensors
            raise ValueError(
                f"{path.name} is not a readable safetensors file ({err}); download it again"
            ) from err
    if path.suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise ValueError(f"{path.name}: expected a .safetensors or .ckpt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # an unsafe pickle is refused here, not run
        raise ValueError(
            f"{path.name} could not be read as plain tensors with torch.load(weights_only=True) "
            f"({type(err).__name__}: {str(err)[:200]}); convert it to .safetensors instead"
        ) from err
    state = state.get("state_dict", state)  # ldm's Lightning checkpoints nest the weights
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def ema_key(unet_key: str) -> str:
    """Where ldm's EMA keeps a U-Net weight: `input_blocks.0.0.weight` ->
    `model_ema.diffusion_modelinput_blocks00weight` (LitEma removes the dots)."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def split_checkpoint(
    state: dict[str, torch.Tensor], ema: bool | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors by part, prefixes stripped: unet, vae, text (its own layout, see
    `text_layout`), schedule, and other (what none of them claims).

    ema: True uses the EMA copy of the U-Net (an error if absent), False the raw weights, None
    the EMA copy where the file has one (ldm samples with it)."""
    parts: dict[str, dict[str, torch.Tensor]] = {
        "unet": {}, "vae": {}, "text": {}, "schedule": {}, "other": {}
    }  # fmt: skip
    ema_state = {}
    for key, value in state.items():
        for part, prefix in (
            ("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text", CLIP_PREFIX),
            ("text", OPENCLIP_PREFIX),
        ):  # fmt: skip
            if key.startswith(prefix):  # OpenCLIP's keys keep a mark of their layout
                mark = "openclip." if prefix == OPENCLIP_PREFIX else ""
                parts[part][mark + key[len(prefix) :]] = value
                break
        else:
            if key.startswith(EMA_PREFIX):
                ema_state[key] = value
            elif key in SCHEDULE_KEYS or key.startswith(("sqrt_", "posterior_", "log_one_")):
                parts["schedule"][key] = value
            else:
                parts["other"][key] = value
    has_ema = any(ema_key(k) in ema_state for k in parts["unet"])
    if ema and not has_ema:
        raise ValueError("ema=True, but this file has no EMA copy of the U-Net (model_ema.*)")
    if has_ema and ema is not False:
        missing = [k for k in parts["unet"] if ema_key(k) not in ema_state]
        if missing:
            raise ValueError(f"the EMA copy lacks {len(missing)} U-Net weights, e.g. {missing[0]}")
        parts["unet"] = {k: ema_state[ema_key(k)] for k in parts["unet"]}
    parts["text"] = {
        k.removeprefix(TEXT_MODEL): v
        for k, v in parts["text"].items()
        if not k.endswith("embeddings.position_ids")  # a constant, not a weight
    }
    return parts


def _as_module_names(state: dict[str, torch.Tensor], module: torch.nn.Module) -> dict:
    """Text weights named as this transformers version's CLIPTextModel names them."""
    if next(iter(module.state_dict())).startswith(TEXT_MODEL):  # transformers 4
        return {TEXT_MODEL + k.removeprefix(TEXT_MODEL): v for k, v in state.items()}
    return {k.removeprefix(TEXT_MODEL): v for k, v in state.items()}


def text_layout(text_state: dict[str, torch.Tensor]) -> str:
    """ "clip" (transformers' names, SD v1) or "openclip" (OpenCLIP's, SD 2.x)."""
    return "openclip" if any(k.startswith("openclip.") for k in text_state) else "clip"


def openclip_to_transformers(
    text_state: dict[str, torch.Tensor], layers: int = OPENCLIP_LAYERS_USED
) -> dict[str, torch.Tensor]:
    """OpenCLIP's text-tower weights (keys `openclip.*` from `split_checkpoint`) under
    transformers' CLIPTextModel names (without text_model.), keeping the first `layers` blocks
    (SD 2.x: 23 of 24).

    OpenCLIP fuses q, k and v into one in_proj matrix (3 x width rows, in that order)."""
    src = {k.removeprefix("openclip."): v for k, v in text_state.items()}
    out = {
        "embeddings.token_embedding.weight": src["token_embedding.weight"],
        "embeddings.position_embedding.weight": src["positional_embedding"],
        "final_layer_norm.weight": src["ln_final.weight"],
        "final_layer_norm.bias": src["ln_final.bias"],
    }
    renames = {
        "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    }  # fmt: skip
    for i in range(layers):
        ours, theirs = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for old, new in renames.items():
            for what in ("weight", "bias"):
                out[ours + f"{new}.{what}"] = src[theirs + f"{old}.{what}"]
        for what in ("weight", "bias"):
            q, k, v = src[theirs + f"attn.in_proj_{what}"].chunk(3, dim=0)
            for name, tensor in zip(("q", "k", "v"), (q, k, v), strict=True):
                out[ours + f"self_attn.{name}_proj.{what}"] = tensor
    return out


def guess_preset(parts: dict[str, dict[str, torch.Tensor]], name: str = "this file") -> str:
    """Which SD the split file looks like, from its U-Net's shapes: the context width (768:
    v1, 1024: v2) and the input channels (9: an inpainting model)."""
    unet = parts["unet"]
    to_k = unet.get("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    first = unet.get("input_blocks.0.0.weight")
    if to_k is None or first is None:
        raise ValueError(
            f"{name} has no SD U-Net under 'model.diffusion_model.' (found "
            f"{len(unet)} U-Net tensors): is it a LoRA, a VAE or a diffusers file?"
        )
    version = {768: "sd-v1", 1024: "sd-v2"}.get(to_k.shape[1])
    if version is None:
        raise ValueError(f"a U-Net with {to_k.shape[1]}-d text context is not SD v1 (768) or 2.x")
    return version + ("-inpainting" if first.shape[1] == 9 else "")


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
                 preset: str, guessed: str | None) -> None:  # fmt: skip
    theirs, ours = set(state), set(module.state_dict())
    missing, unexpected = sorted(ours - theirs), sorted(theirs - ours)
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in module.state_dict().items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        hint = (
            f"; the file looks like {guessed!r}, pass preset={guessed!r}"
            if guessed and guessed != preset
            else ""
        )
        raise ValueError(
            f"the {what} in this file does not fit preset {preset!r}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
            f"{unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:2]}){hint}"
        )
    module.load_state_dict(state, strict=True, assign=True)


def check_schedule(schedule_state: dict[str, torch.Tensor], schedule: NoiseSchedule) -> str:
    """Compare the file's stored alphas_cumprod with the schedule we will sample with; raise if
    they differ, say 'checked' or 'not stored'."""
    stored = schedule_state.get("alphas_cumprod")
    if stored is None:
        return "not stored"
    ours = schedule.table("alphas_cumprod").to(torch.float64)
    stored = stored.to(torch.float64)
    if stored.shape != ours.shape or not torch.allclose(stored, ours, rtol=1e-4, atol=1e-6):
        raise ValueError(
            "the file's alphas_cumprod is not SD's schedule (1000 steps, scaled_linear "
            f"0.00085..0.012): stored {tuple(stored.shape)} values from {stored[0]:.6f} to "
            f"{stored[-1]:.6f}, ours from {ours[0]:.6f} to {ours[-1]:.6f}"
        )
    return "checked"


def load_checkpoint(
    path: str | os.PathLike,
    preset: str | None = None,
    prediction: str | None = None,
    ema: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusion:
    """An SD v1.x / 2.x single-file checkpoint as our classes, loaded strictly on the CPU.

    preset: None guesses it from the U-Net's shapes (`guess_preset`). prediction: what the U-Net
    predicts; SD v1 predicts eps, and SD 2.x files do not say: 768-px 2.x models (2.0-v, 2.1)
    predict v, the 512-px "base" ones eps, so a 2.x file needs prediction="v" or "eps".
    """
    sd = load_state(read_checkpoint(path), preset, prediction, ema, name=Path(path).name)
    return sd.to(dtype=dtype)


def load_state(
    state: dict[str, torch.Tensor],
    preset: str | None = None,
    prediction: str | None = None,
    ema: bool | None = None,
    *,
    name: str = "this file",
    configs: tuple[UNetConfig, Any, Any] | None = None,
) -> StableDiffusion:
    """`load_checkpoint` on tensors already read. configs: (U-Net config, autoencoder config,
    text encoder) to build instead of the preset's (small ones test the loading quickly)."""
    parts = split_checkpoint(state, ema)
    guessed = guess_preset(parts, name) if configs is None else None
    preset = preset or guessed or "sd-v1"
    _check_preset(preset)
    prediction = prediction or PREDICTIONS_OF.get(preset)
    if prediction not in ("eps", "v"):
        raise ValueError(
            f"{name} is an SD 2.x file, which does not say what it predicts: pass "
            'prediction="v" for the 768-px models (2.0-v, 2.1) or "eps" for the 512-px base ones'
        )
    unet_cfg, vae_cfg, encoder = configs or (unet_config(preset), SD_VAE, text_encoder(preset))
    with torch.device("meta"):  # no memory until the file's tensors are assigned
        unet, vae = UNetModel(unet_cfg), AutoencoderKL(vae_cfg)
    _load_strict(unet, parts["unet"], "U-Net", preset, guessed)
    _load_strict(vae, parts["vae"], "autoencoder", preset, guessed)
    text = parts["text"]
    if text_layout(text) == "openclip":
        text = openclip_to_transformers(text, encoder.transformer.config.num_hidden_layers)
    text = _as_module_names(text, encoder.transformer)
    _load_strict(encoder.transformer, text, "text encoder", preset, guessed)
    schedule = sd_schedule()
    info = {
        "weights": name,
        "ema": "used" if ema is not False and any(k.startswith(EMA_PREFIX) for k in state)
        else "raw weights",
        "schedule": check_schedule(parts["schedule"], schedule),
        "ignored": sorted(parts["other"])[:20],
    }  # fmt: skip
    return StableDiffusion(unet.eval(), vae.eval(), encoder.eval(), schedule, prediction, preset,
                           info)  # fmt: skip


# ----- writing it ------------------------------------------------------------------------------
def to_checkpoint(sd: StableDiffusion, ema: bool = False) -> dict[str, torch.Tensor]:
    """The single-file layout of `sd` (SD v1's text keys; with ema, the U-Net also as ldm's EMA
    copy): what `load_checkpoint` reads and what diffusers' from_single_file reads."""
    out = {UNET_PREFIX + k: v for k, v in sd.unet.state_dict().items()}
    out |= {VAE_PREFIX + k: v for k, v in sd.vae.state_dict().items()}
    text = sd.text_encoder.transformer.state_dict()
    out |= {CLIP_PREFIX + TEXT_MODEL + k.removeprefix(TEXT_MODEL): v for k, v in text.items()}
    if ema:
        out |= {ema_key(k): v for k, v in sd.unet.state_dict().items()}
    for name in SCHEDULE_KEYS:
        out[name] = sd.schedule.table(name).float()
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_checkpoint(sd: StableDiffusion, path: str | os.PathLike, ema: bool = False) -> Path:
    """Write the single file (`.safetensors`, atomically)."""
    from minisd.checkpoint import save_tensors

    if Path(path).suffix != ".safetensors":
        raise ValueError(f"write single files as .safetensors, got {Path(path).name}")
    return save_tensors(path, to_checkpoint(sd, ema), {"preset": sd.preset})


def _diffusers():
    try:
        import diffusers
        from diffusers.loaders import single_file_utils
    except ImportError as err:
        raise ImportError(
            "this needs diffusers (a dev dependency): pip install 'minisd[dev]'"
        ) from err
    return diffusers, single_file_utils


def to_diffusers_unet(unet: UNetModel):
    """diffusers' UNet2DConditionModel with this U-Net's architecture and weights, the keys
    mapped by diffusers' own converter: the reference our U-Net is checked against. A U-Net
    without text (context_dim None) is called with encoder_hidden_states=None there."""
    diffusers, convert = _diffusers()
    cfg = unet.config
    context_dim = cfg.context_dim
    if context_dim is None:  # no text: both attention layers attend to x, ldm's way and diffusers'
        mults = [m for i, m in enumerate(cfg.channel_mult) if 2**i in cfg.attention_resolutions]
        widths = {cfg.model_channels * m for m in [*mults, cfg.channel_mult[-1]]}  # + the middle
        if len(widths) != 1:
            raise ValueError(
                f"a U-Net without context attends at widths {sorted(widths)}: diffusers' "
                "UNet2DConditionModel takes one (cross_attention_dim)"
            )
        context_dim = widths.pop()
    heads = [cfg.heads(cfg.model_channels * m)[0] for m in cfg.channel_mult]
    attends = [2**i in cfg.attention_resolutions for i in range(len(cfg.channel_mult))]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)]
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(
            down_block_types=tuple(down), up_block_types=tuple(up),
            in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
            layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.norm_num_groups,
            cross_attention_dim=context_dim,
            attention_head_dim=heads[0] if len(set(heads)) == 1 else tuple(heads),  # SD v1: 8
            use_linear_projection=cfg.use_linear_in_transformer,
        )  # fmt: skip
    ldm = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    ref.load_state_dict(convert.convert_ldm_unet_checkpoint(ldm, dict(ref.config)), assign=True)
    return ref.eval()


def to_diffusers_vae(vae: AutoencoderKL):
    """diffusers' AutoencoderKL with this autoencoder's architecture and weights (diffusers'
    converter maps the keys)."""
    diffusers, convert = _diffusers()
    cfg = vae.config
    levels = len(cfg.ch_mult)
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(
            in_channels=cfg.in_channels, out_channels=cfg.out_ch, latent_channels=cfg.z_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
            layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.norm_num_groups,
            scaling_factor=cfg.scale_factor,
        )  # fmt: skip
    ldm = {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    ref.load_state_dict(convert.convert_ldm_vae_checkpoint(ldm, dict(ref.config)), assign=True)
    return ref.eval()


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the disagreement relative to the output's scale."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def export_diffusers(sd: StableDiffusion, folder: str | os.PathLike) -> Path:
    """Write `sd` as a diffusers folder (what StableDiffusionPipeline.from_pretrained reads).

    diffusers' own single-file converters map the keys, so this needs diffusers installed (a
    dev dependency); everything else in this module runs without it."""
    diffusers, _ = _diffusers()
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="epsilon" if sd.prediction == "eps" else "v_prediction",
    )  # fmt: skip
    pipe = diffusers.StableDiffusionPipeline(
        vae=to_diffusers_vae(sd.vae), text_encoder=sd.text_encoder.transformer,
        tokenizer=sd.text_encoder.tokenizer, unet=to_diffusers_unet(sd.unet),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return Path(folder)
