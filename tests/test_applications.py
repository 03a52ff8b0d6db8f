"""Inpainting, image-to-image and upscaling: masks, the known region kept exactly, RePaint,
strength, and the upscaling condition's alignment with the latent grid."""

import dataclasses

import pytest
import torch
from helpers import randomize

from minisd import inpainting as ip
from minisd import upscaling as up
from minisd.img2img import image_to_image, strength_timesteps
from minisd.pretrained import DiffusionModel
from minisd.sampling import SamplerConfig, ddim_timesteps, sample_ddim, sample_dpm_solver
from minisd.schedule import NoiseSchedule
from minisd.unet import TINY, UNetModel
from minisd.vae import MNIST_F4, AutoencoderKL

SCHEDULE = NoiseSchedule("linear", 100)


def pixel_model() -> DiffusionModel:
    torch.manual_seed(0)
    unet = UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1)).eval()
    randomize(unet, std=0.05)
    return DiffusionModel(unet, SCHEDULE, "eps", {}, sampler=SamplerConfig(steps=10, clip_x0=1.0))


def digits(n: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=gen) * 2 - 1


# ----- masks ------------------------------------------------------------------------------------
def test_fixed_masks_hide_what_they_say() -> None:
    assert ip.fixed_mask("bottom")[0, 14:].all() and not ip.fixed_mask("bottom")[0, :14].any()
    assert ip.fixed_mask("left")[0, :, :14].all() and not ip.fixed_mask("left")[0, :, 14:].any()
    assert ip.fixed_mask("center").sum() == ip.CENTER_SIDE**2
    for kind in ("top", "bottom", "left", "right"):
        assert ip.fixed_mask(kind).sum() == 28 * 14
    with pytest.raises(ValueError, match="unknown mask"):
        ip.fixed_mask("diagonal")


def test_random_masks_are_seeded_binary_and_varied() -> None:
    a = ip.random_masks(400, torch.Generator().manual_seed(0))
    b = ip.random_masks(400, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (400, 1, 28, 28)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    hidden = a.mean((1, 2, 3))
    assert (hidden == 1).float().mean() < 0.15  # "everything" is rare
    assert hidden.min() > 0 and hidden.std() > 0.1  # every mask hides something, in many sizes


def test_latent_mask_marks_every_cell_a_hidden_pixel_touches() -> None:
    vae = AutoencoderKL(MNIST_F4)
    mask = torch.zeros(1, 1, 28, 28)
    mask[0, 0, 2, 2] = 1  # pixel (2, 2) is (4, 4) after padding to 32: latent cell (1, 1)
    lat = ip.latent_mask(mask, vae)
    assert lat.shape == (1, 1, 8, 8) and lat.sum() == 1 and lat[0, 0, 1, 1] == 1
    assert ip.latent_mask(ip.fixed_mask("bottom")[None], vae)[0, 0, 4:].all()


def test_masked_images_are_grey_where_hidden_and_bad_masks_are_refused() -> None:
    x, mask = digits(2), ip.fixed_mask("top")
    out = ip.masked_images(x, mask)
    assert (out[:, :, :14] == 0).all() and torch.equal(out[:, :, 14:], x[:, :, 14:])
    with pytest.raises(ValueError, match="mask of shape"):
        ip.masked_images(x, torch.zeros(3, 1, 28, 28))
    with pytest.raises(ValueError, match="holds 1 where"):
        ip.masked_images(x, torch.full((28, 28), 0.5))


# ----- the known region ---------------------------------------------------------------------------
def _noise_fn(x, t):  # a stand-in for a network: any smooth function of x
    return torch.tanh(x) * 0.5


@pytest.mark.parametrize("sampler", [sample_ddim, sample_dpm_solver])
def test_known_region_ends_exactly_at_the_known_latent(sampler) -> None:
    gen = torch.Generator().manual_seed(0)
    z0, x_T = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 4:, :] = 1
    eps_fn = ip.known_region(_noise_fn, z0, mask, SCHEDULE)
    out = sampler(eps_fn, x_T, SCHEDULE, ddim_timesteps(100, 10))
    torch.testing.assert_close(out[..., :4, :], z0[..., :4, :], rtol=1e-5, atol=1e-5)
    free = sampler(_noise_fn, x_T, SCHEDULE, ddim_timesteps(100, 10))
    torch.testing.assert_close(out[..., 4:, :], free[..., 4:, :], rtol=0.5, atol=10)  # ran
    assert not torch.allclose(out[..., 4:, :], z0[..., 4:, :])


