"""Shipped models: U-Nets with the schedule and target they were trained with, and autoencoders.

A pixel-space diffusion checkpoint stores the U-Net's keys as they are. A latent one stores the
U-Net and its autoencoder together with SD v1's prefixes (`model.diffusion_model.`,
`first_stage_model.`), the layout of the official Stable Diffusion checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minisd.checkpoint import file_sha256, load_json, load_tensors, save_tensors, write_sidecar
from minisd.conditioning import Conditioner, conditioner_for
from minisd.diffusion import v_to_eps_fn
from minisd.sampling import Callback, EpsFn, SamplerConfig
from minisd.schedule import NoiseSchedule
from minisd.unet import UNetConfig, UNetModel
from minisd.vae import AutoencoderConfig, AutoencoderKL

CHECKPOINTS = Path(__file__).resolve().parent.parent / "data" / "checkpoints"
FORMAT = "minisd.diffusion/1"
AUTOENCODER_FORMAT = "minisd.autoencoder/1"
NOISY_CLASSIFIER_FORMAT = "minisd.noisy-classifier/1"
# SD v1's checkpoint prefixes, used by latent diffusion checkpoints.
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
# and the text encoder's (SD v1: cond_stage_model.transformer.text_model.*)
TEXT_PREFIX = "cond_stage_model."


@dataclass
class DiffusionModel:
    """A trained noise predictor and everything needed to sample from it: the one owner of a
    model's parts. It alone knows the sample shape, whether to clip, how to condition and decode.

    unet: the noise (or v) predictor; schedule and prediction: what it was trained with;
    vae: latent diffusion's autoencoder (samples are latents to decode), None for pixels;
    image_size: side of the decoded images (latent models; pixel models take any size);
    sampler: how to sample by default (`SamplerConfig`); pixel models clip x0 to [-1, 1],
    latent ones do not. conditioner: how conditions reach the U-Net; None takes the one its
    config asks for (class labels) or, for a `ConditionedUNet`, the one it carries.
    """

    unet: UNetModel
    schedule: NoiseSchedule
    prediction: str  # "eps" or "v"
    metadata: dict[str, Any]
    vae: AutoencoderKL | None = None
    image_size: int | None = None
    sampler: SamplerConfig | None = None
    conditioner: Conditioner | None = None

    def __post_init__(self) -> None:
        if self.sampler is None:
            steps = min(SamplerConfig.steps, self.schedule.num_timesteps)  # DDIM-50, or all T
            self.sampler = SamplerConfig(steps=steps, clip_x0=None if self.is_latent else 1.0)
        if self.conditioner is None:
            self.conditioner = conditioner_for(self.unet)
        if getattr(self.unet.config, "context_dim", None) is not None and self.conditioner is None:
            raise ValueError(
                "this U-Net cross-attends to text (context_dim is set): pass "
                "conditioner=TextConditioner(encoder) so prompts can reach it"
            )

    @property
    def is_latent(self) -> bool:
        """Latent diffusion: the U-Net works on an autoencoder's latents, not on pixels."""
        return self.vae is not None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def sample_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of what the sampler draws: latents for latent models, else None (any size)."""
        if self.vae is None:
            return None
        cfg = self.vae.config
        side = (cfg.resolution or self.image_size) // cfg.downsampling_factor  # padded size
        return (self.unet.config.noise_channels, side, side)

    def noise_shape(self, image_size: int = 28) -> tuple[int, int, int]:
        """(C, H, W) of x_T: the latent shape, or image_size x image_size pixels."""
        return self.sample_shape or (self.unet.config.noise_channels, image_size, image_size)

    def sampler_config(self, sampler: str | None = None, steps: int | None = None, **changes):
        """This model's sampler config with another sampler, number of steps or option."""
        if sampler is not None:
            changes["sampler"] = sampler
        if steps is not None:
            changes["steps"] = steps
        return dataclasses.replace(self.sampler, **changes)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images from samples: decode latents (and crop any padding), or pixels as they are."""
        if self.vae is None:
            return x
        from minisd.latent import decode_images

        dtype = next(self.vae.parameters()).dtype  # a bf16 autoencoder decodes bf16 latents
        return decode_images(self.vae, x.to(dtype), self.image_size).to(x.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """What the sampler works on for these images in [-1, 1]: their scaled latents (padded
        to the autoencoder's size), or the pixels themselves. The inverse of `decode`."""
        if self.vae is None:
            return images.to(self.device)
        from minisd.latent import encode_images

        dtype = next(self.vae.parameters()).dtype
        return encode_images(self.vae, images.to(dtype)).float().to(self.device)

    @torch.no_grad()
    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        # The sampler keeps x in fp32; a bf16/fp16 U-Net gets its own dtype and answers in fp32.
        dtype = next(self.unet.parameters()).dtype
        kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model_kwargs.items()}
        return self.unet(x.to(dtype), t, **kwargs).to(x.dtype)  # eps or v, as the model predicts

    def eps_fn(self, **model_kwargs: Any) -> EpsFn:
        """The callable samplers take: eps_theta(x_t, t), whatever the model predicts."""

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self._model_fn(x, t, **model_kwargs)

        return model_fn if self.prediction == "eps" else v_to_eps_fn(model_fn, self.schedule)

    def guided_eps_fn(
        self, cond: Any, n: int, scale: float = 1.0, negative: Any = None, extra: dict | None = None
    ) -> EpsFn:
        """The eps_fn for n samples under `cond`, with classifier-free guidance at `scale`
        (1: none; see `minisd.guidance`); `negative`: a condition to steer away from in place
        of the null one. extra: U-Net inputs both halves get (SD's inpainting model: the masked
        image as `concat`). The outputs are combined before a v-model's are turned into noise
        (the two are linear, so it is the same)."""
        from minisd.guidance import check_scale, classifier_free

        extra = extra or {}
        scale, kwargs = check_scale(scale), self.condition(cond, n) | extra
        if scale == 1.0:
            return self.eps_fn(**kwargs)
        if self.conditioner is None:
            raise ValueError(f"guidance scale {scale}: this model is unconditional; use scale 1")
        null = self.condition(negative, n) | extra
        guided = classifier_free(self._model_fn, kwargs, null, scale)
        return guided if self.prediction == "eps" else v_to_eps_fn(guided, self.schedule)

    def condition_batch(self, cond: Any, n: int) -> torch.Tensor | None:
        """n conditions as one tensor on the model's device (the conditioner's `batch`), which
        can be sliced into sampling batches; None for an unconditional model."""
        if self.conditioner is None:
            if cond is not None:
                raise ValueError(
                    "this model is unconditional: it takes no condition (pass cond=None)"
                )
            return None
        return self.conditioner.batch(cond, n, self.device)

    def condition(self, cond: Any, n: int) -> dict[str, torch.Tensor]:
        """The U-Net's keyword arguments for n samples under `cond` (None: unconditional)."""
        batch = self.condition_batch(cond, n)
        return {} if batch is None else self.conditioner.model_kwargs(batch)

    @torch.no_grad()
    def sample(
        self,
        x_T: torch.Tensor,
        config: SamplerConfig | None = None,
        *,
        cond: Any = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = False,
        guidance_scale: float = 1.0,
        negative: Any = None,
    ) -> torch.Tensor:
        """Images in [-1, 1] from noise x_T: sample (this model's sampler unless `config`),
        decode latents, clamp. cond: a label or prompt, or one per sample; None is the null one.
        guidance_scale (1: none) and negative: classifier-free guidance (`guided_eps_fn`)."""
        config = config or self.sampler
        if x_T.device != self.device:
            raise ValueError(
                f"x_T is on {x_T.device}, the model on {self.device}; "
                "pass x_T.to(model.device) (evaluation.generate does)"
            )
        eps_fn = self.guided_eps_fn(cond, len(x_T), guidance_scale, negative)
        x0 = config.sample(
            eps_fn, x_T, self.schedule, generator=generator, callback=callback, progress=progress
        )
        return self.decode(x0).clamp(-1, 1)


