"""Autoencoder commands (notebook 03): train and measure the autoencoder; latent vs pixel diffusion.

    python -m minisd train-vae --preset MNIST_F8 --steps 3000 --run-dir runs/vae \
        --export data/checkpoints/vae_mnist_f8.safetensors
    python -m minisd evaluate-vae --checkpoint data/checkpoints/vae_mnist_f8.safetensors \
        --write-sidecar
    python -m minisd latent-vs-pixel --vae data/checkpoints/vae_mnist_f8.safetensors \
        --seconds 600 --out data/results/latent_vs_pixel.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import torch

from minisd import vae as vae_module
from minisd.cli.options import add_device_and_seed, check_output, check_unique
from minisd.course import get_device, hardware, seed_everything
from minisd.data import LOADERS, load_dataset, load_mnist
from minisd.latent import (
    crop_images,
    encode_images,
    fit_scale_factor,
    pad_images,
    training_cost,
)
from minisd.pretrained import load_autoencoder, save_autoencoder, write_metrics, write_sidecar
from minisd.provenance import command_line, run_commands
from minisd.summary import count_parameters
from minisd.train import TrainConfig, fit
from minisd.vae import AutoencoderKL, vae_loss_fn

VAE_PRESETS = ("TINY", "MNIST_F4", "MNIST_F8")


def cmd_train_vae(args: argparse.Namespace) -> None:
    check_output(args.export, "--export", ("safetensors",))  # before any training
    images, _ = load_dataset(args.dataset, train=True, limit=args.limit)
    cfg = dataclasses.replace(
        getattr(vae_module, args.preset), in_channels=images.shape[1], out_ch=images.shape[1]
    )
    if args.latent_channels:
        cfg = dataclasses.replace(
            cfg, z_channels=args.latent_channels, embed_dim=args.latent_channels
        )
    data = pad_images(images, cfg.resolution) if cfg.resolution else images
    perceptual = None
    if args.perceptual_weight > 0:
        from minisd.classifier import load_classifier

        classifier = load_classifier(device=get_device(args.device)).requires_grad_(False)
        side = images.shape[-1]

        def perceptual(x: torch.Tensor) -> torch.Tensor:  # classifier features of the 28x28 crop
            return classifier.features(crop_images(x, side))

    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup,
        ema_decay=None,  # ldm trains its autoencoder without EMA
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        max_seconds=args.max_seconds,
    )
    loss_fn = vae_loss_fn(args.kl_weight, args.reconstruction, perceptual, args.perceptual_weight)
    commands = run_commands(args)
    torch.manual_seed(args.seed)
    model = AutoencoderKL(cfg)
    n_params = count_parameters(model)
    print(f"training a {n_params / 1e6:.2f}M-parameter autoencoder on {len(images)} images")
    result = fit(
        model, loss_fn, (data,), config, args.run_dir, args.resume, device=get_device(args.device)
    )
    print(f"done: {result.step} steps, {result.seconds:.0f} s")
    if args.export:
        n_scale = min(args.scale_images, len(images))
        factor = fit_scale_factor(model, images[:n_scale])
        export = Path(args.export)
        save_autoencoder(export, model.cpu())
        write_sidecar(
            export,
            {
                "commands": commands,
                "autoencoder_config": dataclasses.asdict(model.config),
                "parameters": n_params,
                "train_config": dataclasses.asdict(config),
                "loss": {
                    "kl_weight": args.kl_weight,
                    "reconstruction": args.reconstruction,
                    "perceptual_weight": args.perceptual_weight,
                },
                "dataset": args.dataset,
                "steps": result.step,
                "seconds": round(result.seconds),
                "hardware": hardware(),
                "final_loss": round(result.history[-1]["loss"], 5),
                "scale_factor": {"value": factor, "images": n_scale},
            },
        )
        print(f"scale factor {factor:.4f}; exported {export} and its .json")


def cmd_evaluate_vae(args: argparse.Namespace) -> None:
    from minisd.evaluation import evaluate_autoencoder

    vae = load_autoencoder(args.checkpoint, device=get_device(args.device))
    result = evaluate_autoencoder(vae, args.n)
    print(
        f"n={result['n']} test digits: PSNR {result['psnr_db']:.2f} dB, classifier accuracy "
        f"{result['accuracy_on_reconstructions']:.2%} on reconstructions "
        f"({result['accuracy_on_originals']:.2%} on the originals); "
        f"{result['latent_values']} latent values per {result['pixel_values']} pixels; "
        f"bar ({result['bar']}): {'met' if result['meets_bar'] else 'NOT met'}"
    )
    if args.write_sidecar:
        metrics = {"command": command_line(args), "hardware": hardware(), **result}
        path = write_metrics(args.checkpoint, metrics, vae.metadata["weights_sha256"])
        print(f"wrote metrics into {path}")


SPACES = ("pixel", "latent", "unscaled")


def _spaces(vae: AutoencoderKL, images: torch.Tensor, spaces: list[str]) -> dict:
    """What each model trains on, and the autoencoder that decodes its samples (None: pixels).

    "unscaled" trains on the raw latents (std 1/scale_factor): the same latents as "latent"
    without SD's scaling, decoded by a copy of the autoencoder whose scale_factor is 1.
    """
    out: dict[str, tuple[torch.Tensor, AutoencoderKL | None]] = {}
    latents = encode_images(vae, images, progress=True) if set(spaces) - {"pixel"} else None
    for space in spaces:
        if space == "pixel":
            out[space] = (images, None)
        elif space == "latent":
            out[space] = (latents, vae)
        else:
            raw = copy.deepcopy(vae)
            raw.config = dataclasses.replace(vae.config, scale_factor=1.0)
            out[space] = (latents / vae.config.scale_factor, raw)
    return out


def cmd_latent_vs_pixel(args: argparse.Namespace) -> None:
    """Same U-Net widths, same training time: one model per space (pixels, latents, ...)."""
    from minisd import unet as unet_module
    from minisd.classifier import load_classifier
    from minisd.diffusion import diffusion_loss_fn
    from minisd.evaluation import generate, save_results
    from minisd.metrics import evaluate_samples, real_baseline, reference_features
    from minisd.pretrained import DiffusionModel
    from minisd.schedule import NoiseSchedule

    check_unique("--spaces", args.spaces)
    check_output(args.out, "--out", ("json",))  # before ten minutes of training per space
    device = get_device(args.device)
    vae = load_autoencoder(args.vae, device=device)
    images, _ = load_mnist(train=True, limit=args.limit)
    schedule = NoiseSchedule("linear", 1000)
    base = dataclasses.replace(
        getattr(unet_module, args.preset), attention_resolutions=tuple(args.attention_resolutions)
    )
    config = TrainConfig(
        steps=10**9, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
        ema_decay=args.ema_decay, seed=args.seed, max_seconds=args.seconds,
    )  # fmt: skip
    classifier = load_classifier()
    reference = reference_features(classifier)
    baseline = real_baseline(args.n, classifier, reference, kid_subset_size=min(1000, args.n))
    rows, kept = [], {}
    for space, (data, decoder) in _spaces(vae, images, args.spaces).items():
        channels = data.shape[1]
        cfg = dataclasses.replace(base, in_channels=channels, out_channels=channels)
        seed_everything(args.seed)
        unet = unet_module.UNetModel(cfg)
        cost = training_cost(copy.deepcopy(unet), tuple(data.shape[1:]), args.batch_size,
                             device=device)  # fmt: skip
        result = fit(unet, diffusion_loss_fn(schedule), (data,), config, device=device)
        image_size = images.shape[-1] if decoder is not None else None
        model = DiffusionModel(
            result.sampling_model.eval(), schedule, "eps", {}, decoder, image_size
        )
        start = time.perf_counter()
        samples = generate(model, args.n, model.sampler_config("ddim", 50), seed=args.seed)
        sample_seconds = (time.perf_counter() - start) / args.n
        kept[space] = samples[: args.keep].contiguous()
        report = evaluate_samples(samples, classifier, reference, label=space,
                                  kid_subset_size=min(1000, args.n))  # fmt: skip
        rows.append({
            "space": space,
            "sample_shape": list(data.shape[1:]),
            "data_std": data.std().item(),
            "values_per_sample": cost["values_per_sample"],
            "parameters": count_parameters(unet),
            "seconds_per_step": cost["seconds_per_step"],
            "activation_mib": cost["activation_bytes"] / 2**20,
            "train_seconds": result.seconds,
            "train_steps": result.step,
            "final_loss": result.history[-1]["loss"],
            "sampling_seconds_per_sample": sample_seconds,
            "report": dataclasses.asdict(report),
        })  # fmt: skip
        print(
            f"{space:>8}: {cost['values_per_sample']} values, "
            f"{cost['seconds_per_step'] * 1000:.0f} ms/step, "
            f"{cost['activation_bytes'] / 2**20:.1f} MiB activations, {result.step} steps in "
            f"{result.seconds:.0f} s, FID {report.mnist_fid:.2f}, "
            f"confident {report.confident_fraction:.1%} (n={args.n})"
        )
    by_space = {r["space"]: r for r in rows}
    if {"pixel", "latent"} <= set(by_space):
        speedup = by_space["pixel"]["seconds_per_step"] / by_space["latent"]["seconds_per_step"]
        print(f"a latent training step is {speedup:.1f}x faster than a pixel one")
    results = {
        "command": command_line(args),
        "hardware": hardware(),
        "batch_size": args.batch_size,
        "unet_config": dataclasses.asdict(base),
        "vae": str(args.vae),
        "vae_sha256": vae.metadata["weights_sha256"],  # the autoencoder these rows measured
        "scale_factor": vae.config.scale_factor,
        "n": args.n,
        "sampler": "DDIM-50",
        "rows": rows,
        "baseline": dataclasses.asdict(baseline),
    }
    out, samples_path = save_results(args.out, results, kept)
    print(f"wrote {out} and {samples_path.name}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("train-vae", help="train the KL autoencoder of latent diffusion")
    v.add_argument("--dataset", choices=sorted(LOADERS), default="mnist")
    v.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    v.add_argument("--preset", choices=VAE_PRESETS, default="MNIST_F8")
    v.add_argument("--latent-channels", type=int, default=None, help="override the preset's")
    v.add_argument("--kl-weight", type=float, default=1e-6, help="ldm's SD autoencoder: 1e-6")
    v.add_argument("--reconstruction", choices=vae_module.RECONSTRUCTIONS, default="l1")
    v.add_argument(
        "--perceptual-weight", type=float, default=0.0, help="MNIST-classifier feature loss"
    )
    v.add_argument("--steps", type=int, required=True)
    v.add_argument("--max-seconds", type=float, default=None, help="stop after this much time")
    v.add_argument("--batch-size", type=int, default=64)
    v.add_argument("--lr", type=float, default=1e-3)
    v.add_argument("--warmup", type=int, default=100)
    v.add_argument("--checkpoint-every", type=int, default=250)
    v.add_argument("--scale-images", type=int, default=10_000, help="images for scale_factor")
    v.add_argument("--run-dir", default=None, help="folder for the resumable training checkpoint")
    v.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    v.add_argument("--export", default=None, help="write the autoencoder + JSON sidecar here")
    add_device_and_seed(v)
    v.set_defaults(func=cmd_train_vae)

    e = sub.add_parser("evaluate-vae", help="PSNR and classifier accuracy of reconstructions")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--n", type=int, default=10_000, help="MNIST test digits (all 10k by default)")
    e.add_argument("--write-sidecar", action="store_true", help="store the metrics in its JSON")
    add_device_and_seed(e, seed=False)
    e.set_defaults(func=cmd_evaluate_vae)

    c = sub.add_parser("latent-vs-pixel", help="train a pixel and a latent U-Net for equal time")
    c.add_argument("--vae", required=True, help="autoencoder checkpoint (train-vae --export)")
    c.add_argument("--preset", default="MNIST", help="U-Net widths, the same for both models")
    c.add_argument("--attention-resolutions", type=int, nargs="*", default=[])
    c.add_argument("--seconds", type=float, required=True, help="training time for each model")
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--lr", type=float, default=5e-4)
    c.add_argument("--warmup", type=int, default=100)
    c.add_argument("--ema-decay", type=float, default=0.999)
    c.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    c.add_argument("--n", type=int, default=1000, help="samples scored per model")
    c.add_argument(
        "--spaces",
        nargs="+",
        choices=SPACES,
        default=list(SPACES),
        help="what to train on: pixels, scaled latents, latents without the scale factor",
    )
    c.add_argument("--keep", type=int, default=16, help="samples per model kept for display")
    c.add_argument("--out", required=True, help="results .json (samples go beside it)")
    add_device_and_seed(c)
    c.set_defaults(func=cmd_latent_vs_pixel)
