"""Conditioning as an interface: class labels through training and sampling, and the null class."""

import dataclasses

import pytest
import torch

from minisd.conditioning import ClassConditioner, conditioner_for
from minisd.diffusion import diffusion_loss_fn
from minisd.evaluation import generate
from minisd.pretrained import DiffusionModel
from minisd.schedule import NoiseSchedule
from minisd.train import TrainConfig, fit
from minisd.unet import TINY, UNetModel

CLASS_UNET = dataclasses.replace(TINY, in_channels=1, out_channels=1, num_classes=2)


def test_class_conditioner_batches_and_checks_labels():
    c = ClassConditioner(10)
    assert c.null_label == 10
    assert c.batch(None, 3).tolist() == [10, 10, 10]  # no condition: the null class
    assert c.batch(7, 2).tolist() == [7, 7]
    assert c.batch([1, 2, 10], 3).tolist() == [1, 2, 10]
    assert set(c.model_kwargs(c.batch(3, 2))) == {"y"}
    for bad, match in (([1, 2], "need one label or 3"), (11, r"\[0, 9\]"), (-1, r"\[0, 9\]"),
                       (1.5, "integers"), ([True, False, True], "integers")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            c.batch(bad, 3)
    with pytest.raises(ValueError, match="positive int"):
        ClassConditioner(0)


def test_dropping_labels_is_seeded_and_at_the_asked_rate():
    c = ClassConditioner(10)
    labels = torch.arange(10).repeat(100)
    assert c.drop(labels, 0.0, torch.Generator()) is labels
    a = c.drop(labels, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(a, c.drop(labels, 0.3, torch.Generator().manual_seed(1)))
    assert 0.25 < (a == 10).float().mean().item() < 0.35
    kept = a != 10
    assert torch.equal(a[kept], labels[kept])


def test_the_unet_config_decides_the_conditioner():
    assert (
        conditioner_for(UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1))) is None
    )
    assert conditioner_for(UNetModel(CLASS_UNET)).num_classes == 2
    assert conditioner_for(torch.nn.Linear(2, 2)) is None  # any eps model without a config