def save_diffusion(
    path: str | os.PathLike,
    unet: UNetModel,
    schedule: NoiseSchedule,
    prediction: str,
    dtype: torch.dtype = torch.float16,
    vae: AutoencoderKL | None = None,
    image_size: int | None = None,
    sampler: SamplerConfig | None = None,
    conditioner: Any = None,
) -> Path:
    """Save a U-Net's weights (fp16 by default: half the size, same samples) with how to use it.

    With `vae` (latent diffusion) the autoencoder is stored too, SD-style, and `image_size` is the
    side of the images the latents decode to (MNIST: 28, cropped from the autoencoder's 32).
    `sampler` is stored as the model's default way to sample (else DiffusionModel's default).
    A text model's conditioner (or the one a `ConditionedUNet` carries) is recorded by its
    encoder's spec, and the encoder's weights are stored unless it is a named pretrained one.
    """
    from minisd.conditioning import TextConditioner

    conditioner = conditioner or getattr(unet, "conditioner", None)
    unet = getattr(unet, "unet", unet)  # a ConditionedUNet's U-Net
    tensors = _half(unet.state_dict(), dtype, UNET_PREFIX if vae is not None else "")
    if vae is not None:
        if image_size is None:
            raise ValueError("a latent diffusion checkpoint needs image_size (e.g. 28 for MNIST)")
        tensors.update(_half(vae.state_dict(), dtype, VAE_PREFIX))
    meta = {
        "format": FORMAT,
        "unet_config": dataclasses.asdict(unet.config),
        "schedule": schedule.to_dict(),
        "prediction": prediction,
    }
    if vae is not None:
        meta["autoencoder_config"] = dataclasses.asdict(vae.config)
        meta["image_size"] = image_size
    if sampler is not None:
        meta["sampler"] = dataclasses.asdict(sampler)
    if isinstance(conditioner, TextConditioner):
        from minisd.text import encoder_spec, stores_weights

        meta["text_encoder"] = encoder_spec(conditioner.encoder)
        if stores_weights(conditioner.encoder):
            tensors.update(_half(conditioner.encoder.state_dict(), dtype, TEXT_PREFIX))
    return save_tensors(path, tensors, meta)


