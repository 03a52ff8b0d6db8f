"""Text-to-image commands (notebook 05): type a prompt, get digits.

    python -m minisd generate "a handwritten seven" "the number 2" --n 16 --guidance 3 \
        --steps 20 --sampler dpm++2m --seed 0 --out samples.png
    python -m minisd guidance-curve --out data/results/guidance_curve.json
    python -m minisd train-noisy-classifier --vae data/checkpoints/vae_mnist_f4.safetensors \
        --steps 3000 --export data/checkpoints/noisy_classifier_f4.safetensors
    python -m minisd compare-guidance \
        --classifier data/checkpoints/noisy_classifier_f4.safetensors \
        --out data/results/classifier_guidance.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minisd.checkpoint import atomic_write, write_sidecar
from minisd.cli.options import IMAGE_FORMATS, add_device_and_seed, check_output
from minisd.course import get_device, hardware
from minisd.pretrained import CHECKPOINTS, load_diffusion
from minisd.provenance import command_line, repo_path
from minisd.sampling import SAMPLERS
from minisd.schedule import SCHEDULE_KINDS

TEXT_MODEL = CHECKPOINTS / "ldm_text_mnist.safetensors"  # the course's shipped text model


def cmd_generate(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")

    from minisd.evaluation import generate
    from minisd.guidance import check_scale
    from minisd.plotting import show_prompt_rows
    from minisd.text import check_prompts

    prompts = check_prompts(args.prompts)
    check_scale(args.guidance)  # a bad scale fails before the model loads
    out = check_output(args.out, "--out", IMAGE_FORMATS)
    tensor_out = check_output(args.save_tensor, "--save-tensor", ("pt",))
    if out is None and tensor_out is None:
        raise ValueError("nothing to write: give --out (an image) and/or --save-tensor (a .pt)")
    if args.n < 1:
        raise ValueError(f"--n is the number of images per prompt, at least 1; got {args.n}")
    model, config = _text_model(args)
    cond = [p for p in prompts for _ in range(args.n)]
    print(f"{len(cond)} images, {config.name}, guidance scale {args.guidance:g}")
    images = generate(model, len(cond), config, args.seed, progress=True, cond=cond,
                      guidance_scale=args.guidance, negative=args.negative)  # fmt: skip
    if out is not None:
        fig = show_prompt_rows(images, prompts)
        atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix.lstrip(".").lower(),
                                                  bbox_inches="tight", dpi=100))  # fmt: skip
        print(f"wrote {out}")
    if tensor_out is not None:
        atomic_write(tensor_out, lambda tmp: torch.save(images, tmp))
        print(f"wrote {tensor_out}: images {tuple(images.shape)} in [-1, 1]")


def _text_model(args: argparse.Namespace):
    from minisd.conditioning import TextConditioner

    model = load_diffusion(args.checkpoint, device=get_device(args.device))
    if not isinstance(model.conditioner, TextConditioner):
        raise ValueError(f"{args.checkpoint} is not a text-to-image model; use `sample` for it")
    steps = model.schedule.num_timesteps if args.sampler == "ddpm" else args.steps
    return model, model.sampler_config(args.sampler, steps)


def cmd_guidance_curve(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")

    from minisd.evaluation import best_guidance, guidance_curve, save_results
    from minisd.plotting import plot_guidance_curve

    out = check_output(args.out, "--out", ("json",))
    if not args.scales or len(set(args.scales)) != len(args.scales):
        raise ValueError(f"--scales must list distinct guidance scales, got {args.scales}")
    model, config = _text_model(args)
    print(f"{len(args.scales)} scales x 2 phrasing sets x {10 * args.n_per_digit} samples, "
          f"{config.name}")  # fmt: skip
    rows, baseline, kept = guidance_curve(
        model, args.scales, args.n_per_digit, config, args.seed, keep=args.keep, progress=True
    )
    print(f"{'scale':>6} {'standard':>9} {'held-out':>9} {'FID':>7} {'diversity':>10}")
    for r in rows:
        accuracy = f"{r['standard']['accuracy']:>9.1%} {r['held_out']['accuracy']:>9.1%}"
        print(f"{r['scale']:>6g} {accuracy} {r['mnist_fid']:>7.2f} {r['diversity']:>10.2f}")
    print(
        f"{'real':>6} {'':>9} {'':>9} {baseline['mnist_fid']:>7.2f} {baseline['diversity']:>10.2f}"
    )
    best, ok, why = best_guidance(rows)
    print(f"guidance bar: {'met' if ok else 'NOT met'}: {why}")
    results = {
        "command": command_line(args),
        "hardware": hardware(),
        "checkpoint": repo_path(args.checkpoint),
        "checkpoint_sha256": model.metadata["weights_sha256"],
        "sampler": config.name,
        "n_per_digit": args.n_per_digit,
        "rows": rows,
        "baseline": baseline,
        "best_scale": best["scale"],
        "meets_bar": ok,
        "bar": why,
    }
    path, samples_path = save_results(out, results, kept)
    figure = plot_guidance_curve(rows, baseline)
    atomic_write(out.with_suffix(".png"),
                 lambda tmp: figure.savefig(tmp, format="png", dpi=100))  # fmt: skip
    print(f"wrote {path}, {samples_path.name} and {out.with_suffix('.png').name}")


def cmd_compare_guidance(args: argparse.Namespace) -> None:
    """Classifier guidance beside classifier-free guidance on one text model, same settings."""
    from minisd.evaluation import compare_guidance, save_results
    from minisd.pretrained import load_noisy_classifier

    out = check_output(args.out, "--out", ("json",))
    for flag, scales in (("--cfg-scales", args.cfg_scales), ("--cg-scales", args.cg_scales)):
        if not scales or len(set(scales)) != len(scales):
            raise ValueError(f"{flag} must list distinct guidance scales, got {scales}")
    model, config = _text_model(args)
    noisy = load_noisy_classifier(args.classifier, device=model.device)
    if noisy.schedule.to_dict() != model.schedule.to_dict():
        raise ValueError(f"{args.classifier} was trained on another noise schedule than "
                         f"{args.checkpoint}; retrain it with that model's --schedule")  # fmt: skip
    n = len(args.cfg_scales) + len(args.cg_scales)
    print(f"{n} settings x {10 * args.n_per_digit} samples, {config.name}")
    rows, baseline, kept = compare_guidance(model, noisy, args.cfg_scales, args.cg_scales,
                                            args.n_per_digit, config, args.seed, keep=args.keep,
                                            progress=True)  # fmt: skip
    print(f"{'method':>16} {'scale':>6} {'accuracy':>9} {'guide':>6} {'FID':>7} {'diversity':>10} "
          f"{'s/sample':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['method']:>16} {r['scale']:>6g} {r['accuracy']:>9.1%} "
              f"{r['guide_accuracy']:>6.1%} {r['mnist_fid']:>7.2f} {r['diversity']:>10.2f} "
              f"{r['seconds_per_sample']:>9.3f}")  # fmt: skip
    print(f"{'real':>16} {'':>6} {'':>9} {'':>6} {baseline['mnist_fid']:>7.2f} "
          f"{baseline['diversity']:>10.2f}")  # fmt: skip
    results = {
        "command": command_line(args),
        "hardware": hardware(),
        "checkpoint": repo_path(args.checkpoint),
        "checkpoint_sha256": model.metadata["weights_sha256"],
        "noisy_classifier": repo_path(args.classifier),
        "noisy_classifier_sha256": noisy.metadata["weights_sha256"],
        "sampler": config.name,
        "n_per_digit": args.n_per_digit,
        "rows": rows,
        "baseline": baseline,
    }
    path, samples_path = save_results(out, results, kept)
    print(f"wrote {path} and {samples_path.name}")


def cmd_train_noisy_classifier(args: argparse.Namespace) -> None:
    """Classifier guidance's classifier: p(y | z_t, t) on an autoencoder's noised latents."""
    import dataclasses

    from minisd.data import load_mnist
    from minisd.guidance import NoisyClassifier, NoisyClassifierConfig, noisy_classifier_loss_fn
    from minisd.latent import cached_latents, encode_images
    from minisd.pretrained import load_autoencoder, save_noisy_classifier
    from minisd.provenance import run_commands
    from minisd.schedule import NoiseSchedule
    from minisd.summary import count_parameters
    from minisd.train import TrainConfig, fit

    export = check_output(args.export, "--export", ("safetensors",))
    device = get_device(args.device)
    vae = load_autoencoder(args.vae, device=device)
    images, labels = load_mnist(train=True, limit=args.limit)
    cache = Path(args.run_dir) / "latents.safetensors" if args.run_dir else None
    latents = cached_latents(vae, images, cache) if cache else encode_images(vae, images)
    config = NoisyClassifierConfig(in_channels=latents.shape[1],
                                   model_channels=args.model_channels)  # fmt: skip
    classifier = NoisyClassifier(config)
    schedule = NoiseSchedule(args.schedule, args.timesteps)
    train = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
        decay_steps=args.decay_steps, ema_decay=None, seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    print(f"training a {count_parameters(classifier) / 1e6:.2f}M-parameter noisy classifier on "
          f"{len(latents)} latents {tuple(latents.shape[1:])}")  # fmt: skip
    result = fit(classifier, noisy_classifier_loss_fn(schedule), (latents, labels), train,
                 args.run_dir, args.resume, device=device)  # fmt: skip
    if export is None:
        return
    test_images, test_labels = load_mnist(train=False)
    accuracy = noisy_accuracy(result.model.eval(), schedule, encode_images(vae, test_images),
                              test_labels)  # fmt: skip
    save_noisy_classifier(export, result.model, schedule)
    write_sidecar(export, {
        "commands": run_commands(args),
        "classifier_config": dataclasses.asdict(config),
        "parameters": count_parameters(classifier),
        "train_config": dataclasses.asdict(train),
        "latent_vae": args.vae,
        "steps": result.step,
        "seconds": round(result.seconds),
        "hardware": hardware(),
        "final_loss": round(result.history[-1]["loss"], 5),
        "test_accuracy_by_t": accuracy,
    })  # fmt: skip
    print("test accuracy by timestep: " + ", ".join(f"t={t}: {a:.1%}" for t, a in accuracy.items()))
    print(f"exported {export} and {export.with_suffix('.json').name}")


@torch.no_grad()
def noisy_accuracy(classifier, schedule, latents, labels, timesteps=(0, 250, 500, 750, 999)):
    """The classifier's test accuracy on latents noised to each of `timesteps` (seeded noise)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=gen)
        t_batch = torch.full((len(latents),), t, dtype=torch.long)
        device = next(classifier.parameters()).device
        z_t = schedule.add_noise(latents, noise, t_batch)
        chunks = zip(z_t.split(1000), t_batch.split(1000), strict=True)
        logits = torch.cat([classifier(z.to(device), tb.to(device)).cpu() for z, tb in chunks])
        out[str(t)] = (logits.argmax(1) == labels).float().mean().item()
    return out


