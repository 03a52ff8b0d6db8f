"""Latent diffusion plumbing: padding, encode/decode, the latent cache, checkpoints, costs."""

import dataclasses
import json

import pytest
import torch
from helpers import randomize

from minisd.checkpoint import load_tensors
from minisd.latent import (
    activation_bytes,
    cached_latents,
    crop_images,
    decode_images,
    encode_images,
    fingerprint,
    fit_scale_factor,
    pad_images,
    training_cost,
    training_flops,
)
from minisd.pretrained import (
    UNET_PREFIX,
    VAE_PREFIX,
    load_autoencoder,
    load_diffusion,
    save_autoencoder,
    save_diffusion,
)
from minisd.schedule import NoiseSchedule
from minisd.unet import TINY, UNetModel
from minisd.vae import TINY as TINY_VAE
from minisd.vae import AutoencoderKL

# A tiny padded-MNIST autoencoder: 1 channel, 32x32 -> 16x16x2.
VAE32 = dataclasses.replace(TINY_VAE, in_channels=1, out_ch=1, resolution=32)
LATENT_UNET = dataclasses.replace(TINY, in_channels=2, out_channels=2)


def tiny_vae(seed=0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(VAE32).eval()
    randomize(vae, seed, std=0.1)
    return vae


def digits(n=6, seed=0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pad_and_crop_are_inverse_and_pad_with_background():
    x = digits(2)
    padded = pad_images(x, 32)
    assert padded.shape == (2, 1, 32, 32)
    assert torch.equal(crop_images(padded, 28), x)
    assert padded[..., :2, :].eq(-1).all() and padded[..., :, -2:].eq(-1).all()
    with pytest.raises(ValueError, match="evenly"):
        pad_images(x, 31)
    with pytest.raises(ValueError, match="evenly"):
        crop_images(x, 30)


def test_encode_pads_and_scales_decode_crops():
    vae = tiny_vae()
    x = digits()
    z = encode_images(vae, x, batch_size=4)  # two batches
    assert z.shape == (6, 2, 16, 16)
    with torch.no_grad():
        want = vae.encode(pad_images(x, 32)).mode() * VAE32.scale_factor
    torch.testing.assert_close(z, want)
    images = decode_images(vae, z, image_size=28, batch_size=4)
    assert images.shape == (6, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(images, crop_images(vae.decode_latents(z), 28))


def test_fit_scale_factor_gives_unit_variance_latents():
    vae = tiny_vae()
    x = digits(16)
    factor = fit_scale_factor(vae, x)
    assert vae.config.scale_factor == factor != 1.0
    assert encode_images(vae, x).std().item() == pytest.approx(1.0, rel=1e-4)


def test_latent_cache_is_reused_only_for_the_same_autoencoder(tmp_path):
    vae, x, path = tiny_vae(), digits(), tmp_path / "latents.safetensors"
    first = cached_latents(vae, x, path, progress=False)
    mtime = path.stat().st_mtime_ns
    torch.testing.assert_close(cached_latents(vae, x, path, progress=False), first)
    assert path.stat().st_mtime_ns == mtime  # read, not rewritten
    other = tiny_vae(seed=1)
    assert fingerprint(other) != fingerprint(vae)
    rebuilt = cached_latents(other, x, path, progress=False)
    assert not torch.allclose(rebuilt, first)


def test_latent_checkpoint_uses_sd_prefixes_and_decodes_samples(tmp_path):
    vae = tiny_vae()
    torch.manual_seed(0)
    unet = UNetModel(LATENT_UNET).eval()
    randomize(unet, std=0.05)
    path = save_diffusion(
        tmp_path / "ldm.safetensors",
        unet,
        NoiseSchedule("linear", 50),
        "eps",
        vae=vae,
        image_size=28,
    )
    from minisd.checkpoint import load_tensors

    keys = set(load_tensors(path)[0])
    assert keys == {UNET_PREFIX + k for k in unet.state_dict()} | {
        VAE_PREFIX + k for k in vae.state_dict()
    }
    model = load_diffusion(path)
    assert model.sample_shape == (2, 16, 16) and model.image_size == 28
    z = torch.randn(3, *model.sample_shape)
    images = model.decode(z)
    assert images.shape == (3, 1, 28, 28)
    torch.testing.assert_close(images, decode_images(vae, z, 28), atol=2e-2, rtol=0)  # fp16
    with pytest.raises(ValueError, match="image_size"):
        save_diffusion(
            tmp_path / "x.safetensors", unet, NoiseSchedule("linear", 50), "eps", vae=vae
        )


def test_pixel_models_decode_to_themselves(tmp_path):
    unet = UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1))
    model = load_diffusion(
        save_diffusion(tmp_path / "p.safetensors", unet, NoiseSchedule("linear", 50), "eps")
    )
    x = torch.randn(2, 1, 8, 8)
    assert model.vae is None and model.sample_shape is None and model.decode(x) is x


def test_autoencoder_round_trip_keeps_the_scale_factor(tmp_path):
    vae = tiny_vae()
    fit_scale_factor(vae, digits(8))
    loaded = load_autoencoder(save_autoencoder(tmp_path / "vae.safetensors", vae))
    assert loaded.config == vae.config
    x = pad_images(digits(2), 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, False)[0], vae(x, False)[0], atol=2e-2, rtol=0)
    with pytest.raises(FileNotFoundError, match="train-vae"):
        load_autoencoder(tmp_path / "missing.safetensors")
    unet_path = save_diffusion(
        tmp_path / "u.safetensors", UNetModel(LATENT_UNET), NoiseSchedule("linear", 5), "eps"
    )
    with pytest.raises(ValueError, match="not a minisd autoencoder checkpoint"):
        load_autoencoder(unet_path)