def _half(state: dict[str, torch.Tensor], dtype: torch.dtype, prefix: str) -> dict:
    return {prefix + k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _strip(tensors: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> dict:
    return {k[len(prefix) :]: v.to(dtype) for k, v in tensors.items() if k.startswith(prefix)}


def _config(cls: type, fields: dict[str, Any]) -> Any:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _open(path: str | os.PathLike, fmt: str, what: str, command: str) -> tuple[dict, dict]:
    """Tensors and metadata of a `fmt` checkpoint, with its JSON sidecar and its SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no {what} checkpoint at {path}; the shipped ones are in {CHECKPOINTS}, and "
            f"`python -m minisd {command} --export PATH` writes new ones"
        )
    sha256 = file_sha256(path)  # of the bytes about to be loaded, so a measurement can cite them
    tensors, meta = load_tensors(path)
    meta["weights_sha256"] = sha256
    if meta.get("format") != fmt:
        raise ValueError(
            f"{path} is not a minisd {what} checkpoint (format {meta.get('format')!r})"
        )
    sidecar = path.with_suffix(".json")
    meta["sidecar"] = load_json(sidecar) if sidecar.is_file() else {}
    recorded = meta["sidecar"].get("weights_sha256")
    if recorded is not None and recorded != sha256:  # a flipped bit, a partial copy, a swap
        raise ValueError(
            f"{path} is not the file its sidecar {sidecar.name} describes (SHA-256 "
            f"{sha256[:12]}... vs {recorded[:12]}... recorded): the weights were changed or "
            "damaged; copy or download them again (or delete the stale sidecar)"
        )
    return tensors, meta


def _fill(module: torch.nn.Module, state: dict[str, torch.Tensor], path, what: str) -> None:
    """load_state_dict, strictly, with a message that says what does not fit and why."""
    ours = module.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    both = sorted(set(ours) & set(state))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(ours[k].shape)}"
        for k in both
        if ours[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path}: the {what} weights do not fit the {what} its metadata describes "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. "
            f"{unexpected[:2]}; {len(shapes)} of another shape, e.g. {shapes[:2]}): the file was "
            "edited or written by another program; export it again with minisd"
        )
    module.load_state_dict(state)


def write_metrics(weights: str | os.PathLike, metrics: dict[str, Any], weights_sha256: str) -> Path:
    """Store a measurement in a weights file's sidecar, with the SHA-256 of the bytes measured.

    `weights_sha256` is the hash of what was loaded (a loaded model's `metadata`); a file that
    changed since then is refused, so the stored metrics always describe the file beside them.
    """
    weights = Path(weights)
    if file_sha256(weights) != weights_sha256:
        raise ValueError(
            f"{weights} changed while it was being measured (SHA-256 {weights_sha256[:12]}... "
            f"when loaded); measure it again"
        )
    path = weights.with_suffix(".json")
    sidecar = load_json(path) if path.is_file() else {}
    sidecar["metrics"] = {**metrics, "weights_sha256": weights_sha256}
    return write_sidecar(weights, sidecar)


def load_diffusion(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusionModel:
    """Load a model written by `save_diffusion` (or `python -m minisd train --export`)."""
    tensors, meta = _open(path, FORMAT, "diffusion", "train")
    unet = UNetModel(_config(UNetConfig, meta["unet_config"]))
    conditioner = None
    if "text_encoder" in meta:
        from minisd.conditioning import TextConditioner
        from minisd.text import encoder_from_spec, stores_weights

        encoder = encoder_from_spec(meta["text_encoder"])
        if stores_weights(encoder):
            encoder.load_state_dict(_strip(tensors, TEXT_PREFIX, dtype))
        conditioner = TextConditioner(encoder.requires_grad_(False).eval()).to(device)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(TEXT_PREFIX)}
    vae = None
    if "autoencoder_config" in meta:
        vae = AutoencoderKL(_config(AutoencoderConfig, meta["autoencoder_config"]))
        _fill(vae, _strip(tensors, VAE_PREFIX, dtype), path, "autoencoder")
        vae = vae.to(device).eval()
        tensors = _strip(tensors, UNET_PREFIX, dtype)
    _fill(unet, {k: v.to(dtype) for k, v in tensors.items()}, path, "U-Net")
    schedule = NoiseSchedule.from_dict(meta["schedule"])
    unet = unet.to(device).eval()
    sampler = SamplerConfig(**meta["sampler"]) if "sampler" in meta else None
    return DiffusionModel(
        unet, schedule, meta["prediction"], meta, vae, meta.get("image_size"), sampler, conditioner
    )


def save_autoencoder(
    path: str | os.PathLike, vae: AutoencoderKL, dtype: torch.dtype = torch.float16
) -> Path:
    """Save an autoencoder (fp16 by default) with its config, scale_factor included."""
    meta = {"format": AUTOENCODER_FORMAT, "autoencoder_config": dataclasses.asdict(vae.config)}
    return save_tensors(path, _half(vae.state_dict(), dtype, ""), meta)


def load_autoencoder(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Load `save_autoencoder`'s file; `.metadata` holds its metadata and JSON sidecar."""
    tensors, meta = _open(path, AUTOENCODER_FORMAT, "autoencoder", "train-vae")
    vae = AutoencoderKL(_config(AutoencoderConfig, meta["autoencoder_config"]))
    _fill(vae, _strip(tensors, "", dtype), path, "autoencoder")
    vae.metadata = meta
    return vae.to(device).eval()


def save_noisy_classifier(
    path: str | os.PathLike, classifier, schedule: NoiseSchedule, dtype: torch.dtype = torch.float16
) -> Path:
    """Save a `guidance.NoisyClassifier` (fp16 by default) with its config and the noise
    schedule it was trained under (classifier guidance must sample with the same one)."""
    meta = {
        "format": NOISY_CLASSIFIER_FORMAT,
        "classifier_config": dataclasses.asdict(classifier.config),
        "schedule": schedule.to_dict(),
    }
    return save_tensors(path, _half(classifier.state_dict(), dtype, ""), meta)


def load_noisy_classifier(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """Load `save_noisy_classifier`'s file: the classifier in eval mode, with `.schedule` and
    `.metadata` (its metadata and JSON sidecar)."""
    from minisd.guidance import NoisyClassifier, NoisyClassifierConfig

    tensors, meta = _open(path, NOISY_CLASSIFIER_FORMAT, "noisy classifier",
                          "train-noisy-classifier")  # fmt: skip
    classifier = NoisyClassifier(_config(NoisyClassifierConfig, meta["classifier_config"]))
    classifier.load_state_dict(_strip(tensors, "", dtype))
    classifier.schedule = NoiseSchedule.from_dict(meta["schedule"])
    classifier.metadata = meta
    return classifier.to(device).eval()
