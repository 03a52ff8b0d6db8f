"""Diffusion commands: train a U-Net (pixels, latents; unconditional, class- or text-conditioned),
sample it, evaluate it (text models: the accuracy of the prompted digit), compare samplers.

    python -m minisd train --dataset mnist --preset MNIST --steps 20000 --run-dir runs/ddpm \
        --export data/checkpoints/ddpm_mnist.safetensors
    python -m minisd sample --checkpoint data/checkpoints/ddpm_mnist.safetensors --out grid.png
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
from pathlib import Path

import torch

from minisd import unet as unet_module
from minisd.checkpoint import atomic_write
from minisd.cli.options import IMAGE_FORMATS, add_device_and_seed, check_output
from minisd.conditioning import ConditionedUNet
from minisd.course import get_device, hardware
from minisd.data import LOADERS, load_dataset
from minisd.diffusion import PREDICTIONS, diffusion_loss_fn
from minisd.distributed import World, barrier, init_distributed
from minisd.latent import cached_latents, encode_images
from minisd.pretrained import load_autoencoder, load_diffusion, save_diffusion, write_sidecar
from minisd.provenance import command_line, run_commands
from minisd.sampling import SAMPLERS, VARIANCES
from minisd.schedule import SCHEDULE_KINDS, NoiseSchedule
from minisd.summary import count_parameters
from minisd.text import TEXT_MAX_LENGTH
from minisd.train import TrainConfig, fit

PRESETS = ("TINY", "MNIST", "CIFAR")


def _unet_config(
    args: argparse.Namespace, in_channels: int, context_dim: int | None = None
) -> unet_module.UNetConfig:
    cfg = getattr(unet_module, args.preset)
    changes: dict[str, object] = {"in_channels": in_channels, "out_channels": in_channels}
    if args.attention_resolutions is not None:
        changes["attention_resolutions"] = tuple(args.attention_resolutions)
    if args.class_cond:
        changes["num_classes"] = 10
    if context_dim is not None:
        changes["context_dim"] = context_dim
    if args.scale_shift_norm:
        changes["use_scale_shift_norm"] = True
    return dataclasses.replace(cfg, **changes)


def _text_conditioner(args: argparse.Namespace, labels: torch.Tensor):
    """The text conditioner --text-encoder asks for, and the training captions' token ids: one
    caption per image, its phrasing drawn from the training templates with --seed."""
    from minisd.conditioning import TextConditioner
    from minisd.text import (
        TRAIN_TEMPLATES,
        PretrainedTextEncoder,
        TransformerTextConfig,
        TransformerTextEncoder,
        random_captions,
    )

    if args.class_cond:
        raise ValueError("--class-cond and --text-encoder are two conditions: choose one")
    if args.text_encoder == "minilm":
        encoder = PretrainedTextEncoder(args.text_encoder_path, args.text_max_length)
    else:
        encoder = TransformerTextEncoder(TransformerTextConfig(max_length=args.text_max_length))
    conditioner = TextConditioner(encoder)
    captions = random_captions(labels, TRAIN_TEMPLATES, torch.Generator().manual_seed(args.seed))
    return conditioner, conditioner.batch(captions, len(captions))


def _task_conditions(args: argparse.Namespace, vae, images: torch.Tensor) -> torch.Tensor:
    """What an inpainting or upscaling model is concatenated with, one per training image:
    inpaint: the image under a random mask (drawn with --seed), encoded, and the mask;
    upscale: the image at 14x14, folded onto the latent grid."""
    if vae is None:
        raise ValueError(f"--task {args.task} trains a latent model: pass --latent-vae too")
    if args.class_cond or args.text_encoder:
        raise ValueError(f"--task {args.task} conditions on an image: drop --class-cond/--text-*")
    if args.task == "upscale":
        from minisd.upscaling import downsample, upscaling_condition

        return upscaling_condition(downsample(images))
    from minisd.inpainting import inpainting_condition, random_masks

    masks = random_masks(len(images), torch.Generator().manual_seed(args.seed))
    return inpainting_condition(vae, images, masks)


def _init_from(args: argparse.Namespace, model: torch.nn.Module, schedule: NoiseSchedule) -> dict:
    """Start from an exported model's weights (e.g. to branch an lr decay off a finished run).

    Returns what the exported model's sidecar says made it, so the new sidecar lists every
    command and counts every step and second behind the weights it ships.
    """
    bundle = load_diffusion(args.init_from)
    mismatch = [
        f"{what}: {theirs} vs {ours}"
        for what, theirs, ours in (
            ("unet_config", bundle.unet.config, model.config),
            (
                "schedule",
                (bundle.schedule.kind, bundle.schedule.num_timesteps),
                (schedule.kind, schedule.num_timesteps),
            ),
            ("prediction", bundle.prediction, args.prediction),
            ("latent model", bundle.is_latent, bool(args.latent_vae)),
            (
                "text encoder",
                (bundle.metadata.get("text_encoder") or {}).get("kind"),
                {"minilm": "pretrained", "joint": "transformer"}.get(args.text_encoder),
            ),
        )
        if theirs != ours
    ]
    if mismatch:
        raise ValueError(
            f"--init-from {args.init_from} was trained with other settings ("
            + "; ".join(mismatch)
            + "); pass the --preset/--schedule/--prediction flags it was trained with"
        )
    getattr(model, "unet", model).load_state_dict(bundle.unet.state_dict())
    if args.text_encoder == "joint":  # the jointly trained encoder goes on from its weights too
        model.conditioner.encoder.load_state_dict(bundle.conditioner.encoder.state_dict())
    sidecar = bundle.metadata["sidecar"]
    print(f"starting from the weights of {args.init_from} ({sidecar.get('steps', '?')} steps)")
    return {
        "checkpoint": str(args.init_from),
        "commands": sidecar.get("commands", []),
        "steps": sidecar.get("steps", 0),
        "seconds": sidecar.get("seconds", 0),
    }


def cmd_train(args: argparse.Namespace) -> None:
    """Train; under torchrun, as one of its processes (rank 0 alone prints and exports)."""
    world = init_distributed(args.device)
    try:
        with contextlib.redirect_stdout(io.StringIO()) if world.rank else contextlib.nullcontext():
            _train(args, world)
        barrier(world)  # no rank tears gloo down while another is still exporting
    finally:
        if world.size > 1:
            torch.distributed.destroy_process_group()


def _train(args: argparse.Namespace, world: World) -> None:
    check_output(args.export, "--export", ("safetensors",))  # a typo costs no training run
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup,
        decay_steps=args.decay_steps,
        ema_decay=args.ema_decay,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        mixed_precision=not args.fp32,
        compile=args.compile,
    )
    images, labels = load_dataset(args.dataset, train=True, limit=args.limit)
    vae, samples = None, images
    if args.latent_vae:  # latent diffusion: encode the dataset once, train on scaled latents
        vae = load_autoencoder(args.latent_vae, device=get_device(args.device))
        cache = Path(args.run_dir) / "latents.safetensors" if args.run_dir else None
        samples = cached_latents(vae, images, cache) if cache else encode_images(vae, images)
        print(f"training on latents {tuple(samples.shape[1:])} of {args.latent_vae}")
    conditioner, ids = (None, None)
    if args.text_encoder:
        conditioner, ids = _text_conditioner(args, labels)
    concat = _task_conditions(args, vae, images) if args.task else None
    cfg = _unet_config(args, samples.shape[1], conditioner and conditioner.encoder.dim)
    if concat is not None:  # x_t's channels plus the condition's, as SD's inpainting U-Net
        c = concat.shape[1]
        cfg = dataclasses.replace(cfg, in_channels=cfg.in_channels + c, concat_channels=c)
    model = unet_module.UNetModel(cfg)
    if args.text_encoder == "joint":  # the encoder learns with the U-Net, as one module
        model = ConditionedUNet(model, conditioner)
    schedule = NoiseSchedule(args.schedule, args.timesteps)
    init = _init_from(args, model, schedule) if args.init_from else None
    device = world.place(get_device(args.device))
    frozen = conditioner if args.text_encoder == "minilm" else None
    loss_fn = diffusion_loss_fn(
        schedule,
        args.prediction,
        args.class_dropout if args.class_cond or conditioner or args.task else 0.0,
        args.min_snr_gamma,
        conditioner=frozen and frozen.to(device),
    )
    data = (samples, labels) if args.class_cond else (samples,)
    if conditioner is not None:
        data = (samples, ids)
    if concat is not None:
        data = (samples, concat)
    n_params = count_parameters(model)
    commands = run_commands(args) if world.rank == 0 else []  # rank 0 keeps the run's records
    print(
        f"training a {n_params / 1e6:.2f}M-parameter U-Net on {len(images)} {args.dataset} images"
    )
    result = fit(model, loss_fn, data, config, args.run_dir, args.resume, device=device)
    print(
        f"done: {result.step} steps, {result.seconds:.0f} s, "
        f"last loss {result.history[-1]['loss']:.4f}"
    )
    if result.compile_seconds is not None:
        print(
            f"torch.compile: the first step took {result.compile_seconds:.0f} s, compiling included"
        )
    if args.export and world.rank == 0:
        export = Path(args.export)
        image_size = images.shape[-1] if vae is not None else None
        save_diffusion(
            export,
            result.sampling_model,
            schedule,
            args.prediction,
            vae=vae,
            image_size=image_size,
            conditioner=frozen,
        )
        sidecar = {
            "commands": (init["commands"] if init else []) + commands,
            "unet_config": dataclasses.asdict(cfg),
            "parameters": n_params,
            "train_config": dataclasses.asdict(config),
            "schedule": {"kind": args.schedule, "num_timesteps": args.timesteps},
            "prediction": args.prediction,
            "min_snr_gamma": args.min_snr_gamma,
            "dataset": args.dataset,
            "text_encoder": args.text_encoder,
            "task": args.task,
            "captions": "one per image: minisd.text.random_captions(labels, TRAIN_TEMPLATES, seed)"
            if conditioner
            else None,
            "latent_vae": args.latent_vae,
            "steps": result.step + (init["steps"] if init else 0),
            "seconds": round(result.seconds) + (init["seconds"] if init else 0),
            "init_from": init and {k: init[k] for k in ("checkpoint", "steps", "seconds")},
            "hardware": hardware(),
            "final_loss": round(result.history[-1]["loss"], 5),
            "weights": "EMA" if result.ema is not None else "raw",
        }
        write_sidecar(export, sidecar)
        print(f"exported {export} and {export.with_suffix('.json').name}")


def cmd_sample(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minisd.evaluation import generate
    from minisd.plotting import show_images

    out = check_output(args.out, "--out", IMAGE_FORMATS)  # before the model loads
    tensor_out = check_output(args.save_tensor, "--save-tensor", ("pt",))
    model = load_diffusion(args.checkpoint, device=get_device(args.device))
    steps = model.schedule.num_timesteps if args.sampler == "ddpm" else args.steps
    config = model.sampler_config(args.sampler, steps, eta=args.eta, variance=args.variance)
    from minisd.conditioning import ClassConditioner, TextConditioner

    kinds = {"--label": (args.label, ClassConditioner), "--prompt": (args.prompt, TextConditioner)}
    for flag, (value, kind) in kinds.items():
        if value is not None and not isinstance(model.conditioner, kind):
            what = "class-conditional" if flag == "--label" else "text-conditioned"
            raise ValueError(f"{flag}: {args.checkpoint} is not {what}; leave it out")
    cond = args.label if args.label is not None else args.prompt
    print(f"sampling {args.n} images with {config.name}")
    images = generate(model, args.n, config, args.seed, image_size=args.size, progress=True,
                      cond=cond)  # fmt: skip
    if out is not None:  # atomic: a failure leaves no half-written file
        show_images(images, nrow=int(args.n**0.5 + 0.999), size=0.6)
        fmt = out.suffix.lstrip(".").lower()
        atomic_write(out, lambda tmp: plt.savefig(tmp, format=fmt, bbox_inches="tight", dpi=100))
        print(f"wrote {out}")
    if tensor_out is not None:
        atomic_write(tensor_out, lambda tmp: torch.save(images, tmp))


def _store_metrics(args, model, result: dict, ok: bool, why: str, **extra) -> None:
    """Write a `score` result, its bar and any extra measurements into the model's sidecar."""
    from minisd.pretrained import write_metrics

    metrics = {
        "command": command_line(args),
        "sampler": result["name"],
        "seconds_per_sample": round(result["seconds_per_sample"], 4),
        "hardware": hardware(),
        **extra,
        "samples": result["report"],
        "real_baseline": result["baseline"],
        "meets_bar": ok,
        "bar": why,
    }
    sidecar_path = write_metrics(args.checkpoint, metrics, model.metadata["weights_sha256"])
    print(f"wrote metrics into {sidecar_path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from minisd.evaluation import meets_recognisability_bar, report_from_dict, score

    model = load_diffusion(args.checkpoint, device=get_device(args.device))
    result = score(model, args.n, model.sampler_config("ddim", args.steps), seed=args.seed)
    report, baseline = report_from_dict(result["report"]), report_from_dict(result["baseline"])
    print(report.table(baseline))
    ok, why = meets_recognisability_bar(report)
    print(f"recognisability bar: {'met' if ok else 'NOT met'}: {why}")
    if args.write_sidecar:
        _store_metrics(args, model, result, ok, why)


def cmd_evaluate_text(args: argparse.Namespace) -> None:
    from minisd.classifier import load_classifier
    from minisd.evaluation import TEXT_ACCURACY_BAR, report_from_dict, score, text_accuracy
    from minisd.metrics import reference_features
    from minisd.text import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES

    model = load_diffusion(args.checkpoint, device=get_device(args.device))
    if "text_encoder" not in model.metadata:
        raise ValueError(f"{args.checkpoint} is not a text-conditioned model; use `evaluate`")
    config = model.sampler_config("ddim", args.steps)
    classifier = load_classifier()
    rows = {}
    for name, templates in (("standard", TRAIN_TEMPLATES), ("held_out", HELD_OUT_TEMPLATES)):
        rows[name] = text_accuracy(
            model, templates, args.n_per_digit, config, args.seed, classifier, progress=True
        )
        per_digit = " ".join(f"{a:.0%}" for a in rows[name]["per_digit"])
        print(f"{name:>9} captions: accuracy {rows[name]['accuracy']:.1%} ({per_digit})")
    # sample quality with the empty prompt (the null condition): the unconditional model
    result = score(
        model, args.n_unconditional, config, args.seed, classifier=classifier,
        reference=reference_features(classifier),
    )  # fmt: skip
    report, baseline = report_from_dict(result["report"]), report_from_dict(result["baseline"])
    print("unconditional (empty prompt):")
    print(report.table(baseline))
    ok = rows["standard"]["accuracy"] >= TEXT_ACCURACY_BAR
    why = (
        f"conditional accuracy {rows['standard']['accuracy']:.1%} on the training phrasings "
        f"(need >= {TEXT_ACCURACY_BAR:.0%}) at guidance scale 1; held-out phrasings "
        f"{rows['held_out']['accuracy']:.1%} (reported, no bar)"
    )
    print(f"text bar: {'met' if ok else 'NOT met'}: {why}")
    if args.write_sidecar:
        _store_metrics(args, model, result, ok, why, guidance_scale=1.0, text=rows)


def cmd_compare_samplers(args: argparse.Namespace) -> None:
    """Seconds per sample and quality for each sampler setting. A text model is prompted with
    the training phrasings (n / 10 per digit) at --guidance and also scored for accuracy."""
    from minisd.classifier import load_classifier
    from minisd.conditioning import TextConditioner
    from minisd.evaluation import prompts_per_digit, save_results, score, score_guided
    from minisd.metrics import reference_features
    from minisd.text import TRAIN_TEMPLATES

    check_output(args.out, "--out", ("json",))
    model = load_diffusion(args.checkpoint, device=get_device(args.device))
    settings = [model.sampler_config("ddim", s) for s in args.ddim_steps]
    settings += [model.sampler_config("dpm++2m", s) for s in args.dpm_steps]
    if args.ddpm:
        settings.append(model.sampler_config("ddpm", model.schedule.num_timesteps))
    text = isinstance(model.conditioner, TextConditioner)
    if text and args.n % 10:
        raise ValueError(
            f"--n must be a multiple of 10 for a text model (n/10 per digit), got {args.n}"
        )
    classifier = load_classifier()
    reference = reference_features(classifier)
    rows, grids = [], {}
    for setting in settings:
        if text:
            prompts, digits = prompts_per_digit(TRAIN_TEMPLATES, args.n // 10)
            result, samples = score_guided(model, prompts, digits, setting, args.seed, classifier,
                                           reference, args.guidance, progress=True)  # fmt: skip
            result = {"setting": dataclasses.asdict(setting), "name": setting.name, **result}
            quality = f"accuracy {result['accuracy']:.1%}, FID {result['mnist_fid']:.2f}"
        else:
            result = score(model, args.n, setting, args.seed, classifier=classifier,
                           reference=reference)  # fmt: skip
            samples, r = result.pop("samples"), result["report"]
            quality = (f"FID {r['mnist_fid']:.2f}, KID {r['kid_mean']:.4f}, "
                       f"confident {r['confident_fraction']:.1%}")  # fmt: skip
        grids[setting.name] = samples[: args.keep]
        rows.append(result)
        ms = result["seconds_per_sample"] * 1000
        print(f"{setting.name:>12}: {ms:.0f} ms/sample, {quality} (n={args.n})")
    results = {
        "command": command_line(args),
        "hardware": hardware(),
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": model.metadata["weights_sha256"],  # the bytes these rows measured
        "n": args.n,
        "rows": rows,
    }
    if text:
        results["guidance_scale"] = args.guidance
    out, kept = save_results(args.out, results, grids)
    print(f"wrote {out} and {kept.name}")


def add_commands(sub: argparse._SubParsersAction) -> None:

    t = sub.add_parser(
        "train", help="train a diffusion U-Net on pixels, or on latents with --latent-vae"
    )
    t.add_argument("--dataset", choices=sorted(LOADERS), default="mnist")
    t.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    t.add_argument("--preset", choices=PRESETS, default="MNIST")
    t.add_argument(
        "--attention-resolutions", type=int, nargs="*", default=None, help="override the preset's"
    )
    t.add_argument("--class-cond", action="store_true", help="condition on labels (10 classes)")
    t.add_argument(
        "--latent-vae", default=None, help="autoencoder checkpoint: train on its latents"
    )
    t.add_argument(
        "--class-dropout",
        "--cond-dropout",
        type=float,
        default=0.1,
        help="p(condition -> null) with --class-cond, --text-encoder or --task",
    )
    t.add_argument(
        "--text-encoder",
        choices=("minilm", "joint"),
        default=None,
        help="condition on MNIST captions: a frozen pretrained MiniLM, or a small transformer "
        "trained jointly with the U-Net",
    )
    t.add_argument(
        "--task",
        choices=("inpaint", "upscale"),
        default=None,
        help="condition on an image concatenated to x_t (latent models): the digit under a "
        "random mask and the mask (inpaint), or the digit at 14x14 (upscale)",
    )
    t.add_argument("--text-encoder-path", default=None, help="another pretrained BERT folder")
    t.add_argument("--text-max-length", type=int, default=TEXT_MAX_LENGTH, help="tokens per prompt")
    t.add_argument(
        "--scale-shift-norm",
        action="store_true",
        help="adaptive normalization: the embedding scales and shifts GroupNorm",
    )
    t.add_argument("--schedule", choices=SCHEDULE_KINDS, default="linear")
    t.add_argument("--timesteps", type=int, default=1000)
    t.add_argument("--prediction", choices=PREDICTIONS, default="eps")
    t.add_argument(
        "--min-snr-gamma", type=float, default=None, help="Min-SNR loss weighting (paper: 5)"
    )
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup", type=int, default=0)
    t.add_argument(
        "--decay-steps", type=int, default=0, help="lr falls linearly to 0 over the last N steps"
    )
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--checkpoint-every", type=int, default=250)
    t.add_argument(
        "--fp32", action="store_true", help="train in float32 on GPUs too (no mixed precision)"
    )
    t.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training step (its first step compiles: minutes on a CPU)",
    )
    t.add_argument("--run-dir", default=None, help="folder for the resumable training checkpoint")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    t.add_argument(
        "--init-from",
        default=None,
        help="start from an exported model's weights (fresh optimiser; its sidecar carries over)",
    )
    t.add_argument(
        "--export", default=None, help="write the EMA model + JSON sidecar here at the end"
    )
    add_device_and_seed(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample images from a trained model")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps (DDPM takes all T)")
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--variance", choices=VARIANCES, default="fixed_small", help="DDPM variance")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--size", type=int, default=28)
    s.add_argument(
        "--label", type=int, default=None, help="class to draw (class-conditional models)"
    )
    s.add_argument(
        "--prompt", default=None, help='what to draw (text models), e.g. "a handwritten 7"'
    )
    s.add_argument("--out", default="samples.png")
    s.add_argument("--save-tensor", default=None, help="also save the samples as a .pt tensor")
    add_device_and_seed(s)
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="score DDIM samples with the MNIST classifier's metrics")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--n", type=int, default=1000)
    e.add_argument("--steps", type=int, default=50, help="DDIM steps")
    e.add_argument("--write-sidecar", action="store_true", help="store the metrics in its JSON")
    add_device_and_seed(e)
    e.set_defaults(func=cmd_evaluate)

    et = sub.add_parser(
        "evaluate-text",
        help="a text model: accuracy of the prompted digit (training and held-out phrasings), "
        "and unconditional sample quality",
    )
    et.add_argument("--checkpoint", required=True)
    et.add_argument("--n-per-digit", type=int, default=100)
    et.add_argument("--n-unconditional", type=int, default=1000)
    et.add_argument("--steps", type=int, default=50, help="DDIM steps")
    et.add_argument("--write-sidecar", action="store_true", help="store the metrics in its JSON")
    add_device_and_seed(et)
    et.set_defaults(func=cmd_evaluate_text)

    c = sub.add_parser(
        "compare-samplers", help="DDPM, DDIM, DPM-Solver++: time per sample and sample quality"
    )
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--n", type=int, default=200, help="samples per sampler setting")
    c.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 20, 50, 100])
    c.add_argument("--dpm-steps", type=int, nargs="*", default=[], help="DPM-Solver++(2M) steps")
    c.add_argument("--ddpm", action="store_true", help="also run full DDPM (slow: T steps)")
    c.add_argument("--guidance", type=float, default=1.0, help="text models: guidance scale")
    c.add_argument("--keep", type=int, default=16, help="samples per setting kept for display")
    c.add_argument("--out", required=True, help="results .json (samples go beside it)")
    add_device_and_seed(c)
    c.set_defaults(func=cmd_compare_samplers)
