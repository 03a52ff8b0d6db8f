"""Text-to-image commands (notebook 05): type a prompt, get digits.

    python -m minisd generate "a handwritten seven" "the number 2" --n 16 --guidance 3 \
        --steps 20 --sampler dpm++2m --seed 0 --out samples.png
    python -m minisd guidance-curve --out data/results/guidance_curve.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minisd.checkpoint import atomic_write
from minisd.cli.options import add_device_and_seed
from minisd.course import get_device, hardware
from minisd.pretrained import CHECKPOINTS, load_diffusion
from minisd.provenance import command_line
from minisd.sampling import SAMPLERS

TEXT_MODEL = CHECKPOINTS / "ldm_text_mnist.safetensors"  # the course's shipped text model
IMAGE_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg")


def _check_output(path: str | None, flag: str, suffixes: tuple[str, ...]) -> Path | None:
    """An output path that can be written, checked before any sampling starts."""
    if not path:
        return None
    out = Path(path)
    if not out.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {out.parent} does not exist; create it first")
    if out.suffix.lower().lstrip(".") not in suffixes:
        raise ValueError(f"{flag} {path}: expected a file ending in one of .{', .'.join(suffixes)}")
    if out.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    return out


def cmd_generate(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")

    from minisd.evaluation import generate
    from minisd.plotting import show_prompt_rows
    from minisd.text import check_prompts

    prompts = check_prompts(args.prompts)
    out = _check_output(args.out, "--out", IMAGE_FORMATS)
    tensor_out = _check_output(args.save_tensor, "--save-tensor", ("pt",))
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

    out = _check_output(args.out, "--out", ("json",))
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
        "checkpoint": str(args.checkpoint),
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
