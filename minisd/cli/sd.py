"""The Stable Diffusion command: text to image (and image to image, inpainting) with SD's parts.

    python -m minisd sd --checkpoint v1-5-pruned-emaonly.safetensors "a photo of a cat" \
        --steps 30 --sampler dpm++2m --guidance 7.5 --out cat.png
    python -m minisd sd --random-weights sd-v1 "a photo of a cat" --size 256 --steps 4 \
        --out untrained.png        # offline: the architecture runs, the pictures are noise
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minisd.cli.options import IMAGE_FORMATS, add_device_and_seed, check_output
from minisd.course import get_device
from minisd.sampling import SAMPLERS
from minisd.text import check_prompts

UNTRAINED = "UNTRAINED: random weights, an architecture check; no picture is expected"


def read_image(path: str, size: int, mode: str = "RGB") -> torch.Tensor:
    """(1, C, size, size) in [-1, 1] (RGB) or {0, 1} (a mask, "L"), resized to size x size."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"no image at {path}")
    image = Image.open(path).convert(mode).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float() / 255
    x = x.view(size, size, -1).permute(2, 0, 1)[None]
    return (x > 0.5).float() if mode == "L" else x * 2 - 1


def _load(args: argparse.Namespace):
    from minisd import sd as sdmod

    if (args.checkpoint is None) == (args.random_weights is None):
        raise ValueError("give --checkpoint FILE (official SD weights) or --random-weights PRESET")
    if args.checkpoint:
        return sdmod.load_checkpoint(args.checkpoint, prediction=args.prediction,
                                     ema=False if args.no_ema else None)  # fmt: skip
    return sdmod.random_stable_diffusion(args.random_weights, args.seed)