def test_repaint_keeps_the_known_region_and_resamples_each_step() -> None:
    gen = torch.Generator().manual_seed(0)
    z0, x_T = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1
    calls = []

    def eps_fn(x, t):
        calls.append(int(t[0]))
        return _noise_fn(x, t)

    ts = ddim_timesteps(100, 5)
    out = ip.sample_repaint(eps_fn, x_T, SCHEDULE, ts, z0, mask, resample=3,
                            generator=torch.Generator().manual_seed(1))  # fmt: skip
    torch.testing.assert_close(out[..., :4], z0[..., :4])
    assert len(calls) == 3 * 4 + 1  # three rounds per step, one at the last
    with pytest.raises(ValueError, match="resample"):
        ip.sample_repaint(eps_fn, x_T, SCHEDULE, ts, z0, mask, resample=0)


@pytest.mark.parametrize("method", ["replace", "repaint"])
def test_inpaint_pastes_back_the_known_pixels_exactly(method) -> None:
    x, mask = digits(2), ip.fixed_mask("right")
    out = ip.inpaint(pixel_model(), x, mask, method=method, resample=2)
    assert torch.equal(out[..., :14], x[..., :14])
    assert not torch.equal(out[..., 14:], x[..., 14:]) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="trained for inpainting"):
        ip.inpaint(pixel_model(), x, mask, method="model")
    with pytest.raises(ValueError, match="unknown inpainting method"):
        ip.inpaint(pixel_model(), x, mask, method="blur")


def test_an_sd_inpainting_model_takes_the_prompt_and_the_masked_image_together() -> None:
    from test_sd import small_sd

    sd = small_sd()  # SD's inpainting layout at toy size: x_t + the masked latent + the mask
    c = sd.unet.config.in_channels
    cfg = dataclasses.replace(sd.unet.config, in_channels=2 * c + 1, concat_channels=c + 1)
    torch.manual_seed(0)
    sd.unet = UNetModel(cfg).eval()
    randomize(sd.unet, std=0.1)
    model = sd.diffusion_model(16, SamplerConfig(steps=3, clip_x0=None))
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1
    cat = ip.inpaint(model, images, mask, ["a cat", "a cat"], method="model", guidance_scale=3.0)
    dog = ip.inpaint(model, images, mask, ["a dog", "a dog"], method="model", guidance_scale=3.0)
    assert torch.equal(cat[..., :8], images[..., :8])  # the known half, pasted back
    assert not torch.allclose(cat, dog)  # the prompt reaches the U-Net beside the concatenation
    with pytest.raises(ValueError, match="use method='model'"):
        ip.inpaint(model, images, mask, ["a cat"] * 2, method="replace")


# ----- image-to-image --------------------------------------------------------------------------
def test_strength_keeps_the_tail_of_the_timesteps() -> None:
    ts = ddim_timesteps(1000, 20)
    assert torch.equal(strength_timesteps(ts, 1.0), ts)
    assert torch.equal(strength_timesteps(ts, 0.5), ts[10:])
    assert len(strength_timesteps(ts, 0.001)) == 1
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="strength must be in"):
            strength_timesteps(ts, bad)


def test_low_strength_keeps_the_image_and_full_strength_moves_far_from_it() -> None:
    model, x = pixel_model(), digits(4)
    near = image_to_image(model, x, None, 0.1)
    far = image_to_image(model, x, None, 1.0)
    assert ((near - x) ** 2).mean() < 0.25 * ((far - x) ** 2).mean()
    again = image_to_image(model, x, None, 0.1)
    torch.testing.assert_close(near, again)  # seeded


# ----- upscaling -------------------------------------------------------------------------------
def test_the_upscaling_condition_is_lossless_and_aligned_with_the_latents() -> None:
    low = up.downsample(digits(3))
    assert low.shape == (3, 1, 14, 14)
    cond = up.upscaling_condition(low)
    assert cond.shape == (3, 4, 8, 8)
    assert torch.equal(up.low_resolution_from(cond), low)
    # low pixel (5, 6) is (6, 7) after padding to 16: latent cell (3, 3), channel 2*0 + 1
    assert cond[0, 1, 3, 3] == low[0, 0, 5, 6]
    flat = torch.full((1, 1, 14, 14), 0.3)
    torch.testing.assert_close(up.bicubic(flat), torch.full((1, 1, 28, 28), 0.3))
    with pytest.raises(ValueError, match="14x14"):
        up.upscaling_condition(digits(1))


