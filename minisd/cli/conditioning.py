"""Conditioning commands (notebook 04): the three ways a condition reaches the U-Net, compared.

    python -m minisd compare-conditioning --vae data/checkpoints/vae_mnist_f4.safetensors \
        --steps 1500 --out data/results/conditioning.json
"""

from __future__ import annotations

import argparse
import dataclasses

from minisd import unet as unet_module
from minisd.cli.options import add_device_and_seed, check_output, check_unique
from minisd.conditioning import MECHANISMS
from minisd.course import get_device, hardware
from minisd.data import load_mnist
from minisd.latent import cached_latents, encode_images
from minisd.pretrained import load_autoencoder
from minisd.provenance import command_line
from minisd.train import TrainConfig


def cmd_compare_conditioning(args: argparse.Namespace) -> None:
    """One U-Net per mechanism, same widths, data, steps and seed; conditional accuracy of each."""
    from minisd.classifier import load_classifier
    from minisd.evaluation import compare_mechanisms, save_results

    check_unique("--mechanisms", args.mechanisms)
    check_output(args.out, "--out", ("json",))
    device = get_device(args.device)
    vae = load_autoencoder(args.vae, device=device)
    images, labels = load_mnist(train=True, limit=args.limit)
    test_images, test_labels = load_mnist(train=False, limit=10 * args.n_per_digit)
    if args.latent_cache:  # encode the training digits once, reuse them on the next run
        latents = cached_latents(vae, images, check_output(args.latent_cache, "--latent-cache",
                                                           ("safetensors",)))  # fmt: skip
    else:
        latents = encode_images(vae, images, progress=True)
    base = dataclasses.replace(
        getattr(unet_module, args.preset),
        in_channels=latents.shape[1],
        out_channels=latents.shape[1],
        channel_mult=tuple(args.channel_mult),
        num_res_blocks=args.num_res_blocks,
        attention_resolutions=tuple(args.attention_resolutions),
    )
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
        ema_decay=args.ema_decay, seed=args.seed,
    )  # fmt: skip
    rows, kept = compare_mechanisms(
        args.mechanisms, base, latents, images, labels, vae, config, test_images, test_labels,
        n_per_digit=args.n_per_digit, sampler_steps=args.sampler_steps,
        cond_dropout=args.cond_dropout, classifier=load_classifier(), keep=args.keep,
        progress=True, device=device,
    )  # fmt: skip
    for row in rows:
        held, accuracy = row["accuracy"].get("held_out"), row["accuracy"]["condition"]
        print(
            f"{row['title']:<40} {row['trainable']:>10,} trainable, {row['train_steps']} steps "
            f"in {row['train_seconds']:.0f} s: accuracy {accuracy['accuracy']:.1%}"
            + (f", held-out phrasings {held['accuracy']:.1%}" if held else "")
        )
    results = {
        "command": command_line(args),
        "hardware": hardware(),
        "vae": str(args.vae),
        "vae_sha256": vae.metadata["weights_sha256"],
        "train_config": dataclasses.asdict(config),
        "train_images": len(images),
        "cond_dropout": args.cond_dropout,
        "n_per_digit": args.n_per_digit,
        "sampler": f"DDIM-{args.sampler_steps}",
        "rows": rows,
    }
    out, samples_path = save_results(args.out, results, kept)
    print(f"wrote {out} and {samples_path.name}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "compare-conditioning",
        help="train one U-Net per conditioning mechanism for the same steps; accuracy of each",
    )
    c.add_argument("--vae", required=True, help="the f=4 autoencoder whose latents they learn")
    c.add_argument("--mechanisms", nargs="+", choices=list(MECHANISMS), default=list(MECHANISMS))
    c.add_argument("--preset", default="MNIST", help="U-Net widths, the same for every mechanism")
    c.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2])
    c.add_argument("--num-res-blocks", type=int, default=1)
    c.add_argument("--attention-resolutions", type=int, nargs="*", default=[1, 2])
    c.add_argument("--steps", type=int, required=True, help="training steps for each model")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--warmup", type=int, default=50)
    c.add_argument("--ema-decay", type=float, default=0.995)
    c.add_argument("--cond-dropout", type=float, default=0.1)
    c.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    c.add_argument("--n-per-digit", type=int, default=50, help="samples per digit and split")
    c.add_argument("--sampler-steps", type=int, default=20, help="DDIM steps")
    c.add_argument("--keep", type=int, default=2, help="samples kept per digit for display")
    c.add_argument("--out", required=True, help="results .json (samples go beside it)")
    c.add_argument(
        "--latent-cache", default=None, help="a .safetensors file keeping the encoded digits"
    )
    add_device_and_seed(c)
    c.set_defaults(func=cmd_compare_conditioning)