def cmd_sd(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from minisd import pipeline
    from minisd.checkpoint import atomic_write
    from minisd.guidance import check_scale
    from minisd.plotting import show_prompt_rows

    prompts = check_prompts(args.prompts)
    check_scale(args.guidance)
    out = check_output(args.out, "--out", IMAGE_FORMATS)
    device = get_device(args.device)
    dtype = pipeline.check_dtype(args.dtype, device)
    if args.size % 8 or args.size < 64:
        raise ValueError(f"--size must be a multiple of 8, at least 64 (SD: 512), got {args.size}")
    if args.n < 1:
        raise ValueError(f"--n is the number of images per prompt, at least 1; got {args.n}")
    if args.mask and not args.init_image:
        raise ValueError("--mask inpaints an image: give the image with --init-image")
    init = read_image(args.init_image, args.size) if args.init_image else None
    mask = read_image(args.mask, args.size, "L") if args.mask else None
    sd = _load(args)
    print(f"{sd.preset}: {sd.info.get('weights')}, predicts {sd.prediction}")
    config = pipeline.sampler_for(args.sampler, args.steps)
    print(pipeline.estimate(sd, args.size, len(prompts) * args.n, _unet_steps(args, init, mask),
                            args.guidance, dtype, device))  # fmt: skip
    sd.to(device, dtype)
    if init is None:
        images = pipeline.text_to_image(sd, prompts, negative=args.negative, n=args.n,
                                        image_size=args.size, config=config,
                                        guidance_scale=args.guidance, seed=args.seed)  # fmt: skip
    else:
        images = _edit(sd, prompts, init, mask, config, args)
    if out is not None:
        fig = show_prompt_rows(images, prompts, size=2.5)
        if "random" in str(sd.info.get("weights")):
            fig.suptitle(UNTRAINED, color="red", fontsize=9, y=1.02)
        atomic_write(out, lambda tmp: fig.savefig(tmp, format=out.suffix.lstrip(".").lower(),
                                                  bbox_inches="tight", dpi=100))  # fmt: skip
        print(f"wrote {out}" + (f" ({UNTRAINED})" if "random" in sd.info["weights"] else ""))


def _unet_steps(args: argparse.Namespace, init, mask) -> int:
    """U-Net calls per image (each one batch of two with guidance): text-to-image runs every
    step, img2img the strength's share, RePaint redoes all but the last step --repaint times."""
    if init is None:
        return args.steps
    if mask is None:
        return max(1, round(args.steps * args.strength))
    return args.steps + (args.steps - 1) * (args.repaint - 1)


def _edit(sd, prompts, init, mask, config, args) -> torch.Tensor:
    from minisd.img2img import image_to_image
    from minisd.inpainting import inpaint

    model = sd.diffusion_model(args.size, config)
    cond = [p for p in prompts for _ in range(args.n)]
    images = init.expand(len(cond), -1, -1, -1)
    if mask is not None:
        method = "repaint" if args.repaint > 1 else "replace"
        if sd.unet.config.concat_channels:  # an inpainting checkpoint (sd-v1-inpainting)
            if args.repaint > 1:
                raise ValueError(
                    "--repaint resamples with a plain model; this file is an inpainting model, "
                    "which needs no resampling: drop --repaint"
                )
            method = "model"
        return inpaint(model, images, mask.expand(len(cond), -1, -1, -1), cond, method=method,
                       resample=args.repaint, guidance_scale=args.guidance,
                       negative=args.negative, seed=args.seed)  # fmt: skip
    return image_to_image(model, images, cond, args.strength, guidance_scale=args.guidance,
                          negative=args.negative, seed=args.seed, progress=True)  # fmt: skip


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "sd",
        help="Stable Diffusion text-to-image (img2img with --init-image, inpainting with --mask) "
        "from an official single-file checkpoint, or with random weights offline",
    )
    s.add_argument("prompts", nargs="+", help="one row of images per prompt")
    s.add_argument("--checkpoint", default=None, help="an SD v1.x/2.x .safetensors or .ckpt file")
    s.add_argument(
        "--random-weights", choices=("sd-v1", "sd-v2"), default=None,
        help="no file: SD's architecture with untrained weights (runs offline; noise pictures)",
    )  # fmt: skip
    s.add_argument("--prediction", choices=("eps", "v"), default=None, help="SD 2.x files: say")
    s.add_argument("--no-ema", action="store_true", help="the raw U-Net, not the file's EMA copy")
    s.add_argument("--size", type=int, default=512, help="image side in pixels (SD v1: 512)")
    s.add_argument("--n", type=int, default=1, help="images per prompt")
    s.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    s.add_argument("--negative", default=None, help="a prompt to steer away from")
    s.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    s.add_argument("--init-image", default=None, help="image-to-image from this picture")
    s.add_argument("--strength", type=float, default=0.75, help="img2img: how far to noise it")
    s.add_argument("--mask", default=None, help="inpaint: white where --init-image is redrawn")
    s.add_argument("--repaint", type=int, default=1, help="inpaint: RePaint rounds per step")
    s.add_argument("--out", default="sd.png", help="the picture (.png, .jpg, .pdf, .svg)")
    add_device_and_seed(s)
    s.set_defaults(func=cmd_sd)