# ----- the trained-for-it models: `train --task` --------------------------------------------------
@pytest.mark.parametrize("task", ["inpaint", "upscale"])
def test_train_task_makes_a_model_the_application_functions_take(tmp_path, task) -> None:
    from minisd import cli
    from minisd.pretrained import load_diffusion, save_autoencoder

    torch.manual_seed(0)
    vae_path, path = tmp_path / "vae.safetensors", tmp_path / f"{task}.safetensors"
    save_autoencoder(vae_path, AutoencoderKL(dataclasses.replace(MNIST_F4, ch=8,
                                                                 norm_num_groups=4)))  # fmt: skip
    common = ["train", "--preset", "TINY", "--limit", "16", "--batch-size", "8", "--steps", "2"]
    cli.main([*common, "--latent-vae", str(vae_path), "--task", task, "--export", str(path)])
    model = load_diffusion(path)
    channels = {"inpaint": 4 + 1, "upscale": 4}[task]
    assert model.unet.config.concat_channels == channels
    assert model.unet.config.in_channels == 4 + channels
    x = digits(2)
    if task == "inpaint":
        mask = ip.fixed_mask("top")
        out = ip.inpaint(model, x, mask, config=model.sampler_config(steps=2), method="model")
        assert torch.equal(out[..., 14:, :], x[..., 14:, :])
        with pytest.raises(ValueError, match="no prompt"):
            ip.inpaint(model, x, mask, "seven", method="model")
    else:
        out = up.upscale(model, up.downsample(x), model.sampler_config(steps=2))
        assert out.shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="--latent-vae"):
        cli.main([*common, "--task", task])


# ----- the measurements: `python -m minisd applications` ------------------------------------------
def test_the_applications_command_measures_all_three(tmp_path, monkeypatch) -> None:
    import json

    from minisd import cli, metrics
    from minisd.checkpoint import load_tensors
    from minisd.conditioning import TextConditioner
    from minisd.pretrained import save_diffusion
    from minisd.text import TransformerTextConfig, TransformerTextEncoder

    torch.manual_seed(0)
    vae = AutoencoderKL(dataclasses.replace(MNIST_F4, ch=8, norm_num_groups=4)).eval()
    schedule = NoiseSchedule("linear", 50)
    encoder = TransformerTextEncoder(TransformerTextConfig(dim=16, heads=2, max_length=16))
    base = dataclasses.replace(TINY, in_channels=4, out_channels=4)
    configs = {
        "text-model": dataclasses.replace(base, context_dim=16),
        "unconditional": base,
        "inpainter": dataclasses.replace(base, in_channels=9, concat_channels=5),
        "upscaler": dataclasses.replace(base, in_channels=8, concat_channels=4),
    }
    paths = []
    for name, cfg in configs.items():
        unet = UNetModel(cfg).eval()
        randomize(unet, std=0.05)
        cond = TextConditioner(encoder) if name == "text-model" else None
        path = tmp_path / f"{name}.safetensors"
        save_diffusion(path, unet, schedule, "eps", vae=vae, image_size=28, conditioner=cond,
                       dtype=torch.float32)  # fmt: skip
        paths += [f"--{name}", str(path)]
    monkeypatch.setattr(metrics, "reference_features", lambda c: torch.randn(64, 128))
    out = tmp_path / "apps.json"
    cli.main(["applications", *paths, "--n", "6", "--strengths", "0.5", "1.0", "--steps", "2",
              "--resample", "2", "--out", str(out)])  # fmt: skip
    results = json.loads(out.read_text())
    assert [r["strength"] for r in results["img2img"]["rows"]] == [0.5, 1.0]
    for r in results["img2img"]["rows"]:
        assert 0 <= r["new_digit"] + r["input_digit"] <= 1  # a digit is read as one of them
    assert [r["mask"] for r in results["inpainting"]["rows"]] == list(ip.MASKS)
    assert all(0 <= r["inpainting model"] <= 1 for r in results["inpainting"]["rows"])
    names = [r["method"] for r in results["upscaling"]["rows"]]
    assert names == [
        "14x14 input (nearest)", "bicubic", "diffusion upscaler", "autoencoder ceiling"
    ]  # fmt: skip
    kept = load_tensors(out.with_suffix(".safetensors"))[0]
    assert kept["img2img_0.5"].shape == (6, 1, 28, 28)
    assert kept["upscaling_low"].shape == (6, 1, 14, 14)


def test_the_img2img_explorer_redraws_and_refuses_bad_strengths() -> None:
    import matplotlib.pyplot as plt

    from minisd.conditioning import TextConditioner
    from minisd.text import TransformerTextConfig, TransformerTextEncoder
    from minisd.widgets import Img2ImgExplorer, draw_img2img_explorer

    torch.manual_seed(0)
    encoder = TransformerTextEncoder(TransformerTextConfig(dim=16, heads=2, max_length=16))
    unet = UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1, context_dim=16))
    randomize(unet, std=0.05)
    model = DiffusionModel(unet.eval(), SCHEDULE, "eps", {}, conditioner=TextConditioner(encoder))
    x = digits(3)
    ex = Img2ImgExplorer(model, x, prompt="seven")
    assert ex.state.error is None and ex.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    ex.strength.value = 0.25
    want = image_to_image(model, x, "seven", 0.25, model.sampler_config("dpm++2m", 20),
                          guidance_scale=3.0)  # fmt: skip
    assert ex.state.strength == 0.25 and torch.equal(ex.state.images, want)
    _, state = draw_img2img_explorer(model, x, "two", 1.5, 1.0, 0)
    assert state.images is None and "strength must be in" in state.error
    plt.close("all")