def add_commands(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="text to digits: one row of images per prompt")
    g.add_argument("prompts", nargs="+", help='what to draw, e.g. "a handwritten seven"')
    g.add_argument("--checkpoint", default=str(TEXT_MODEL), help="a text-to-image model")
    g.add_argument("--n", type=int, default=8, help="images per prompt")
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    g.add_argument("--negative", default=None, help="a prompt to steer away from")
    g.add_argument("--sampler", choices=sorted(SAMPLERS), default="dpm++2m")
    g.add_argument("--steps", type=int, default=20, help="sampler steps (DDPM takes all T)")
    g.add_argument("--out", default="samples.png", help="the image grid (.png, .jpg, .pdf, .svg)")
    g.add_argument("--save-tensor", default=None, help="also save the images (N, 1, 28, 28) as .pt")
    add_device_and_seed(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "guidance-curve",
        help="a text model's accuracy, FID and diversity along the guidance scale",
    )
    c.add_argument("--checkpoint", default=str(TEXT_MODEL), help="a text-to-image model")
    c.add_argument("--scales", type=float, nargs="+", default=[0, 1, 1.5, 2, 3, 4, 5, 7.5, 10])
    c.add_argument(
        "--n-per-digit", type=int, default=100, help="samples per digit and phrasing set"
    )
    c.add_argument("--sampler", choices=sorted(SAMPLERS), default="dpm++2m")
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--keep", type=int, default=2, help="samples kept per digit and scale")
    c.add_argument("--out", required=True, help="results .json (samples and plot go beside it)")
    add_device_and_seed(c)
    c.set_defaults(func=cmd_guidance_curve)

    cg = sub.add_parser(
        "compare-guidance",
        help="classifier guidance vs classifier-free guidance: accuracy, FID, diversity, time",
    )
    cg.add_argument("--checkpoint", default=str(TEXT_MODEL), help="a text-to-image model")
    cg.add_argument("--classifier", required=True, help="a noisy classifier of its latents")
    cg.add_argument("--cfg-scales", type=float, nargs="+", default=[1, 3])
    cg.add_argument("--cg-scales", type=float, nargs="+", default=[0, 1, 3, 10])
    cg.add_argument("--n-per-digit", type=int, default=100, help="samples per digit and setting")
    cg.add_argument("--sampler", choices=sorted(SAMPLERS), default="dpm++2m")
    cg.add_argument("--steps", type=int, default=20)
    cg.add_argument("--keep", type=int, default=2, help="samples kept per digit and setting")
    cg.add_argument("--out", required=True, help="results .json (samples go beside it)")
    add_device_and_seed(cg)
    cg.set_defaults(func=cmd_compare_guidance)

    n = sub.add_parser(
        "train-noisy-classifier", help="classifier guidance's classifier of noisy latents"
    )
    n.add_argument("--vae", required=True, help="the autoencoder whose latents it reads")
    n.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    n.add_argument("--model-channels", type=int, default=64)
    n.add_argument("--schedule", choices=SCHEDULE_KINDS, default="linear", help="the text model's")
    n.add_argument("--timesteps", type=int, default=1000)
    n.add_argument("--steps", type=int, required=True)
    n.add_argument("--batch-size", type=int, default=128)
    n.add_argument("--lr", type=float, default=1e-3)
    n.add_argument("--warmup", type=int, default=100)
    n.add_argument("--decay-steps", type=int, default=0)
    n.add_argument("--checkpoint-every", type=int, default=500)
    n.add_argument("--run-dir", default=None, help="folder for the resumable training checkpoint")
    n.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    n.add_argument("--export", default=None, help="write the classifier + JSON sidecar here")
    add_device_and_seed(n)
    n.set_defaults(func=cmd_train_noisy_classifier)