# ----- lesson 06's measurements at MNIST scale -------------------------------------------------
def cmd_applications(args: argparse.Namespace) -> None:
    from minisd.applications import img2img_table, inpainting_table, upscaling_table
    from minisd.classifier import load_classifier
    from minisd.course import hardware
    from minisd.data import load_dataset
    from minisd.evaluation import save_results
    from minisd.metrics import reference_features
    from minisd.pretrained import load_diffusion
    from minisd.provenance import command_line, repo_path

    out = check_output(args.out, "--out", ("json",))
    device = get_device(args.device)
    images, labels = load_dataset("mnist", train=False, limit=args.n)
    classifier = load_classifier(device=device)
    models = {name: load_diffusion(getattr(args, name), device=device)
              for name in ("text_model", "unconditional", "inpainter", "upscaler")}  # fmt: skip
    results = {"command": command_line(args), "hardware": hardware(), "n": len(images)}
    for name, model in models.items():  # each measured file and its hash, as every result has
        results[name] = repo_path(getattr(args, name))
        results[f"{name}_sha256"] = model.metadata["weights_sha256"]
    text = models["text_model"]
    config = text.sampler_config("dpm++2m", args.steps)
    print(f"image-to-image: {len(images)} test digits, a prompt for another digit each")
    rows, kept = img2img_table(text, classifier, images, labels, args.strengths, config,
                               args.guidance, args.seed)  # fmt: skip
    for r in rows:
        print(f"  strength {r['strength']:<5g} new digit {r['new_digit']:6.1%}  input digit "
              f"{r['input_digit']:6.1%}  PSNR to input {r['psnr_to_input']:5.1f} dB")  # fmt: skip
    results["img2img"] = {"sampler": config.name, "guidance": args.guidance, "rows": rows}
    methods = {
        "replace": (models["unconditional"], "replace", False),
        "repaint": (models["unconditional"], "repaint", False),
        "inpainting model": (models["inpainter"], "model", False),
        "replace, told the digit": (text, "replace", True),
    }
    print("inpainting: accuracy of the completed digits")
    inpaint_rows, inpaint_kept = inpainting_table(
        methods, classifier, images, labels, args.steps, resample=args.resample,
        guidance_scale=args.guidance, seed=args.seed,
    )  # fmt: skip
    for r in inpaint_rows:
        print(f"  {r['mask']:<7} empty {r['hole_left_empty']:6.1%}  "
              + "  ".join(f"{m} {r[m]:6.1%}" for m in methods))  # fmt: skip
    results["inpainting"] = {"sampler": f"DDIM-{args.steps}", "resample": args.resample,
                             "methods": {k: v[1] for k, v in methods.items()},
                             "rows": inpaint_rows}  # fmt: skip
    reference = reference_features(classifier)
    up_config = models["upscaler"].sampler_config("ddim", args.steps)
    up_rows, up_kept = upscaling_table(models["upscaler"], classifier, images, labels, reference,
                                       up_config, args.seed)  # fmt: skip
    print("upscaling 14x14 -> 28x28")
    for r in up_rows:
        print(f"  {r['method']:<22} PSNR {r['psnr']:5.2f} dB  accuracy {r['accuracy']:6.1%}  "
              f"MNIST-FID {r['mnist_fid']:6.2f}")  # fmt: skip
    results["upscaling"] = {"sampler": up_config.name, "rows": up_rows}
    path, samples = save_results(out, results, {**kept, **inpaint_kept, **up_kept})
    print(f"wrote {path} and {samples.name}")


def add_application_commands(sub: argparse._SubParsersAction) -> None:
    from minisd.pretrained import CHECKPOINTS

    a = sub.add_parser(
        "applications",
        help="measure image-to-image, inpainting and upscaling with the shipped MNIST models",
    )
    for name, file in (
        ("text-model", "ldm_text_mnist"),
        ("unconditional", "ldm_mnist"),
        ("inpainter", "ldm_inpaint_mnist"),
        ("upscaler", "ldm_upscale_mnist"),
    ):
        a.add_argument(f"--{name}", default=str(CHECKPOINTS / f"{file}.safetensors"))
    a.add_argument("--n", type=int, default=500, help="test digits")
    a.add_argument("--strengths", type=float, nargs="+",
                   default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0])  # fmt: skip
    a.add_argument("--steps", type=int, default=20, help="sampler steps")
    a.add_argument("--guidance", type=float, default=3.0, help="for the text model")
    a.add_argument("--resample", type=int, default=5, help="RePaint rounds per step")
    a.add_argument("--out", required=True, help="results .json (kept samples go beside it)")
    add_device_and_seed(a)
    a.set_defaults(func=cmd_applications)