def test_smaller_inputs_keep_fewer_activations_and_costs_are_reported():
    unet = UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1))
    t = torch.tensor([1, 2])
    small = activation_bytes(unet, torch.randn(2, 1, 8, 8), t)
    large = activation_bytes(unet, torch.randn(2, 1, 16, 16), t)
    assert 3.5 < large / small < 4.5  # four times the pixels, about four times the memory
    cost = training_cost(unet, (1, 8, 8), batch_size=2, steps=2, warmup=1)
    assert cost["values_per_sample"] == 64 and cost["seconds_per_step"] > 0
    assert cost["activation_bytes"] == small
    assert cost["flops_per_step"] == training_flops(unet, torch.randn(2, 1, 8, 8), t)
    large_flops = training_flops(unet, torch.randn(2, 1, 16, 16), t)
    assert 3.5 < large_flops / cost["flops_per_step"] < 4.5  # convolutions scale with positions


class _ViewsAndSlices(torch.nn.Module):
    """Saves, for backward: x (64 floats), y = x * 2 (64), two views of y, and the weight's
    second half (a slice of a parameter, as GEGLU uses)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 4))

    def forward(self, x):  # x (2, 32) requires grad
        y = x * 2.0
        a, b = y[:, :16], y[:, 16:]  # two views of y at different offsets and sizes
        return (a * b).sum() + (x[:, :4] @ self.weight[4:].t()).sum()


def test_activation_bytes_count_each_storage_once_and_no_weight():
    x = torch.randn(2, 32, requires_grad=True)
    # kept alive for backward: x's storage (saved for the matmul) and y's, 64 floats each;
    # counted by address and length instead, a, b and x[:, :4] and the weight slice would add up
    assert activation_bytes(_ViewsAndSlices(), x) == 2 * 64 * 4


def test_training_flops_count_multiply_adds_twice_forward_and_backward():
    # y = x W^T with x (4, 3), W (5, 3): 4 * 3 * 5 multiply-adds forward, as many for dL/dW
    assert training_flops(torch.nn.Linear(3, 5, bias=False), torch.randn(4, 3)) == 2 * 2 * 60
    # a 3x3 conv, 1 -> 4 channels, on 2 images of 8x8: 2 * 64 * 4 * 9 multiply-adds each way
    conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
    assert training_flops(conv, torch.randn(2, 1, 8, 8)) == 2 * 2 * (2 * 64 * 4 * 9)


def test_command_line_vae_then_latent_diffusion(tmp_path, monkeypatch):
    from minisd import cli, evaluation
    from minisd.cli import autoencoder as latent_cli
    from minisd.cli import diffusion as cli_diffusion

    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (32,), generator=g)
    fake = lambda name, train, limit: (x[:limit], y[:limit])  # noqa: E731
    monkeypatch.setattr(cli_diffusion, "load_dataset", fake)
    monkeypatch.setattr(latent_cli, "load_dataset", fake)
    monkeypatch.setattr(latent_cli, "load_mnist", lambda train, limit: (x[:limit], y[:limit]))
    monkeypatch.setattr(evaluation, "load_mnist", lambda train, limit: (x[:limit], y[:limit]))
    vae_path, ldm_path = tmp_path / "vae.safetensors", tmp_path / "ldm.safetensors"
    common = ["--limit", "16", "--batch-size", "8", "--steps", "2"]
    cli.main(
        [
            "train-vae",
            "--preset",
            "TINY",
            "--latent-channels",
            "2",
            *common,
            "--export",
            str(vae_path),
        ]
    )
    sidecar = __import__("json").loads(vae_path.with_suffix(".json").read_text())
    vae = load_autoencoder(vae_path)
    assert vae.config.scale_factor == pytest.approx(sidecar["scale_factor"]["value"])
    assert sidecar["steps"] == 2 and sidecar["commands"][0].startswith("python -m minisd train-vae")

    cli.main(["evaluate-vae", "--checkpoint", str(vae_path), "--n", "16", "--write-sidecar"])
    metrics = __import__("json").loads(vae_path.with_suffix(".json").read_text())["metrics"]
    assert metrics["n"] == 16 and metrics["meets_bar"] is False  # two steps of training
    assert metrics["latent_values"] == 2 * 14 * 14 and metrics["pixel_values"] == 784

    run = tmp_path / "run"
    ldm_args = ["train", "--preset", "TINY", "--latent-vae", str(vae_path), *common]
    cli.main([*ldm_args, "--run-dir", str(run), "--export", str(ldm_path)])
    assert (run / "latents.safetensors").is_file()
    model = load_diffusion(ldm_path)
    assert model.vae is not None and model.sample_shape == (2, 14, 14) and model.image_size == 28
    pt = tmp_path / "s.pt"
    cli.main(["sample", "--checkpoint", str(ldm_path), "--n", "2", "--steps", "2",
              "--out", "", "--save-tensor", str(pt)])  # fmt: skip
    assert torch.load(pt).shape == (2, 1, 28, 28)


def test_latent_vs_pixel_trains_every_space_for_equal_time(tmp_path, monkeypatch):
    from minisd import classifier as classifier_module
    from minisd import cli, metrics
    from minisd.classifier import MnistClassifier, classify
    from minisd.cli import autoencoder as latent_cli
    from minisd.metrics import evaluate_samples
    from minisd.pretrained import save_autoencoder

    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 28, 28, generator=g) * 2 - 1
    torch.manual_seed(0)
    classifier = MnistClassifier().eval()
    monkeypatch.setattr(latent_cli, "load_mnist", lambda train, limit: (x[:limit], None))
    monkeypatch.setattr(classifier_module, "load_classifier", lambda: classifier)
    monkeypatch.setattr(metrics, "reference_features", lambda c: classify(c, x)[0])
    monkeypatch.setattr(
        metrics, "real_baseline", lambda n, c, ref, **kw: evaluate_samples(x[:n], c, ref, **kw)
    )
    vae = AutoencoderKL(dataclasses.replace(TINY_VAE, in_channels=1, out_ch=1))
    vae.config = dataclasses.replace(vae.config, scale_factor=0.5)
    vae_path, out = tmp_path / "vae.safetensors", tmp_path / "cmp.json"
    save_autoencoder(vae_path, vae)
    cli.main(["latent-vs-pixel", "--vae", str(vae_path), "--preset", "TINY", "--seconds", "0.5",
              "--batch-size", "4", "--limit", "16", "--n", "8", "--keep", "3",
              "--out", str(out)])  # fmt: skip
    results = json.loads(out.read_text())
    rows = {r["space"]: r for r in results["rows"]}
    assert list(rows) == ["pixel", "latent", "unscaled"]
    assert rows["pixel"]["values_per_sample"] == 784
    assert rows["latent"]["values_per_sample"] == rows["unscaled"]["values_per_sample"] == 392
    assert rows["unscaled"]["data_std"] == pytest.approx(2 * rows["latent"]["data_std"], rel=1e-4)
    assert all(r["train_steps"] >= 1 and r["report"]["n"] == 8 for r in rows.values())
    kept = load_tensors(out.with_suffix(".safetensors"))[0]
    assert {k: tuple(v.shape) for k, v in kept.items()} == {
        s: (3, 1, 28, 28) for s in ("pixel", "latent", "unscaled")
    }
    with pytest.raises(ValueError, match="twice"):
        cli.main(["latent-vs-pixel", "--vae", str(vae_path), "--seconds", "1", "--spaces",
                  "pixel", "pixel", "--out", str(out)])  # fmt: skip


@pytest.mark.parametrize("space", ["pixel", "latent"])
@pytest.mark.parametrize(
    "sampler, steps, eta", [("ddim", 3, 0.0), ("ddim", 3, 0.5), ("ddpm", 20, 0.0)]
)
def test_the_sample_command_draws_what_generate_draws(tmp_path, space, sampler, steps, eta):
    """One way into sampling: the command line and evaluation give the same images."""
    from minisd import cli
    from minisd.evaluation import generate

    torch.manual_seed(0)
    schedule = NoiseSchedule("linear", 20)
    if space == "latent":
        unet, extra = UNetModel(LATENT_UNET).eval(), {"vae": tiny_vae(), "image_size": 28}
    else:
        unet, extra = UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1)), {}
    randomize(unet, std=0.05)
    path = save_diffusion(tmp_path / "m.safetensors", unet, schedule, "eps", **extra)
    pt = tmp_path / "s.pt"
    cli.main(["sample", "--checkpoint", str(path), "--n", "3", "--sampler", sampler,
              "--steps", str(steps), "--eta", str(eta), "--seed", "4", "--out", "",
              "--save-tensor", str(pt)])  # fmt: skip
    model = load_diffusion(path)
    assert model.sampler.clip_x0 == (None if space == "latent" else 1.0)
    want = generate(model, 3, model.sampler_config(sampler, steps, eta=eta), seed=4)
    got = torch.load(pt)
    assert got.shape == (3, 1, 28, 28) and torch.equal(got, want)
    assert not torch.equal(
        got, generate(model, 3, model.sampler_config(sampler, steps, eta=eta), seed=5)
    )


@pytest.mark.parametrize(
    "schedule",
    [
        NoiseSchedule("sigmoid", 30),  # betas[0] is not the range's start
        NoiseSchedule("scaled_linear", 30, zero_terminal_snr=True),  # betas[-1] is 1
        NoiseSchedule("cosine", 30),
        NoiseSchedule.from_betas(torch.linspace(0.01, 0.2, 30)),
    ],
    ids=["sigmoid", "zero-terminal-snr", "cosine", "custom"],
)
def test_every_schedule_survives_a_checkpoint(tmp_path, schedule):
    unet = UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1))
    model = load_diffusion(save_diffusion(tmp_path / "m.safetensors", unet, schedule, "eps"))
    assert model.schedule.kind == schedule.kind
    torch.testing.assert_close(model.schedule.betas, schedule.betas, rtol=0, atol=0)
