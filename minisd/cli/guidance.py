"""Text-to-image commands (notebook 05): type a prompt, get digits.

    python -m minisd generate "a handwritten seven" "the number 2" --n 16 --guidance 3 \
        --steps 20 --sampler dpm++2m --seed 0 --out samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minisd.checkpoint import atomic_write
from minisd.cli.options import add_device_and_seed
from minisd.course import get_device
from minisd.pretrained import CHECKPOINTS, load_diffusion
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

    from minisd.conditioning import TextConditioner
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
    model = load_diffusion(args.checkpoint, device=get_device(args.device))
    if not isinstance(model.conditioner, TextConditioner):
        raise ValueError(f"{args.checkpoint} is not a text-to-image model; use `sample` for it")
    steps = model.schedule.num_timesteps if args.sampler == "ddpm" else args.steps
    config = model.sampler_config(args.sampler, steps)
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