@pytest.fixture(scope="module")
def two_class_model():
    """A tiny U-Net taught two flat 8x8 'classes': label 0 is dark (-0.8), label 1 bright (0.8)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=g)
    x = (y.float() * 1.6 - 0.8).view(-1, 1, 1, 1) + 0.05 * torch.randn(256, 1, 8, 8, generator=g)
    torch.manual_seed(0)
    unet = UNetModel(CLASS_UNET)
    schedule = NoiseSchedule("linear", 100)
    cfg = TrainConfig(steps=150, batch_size=32, lr=5e-3, ema_decay=None, log_every=50)
    fit(unet, diffusion_loss_fn(schedule, class_dropout=0.2), (x, y), cfg, progress=False)
    return DiffusionModel(unet.eval(), schedule, "eps", {})


def test_conditioning_reaches_the_samples_end_to_end(two_class_model):
    model = two_class_model
    assert isinstance(model.conditioner, ClassConditioner)
    config = model.sampler_config("ddim", 20)
    dark = generate(model, 16, config, seed=0, image_size=8, cond=0)
    bright = generate(model, 16, config, seed=0, image_size=8, cond=1)
    # the same noise, the other label: every one of the 16 images comes out brighter (after
    # 150 steps the gap is 0.18-0.39 per image; an unconditioned U-Net would give 0)
    gap = bright.mean((1, 2, 3)) - dark.mean((1, 2, 3))
    assert gap.min() > 0.1 and gap.mean() > 0.2
    mixed = generate(model, 16, config, seed=0, image_size=8, cond=[0, 1] * 8)
    assert torch.equal(mixed[::2], dark[::2]) and torch.equal(mixed[1::2], bright[1::2])
    # drawn in batches of 5, each batch gets its own slice of the 16 labels (an odd batch size,
    # so a slice taken from the wrong offset would swap the labels of the second batch)
    fives = {c: generate(model, 16, config, image_size=8, cond=c, batch_size=5) for c in (0, 1)}
    mixed5 = generate(model, 16, config, image_size=8, cond=[0, 1] * 8, batch_size=5)
    assert torch.equal(mixed5[::2], fives[0][::2]) and torch.equal(mixed5[1::2], fives[1][1::2])
    # no condition is the null class, and that is what the U-Net sees with y = null
    none = generate(model, 16, config, seed=0, image_size=8)
    null = generate(model, 16, config, seed=0, image_size=8, cond=model.conditioner.null_label)
    assert torch.equal(none, null)
    x_T = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    by_hand = config.sample(model.eps_fn(y=torch.full((16,), 2)), x_T, model.schedule).clamp(-1, 1)
    assert torch.equal(model.sample(x_T, config), by_hand)


# ----- an image concatenated onto x_t (lesson 04) ----------------------------------------------
def test_image_conditioner_batches_checks_and_drops_to_zeros():
    from minisd.conditioning import ImageConditioner

    c = ImageConditioner(1)
    img = torch.randn(1, 8, 8)
    assert c.batch(img, 3).shape == (3, 1, 8, 8) and set(c.model_kwargs(c.batch(img, 2))) == {
        "concat"
    }
    for bad, match in ((None, "torch.zeros"), (torch.randn(2, 1, 8, 8), r"\(3, 1, H, W\)"),
                       (torch.ones(3, 1, 8, 8, dtype=torch.long), "floating")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            c.batch(bad, 3)
    images = torch.randn(1000, 1, 2, 2) + 3
    dropped = c.drop(images, 0.3, torch.Generator().manual_seed(0))
    zero = (dropped == 0).flatten(1).all(1)
    assert 0.25 < zero.float().mean() < 0.35 and torch.equal(dropped[~zero], images[~zero])
    unet = UNetModel(dataclasses.replace(TINY, in_channels=2, out_channels=1, concat_channels=1))
    assert isinstance(conditioner_for(unet), ImageConditioner)


def test_a_concatenated_image_steers_the_samples_end_to_end():
    """A tiny U-Net taught to copy the brightness of the image it is handed."""
    g = torch.Generator().manual_seed(0)
    level = torch.rand(256, generator=g) * 1.6 - 0.8
    cond = level.view(-1, 1, 1, 1).expand(256, 1, 8, 8).contiguous()
    x = cond + 0.05 * torch.randn(256, 1, 8, 8, generator=g)
    torch.manual_seed(0)
    unet = UNetModel(dataclasses.replace(TINY, in_channels=2, out_channels=1, concat_channels=1))
    schedule = NoiseSchedule("linear", 100)
    cfg = TrainConfig(steps=150, batch_size=32, lr=5e-3, ema_decay=None, log_every=50)
    fit(unet, diffusion_loss_fn(schedule, class_dropout=0.1), (x, cond), cfg, progress=False)
    model = DiffusionModel(unet.eval(), schedule, "eps", {})
    config = model.sampler_config("ddim", 20)
    dark = generate(model, 8, config, image_size=8, cond=torch.full((1, 8, 8), -0.8))
    bright = generate(model, 8, config, image_size=8, cond=torch.full((1, 8, 8), 0.8))
    gap = bright.mean((1, 2, 3)) - dark.mean((1, 2, 3))
    assert gap.min() > 0.1, gap


# ----- the three mechanisms side by side (notebook 04's comparison) ---------------------------
LATENT_BASE = dataclasses.replace(TINY, in_channels=4, out_channels=4, attention_resolutions=(1,))


def test_each_mechanism_builds_its_unet_and_conditioner():
    from minisd.conditioning import (
        ConditionedUNet,
        ImageConditioner,
        TextConditioner,
        mechanism,
        mechanism_conditions,
    )

    labels = torch.tensor([3, 1, 4])
    images = torch.rand(3, 1, 28, 28) * 2 - 1
    unet, cond = mechanism("class", LATENT_BASE)
    assert isinstance(cond, ClassConditioner)
    assert unet.config.num_classes == 10 and unet.config.use_scale_shift_norm
    assert torch.equal(mechanism_conditions("class", cond, labels, images), labels)
    unet, cond = mechanism("concat", LATENT_BASE)
    assert isinstance(cond, ImageConditioner)
    assert (unet.config.in_channels, unet.config.noise_channels) == (5, 4)
    assert mechanism_conditions("concat", cond, labels, images).shape == (3, 1, 8, 8)
    module, cond = mechanism("joint", LATENT_BASE, text_max_length=16)
    assert isinstance(module, ConditionedUNet) and module.conditioner is cond
    assert isinstance(cond, TextConditioner) and cond.trainable
    assert module.config.context_dim == cond.encoder.dim
    ids = mechanism_conditions("joint", cond, labels, images, seed=0)
    assert ids.shape == (3, 16)
    assert torch.equal(ids, mechanism_conditions("joint", cond, labels, images, seed=0))
    with pytest.raises(ValueError, match="unknown mechanism 'film'"):
        mechanism("film", LATENT_BASE)
    with pytest.raises(ValueError, match="unconditional"):
        mechanism("class", dataclasses.replace(LATENT_BASE, num_classes=10))


def test_low_resolution_is_the_blurred_digit_aligned_with_f4_latents():
    from minisd.conditioning import low_resolution

    images = -torch.ones(2, 1, 28, 28)
    images[0, :, 2:6, 2:6] = 1.0  # one bright 4x4 cell after the 2-pixel pad: cell (1, 1)
    low = low_resolution(images)
    assert low.shape == (2, 1, 8, 8)
    assert low[0, 0, 1, 1] == 1.0 and low[0, 0, 0, 0] == -1.0 and (low[1] == -1).all()
    with pytest.raises(ValueError, match=r"\(N, C, 28, 28\)"):
        low_resolution(torch.zeros(2, 1, 32, 32))


@pytest.mark.slow
def test_compare_mechanisms_trains_and_scores_each_on_one_budget():
    from minisd.evaluation import compare_mechanisms
    from minisd.vae import MNIST_F4, AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(dataclasses.replace(MNIST_F4, ch=8, norm_num_groups=4)).eval()
    images = torch.rand(16, 1, 28, 28) * 2 - 1
    labels = torch.arange(16) % 10
    latents = torch.randn(16, 4, 8, 8)
    config = TrainConfig(steps=2, batch_size=8, lr=1e-3, ema_decay=None)
    rows, kept = compare_mechanisms(
        ["class", "concat", "joint"], LATENT_BASE, latents, images, labels, vae, config,
        images[:10], labels[:10], n_per_digit=1, sampler_steps=2, keep=1,
    )  # fmt: skip
    assert [r["mechanism"] for r in rows] == ["class", "concat", "joint"]
    assert all(r["train_steps"] == 2 for r in rows)
    assert set(rows[0]["accuracy"]) == {"condition"}  # a label has no phrasings to hold out
    assert set(rows[2]["accuracy"]) == {"condition", "held_out"}
    for row in rows:
        for split in row["accuracy"].values():
            assert 0 <= split["accuracy"] <= 1 and split["n"] == 10
    assert rows[2]["trainable"] > rows[0]["trainable"]  # the joint encoder learns too
    assert {k: tuple(v.shape) for k, v in kept.items()} == {
        m: (10, 1, 28, 28) for m in ("class", "concat", "joint")
    }
    with pytest.raises(ValueError, match="need 20 test digits"):
        compare_mechanisms(["class"], LATENT_BASE, latents, images, labels, vae, config,
                           images[:10], labels[:10], n_per_digit=2)  # fmt: skip


@pytest.mark.slow
def test_compare_conditioning_command_writes_rows_and_samples(tmp_path, monkeypatch):
    import json

    from minisd import cli
    from minisd.checkpoint import load_tensors
    from minisd.cli import conditioning as conditioning_cli
    from minisd.pretrained import save_autoencoder
    from minisd.vae import MNIST_F4, AutoencoderKL

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 1, 28, 28, generator=g) * 2 - 1, torch.arange(20) % 10
    monkeypatch.setattr(conditioning_cli, "load_mnist", lambda train, limit: (x[:limit], y[:limit]))
    torch.manual_seed(0)
    vae_path, out = tmp_path / "vae.safetensors", tmp_path / "cond.json"
    vae = AutoencoderKL(dataclasses.replace(MNIST_F4, ch=8, norm_num_groups=4))
    save_autoencoder(vae_path, vae)
    cli.main(["compare-conditioning", "--vae", str(vae_path), "--preset", "TINY",
              "--mechanisms", "concat", "class", "--steps", "2", "--batch-size", "4",
              "--n-per-digit", "1", "--sampler-steps", "2", "--keep", "1",
              "--latent-cache", str(tmp_path / "latents.safetensors"),
              "--out", str(out)])  # fmt: skip
    assert load_tensors(tmp_path / "latents.safetensors")[0]["latents"].shape == (20, 4, 8, 8)
    results = json.loads(out.read_text())
    assert [r["mechanism"] for r in results["rows"]] == ["concat", "class"]
    assert results["command"].startswith("python -m minisd compare-conditioning --vae")
    assert results["train_config"]["steps"] == 2 and results["sampler"] == "DDIM-2"
    kept, _ = load_tensors(out.with_suffix(".safetensors"))
    assert {k: tuple(v.shape) for k, v in kept.items()} == dict.fromkeys(
        ("concat", "class"), (10, 1, 28, 28)
    )
    with pytest.raises(ValueError, match="twice"):
        cli.main(["compare-conditioning", "--vae", str(vae_path), "--steps", "1",
                  "--mechanisms", "class", "class", "--out", str(out)])  # fmt: skip
    with pytest.raises(ValueError, match="does not exist"):
        cli.main(["compare-conditioning", "--vae", str(vae_path), "--steps", "1",
                  "--out", str(tmp_path / "missing" / "c.json")])  # fmt: skip
