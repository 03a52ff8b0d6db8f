"""minisd.vae: SD v1's layout, parity with diffusers' AutoencoderKL, the posterior, scale, loss."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from helpers import assert_one_to_one, randomize, tagged

from minisd.summary import count_parameters
from minisd.train import TrainConfig, fit
from minisd.vae import (
    MNIST_F4,
    MNIST_F8,
    SD_V1,
    SD_V1_NUM_PARAMS,
    TINY,
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussianDistribution,
    compute_scale_factor,
    psnr,
    vae_loss,
    vae_loss_fn,
)

# The SD v1 checkpoint stores the autoencoder under this prefix; diffusers' converter expects it.
LDM_PREFIX = "first_stage_model."


def _diffusers_vae(block_out_channels: tuple[int, ...], **kwargs) -> DiffusersAutoencoderKL:
    n = len(block_out_channels)
    return DiffusersAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        **kwargs,
    )


def _convert(model: AutoencoderKL, ref: DiffusersAutoencoderKL) -> dict[str, torch.Tensor]:
    ldm_sd = {LDM_PREFIX + k: v for k, v in model.state_dict().items()}
    return convert_ldm_vae_checkpoint(ldm_sd, dict(ref.config))


def _smooth_images(n: int, channels: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Random blobs in [-1, 1]: compressible, unlike white noise, so a tiny model can learn them."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 2, 2, generator=gen) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)


# ----- the Stable Diffusion v1 layout ------------------------------------------------------------
def test_sd_v1_has_the_known_parameter_count() -> None:
    with torch.device("meta"):  # shapes only, no memory
        ours = AutoencoderKL(SD_V1)
        ref = _diffusers_vae((128, 256, 512, 512), layers_per_block=2)  # SD v1's VAE
    assert count_parameters(ours) == count_parameters(ref) == SD_V1_NUM_PARAMS == 83_653_863


def test_sd_v1_state_dict_uses_checkpoint_key_names() -> None:
    with torch.device("meta"):
        sd = AutoencoderKL(SD_V1).state_dict()
    assert len(sd) == 248
    shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.block.1.norm2.weight": (512,),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),  # up[i] is level i
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),  # num_res_blocks + 1 per level
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("encoder.down.3.downsample", "decoder.up.0.upsample")) for k in sd)


def test_sd_v1_keys_convert_one_to_one_onto_diffusers() -> None:
    """diffusers' ldm->diffusers converter must fill every key of its SD v1 VAE, shapes equal."""
    with torch.device("meta"):
        ours = AutoencoderKL(SD_V1)
        ref = _diffusers_vae((128, 256, 512, 512), layers_per_block=2)
    ldm_sd = tagged(ours.state_dict(), LDM_PREFIX)
    converted = convert_ldm_vae_checkpoint(ldm_sd, dict(ref.config))
    assert_one_to_one(converted, ref.state_dict(), len(ldm_sd))


def test_small_autoencoder_matches_diffusers_at_identical_weights() -> None:
    """Encoder (mean, logvar) and decoder agree with diffusers after its ldm converter."""
    cfg = AutoencoderConfig(3, 3, ch=16, ch_mult=(1, 2), num_res_blocks=2, z_channels=4,
                            embed_dim=4, norm_num_groups=8)  # fmt: skip
    ours = AutoencoderKL(cfg).eval()
    randomize(ours, std=0.1)
    ref = _diffusers_vae((16, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8)
    ref.load_state_dict(_convert(ours, ref.eval()))
    x = torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        posterior, want = ours.encode(x), ref.encode(x).latent_dist
        torch.testing.assert_close(posterior.mean, want.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(posterior.logvar, want.logvar, rtol=1e-5, atol=1e-5)
        z = posterior.mean
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=1e-5, atol=1e-5)
        rec, _ = ours(x, sample_posterior=False)
        want_rec = ref(x, sample_posterior=False).sample
        torch.testing.assert_close(rec, want_rec, rtol=1e-5, atol=1e-5)


# ----- shapes and presets -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "image", "latent"),
    [
        (TINY, (3, 8, 12), (2, 4, 6)),
        (MNIST_F4, (1, 32, 32), (4, 8, 8)),  # padded MNIST: 256 latent values
        (MNIST_F8, (1, 32, 32), (4, 4, 4)),  # SD's factor and channels: 64 values
    ],
)
def test_presets_encode_and_decode_the_advertised_shapes(config, image, latent) -> None:
    model = AutoencoderKL(config).eval()
    x = torch.randn(2, *image)
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == posterior.logvar.shape == (2, *latent)
        assert model.decode(posterior.mode()).shape == x.shape
        assert model(x)[0].shape == x.shape


def test_presets_have_the_advertised_sizes() -> None:
    assert count_parameters(AutoencoderKL(TINY)) < 20_000
    assert 500_000 < count_parameters(AutoencoderKL(MNIST_F4)) < 1_000_000
    assert count_parameters(AutoencoderKL(MNIST_F8)) < 1_500_000
    factors = [c.downsampling_factor for c in (TINY, MNIST_F4, MNIST_F8, SD_V1)]
    assert factors == [2, 4, 8, 8]
    assert SD_V1.scale_factor == 0.18215 and TINY.scale_factor == 1.0


def test_attn_resolutions_add_attention_at_that_level() -> None:
    cfg = dataclasses.replace(TINY, resolution=8, attn_resolutions=(4,))  # level 1 is 4x4
    model = AutoencoderKL(cfg)
    keys = model.state_dict().keys()
    assert "encoder.down.1.attn.0.q.weight" in keys and "decoder.up.1.attn.1.k.weight" in keys
    assert not any(k.startswith(("encoder.down.0.attn", "decoder.up.0.attn")) for k in keys)
    x = torch.randn(1, 3, 8, 8)
    assert model(x)[0].shape == x.shape


# ----- the posterior q(z|x) ----------------------------------------------------------------------
def test_kl_is_zero_exactly_at_the_standard_normal() -> None:
    posterior = DiagonalGaussianDistribution(torch.zeros(2, 8, 3, 3))
    assert torch.equal(posterior.kl(), torch.zeros(2))
    mean, logvar = torch.ones(2, 4, 3, 3), -torch.ones(2, 4, 3, 3)
    assert (DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).kl() > 0).all()


def test_kl_and_nll_match_torch_distributions() -> None:
    params = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    posterior = DiagonalGaussianDistribution(params)
    normal = torch.distributions.Normal(posterior.mean, posterior.std)
    standard = torch.distributions.Normal(0.0, 1.0)
    want_kl = torch.distributions.kl_divergence(normal, standard).sum((1, 2, 3))
    torch.testing.assert_close(posterior.kl(), want_kl)
    z = posterior.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(posterior.nll(z), -normal.log_prob(z).sum((1, 2, 3)))


def test_sampling_is_seeded_and_mode_is_the_mean() -> None:
    params = torch.randn(2, 4, 3, 3)
    posterior = DiagonalGaussianDistribution(params)
    assert torch.equal(posterior.mode(), params[:, :2])
    draw = lambda seed: posterior.sample(torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))


def test_logvar_is_clamped() -> None:
    params = torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 100.0)], 1)
    posterior = DiagonalGaussianDistribution(params)
    assert posterior.logvar.max() == 20.0 and torch.isfinite(posterior.var).all()


# ----- latent scale -----------------------------------------------------------------------------
def test_scaled_latents_round_trip_through_the_decoder() -> None:
    model = AutoencoderKL(dataclasses.replace(TINY, scale_factor=0.18215)).eval()
    randomize(model, std=0.1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        posterior = model.encode(x)
        latents = model.encode_latents(x)
        torch.testing.assert_close(latents, posterior.mode() * 0.18215)
        torch.testing.assert_close(model.decode_latents(latents), model.decode(posterior.mode()))
        gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        sampled = model.encode_latents(x, gen(), sample=True)
        torch.testing.assert_close(sampled, posterior.sample(gen()) * 0.18215)


def test_compute_scale_factor_gives_unit_std() -> None:
    latents = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 5.5 + 1.0
    scale = compute_scale_factor(latents)
    assert scale == pytest.approx(1 / 5.5, rel=0.05)
    assert (latents * scale).std().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="have std 0.0: encode a batch of real images"):
        compute_scale_factor(torch.ones(2, 4, 2, 2))


# ----- the loss -------------------------------------------------------------------------------
def test_loss_is_reconstruction_plus_weighted_kl_per_pixel_value() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(TINY)
    randomize(model, std=0.1)  # a posterior and a reconstruction far from trivial
    x = _smooth_images(2)
    d = 3 * 8 * 8  # values per image
    with torch.no_grad():
        # by hand, from the encoder's raw output: z = mean + std * eps with the loss's own eps
        mean, logvar = model.quant_conv(model.encoder(x)).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)  # ldm's clamp
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
        x_rec = model.decoder(model.post_quant_conv(mean + (0.5 * logvar).exp() * eps))
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()  # nats per image
        want_rec = {"l1": (x_rec - x).abs().mean(), "mse": ((x_rec - x) ** 2).mean()}
        for reconstruction, rec in want_rec.items():
            loss, logs = vae_loss(model, x, 0.5, torch.Generator().manual_seed(0), reconstruction)
            assert set(logs) == {"loss", "rec", "kl"}
            assert logs["rec"] == pytest.approx(rec.item(), rel=1e-5)
            assert logs["kl"] == pytest.approx(kl.item(), rel=1e-5) and kl > 0.1
            want = rec.item() + 0.5 * kl.item() / d
            assert loss.item() == pytest.approx(want, rel=1e-5) == logs["loss"]
    assert abs(want_rec["l1"] - want_rec["mse"]) > 0.1 * want_rec["l1"]  # the two differ here


def test_perceptual_term_adds_the_weighted_feature_distance() -> None:
    torch.manual_seed(0)
    model, x = AutoencoderKL(TINY), _smooth_images(2)
    features = torch.nn.Conv2d(3, 5, 3)  # any frozen network's features
    gen = torch.Generator().manual_seed(0)
    loss, logs = vae_loss(model, x, 0.5, gen, "l1", features, perceptual_weight=2.0)
    gen = torch.Generator().manual_seed(0)  # same posterior sample
    x_rec, _ = model(x, sample_posterior=True, generator=gen)
    want = (features(x_rec) - features(x)).pow(2).mean().item()
    assert logs["perceptual"] == pytest.approx(want, rel=1e-5)
    assert loss.item() == pytest.approx(
        logs["rec"] + 0.5 * logs["kl"] / (3 * 8 * 8) + 2.0 * want, rel=1e-5
    )
    with pytest.raises(ValueError, match="needs a `perceptual` feature network"):
        vae_loss_fn(1e-6, perceptual_weight=1.0)


def test_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model, x = AutoencoderKL(TINY), _smooth_images(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        loss, _ = vae_loss(model, x, 1e-3, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]  # 0.46 -> 0.26 with this seed


def test_vae_loss_fn_trains_with_fit() -> None:
    """vae_loss_fn has fit's loss_fn(model, batch, generator) signature."""
    config = TrainConfig(steps=3, batch_size=4, ema_decay=None, log_every=1)
    result = fit(AutoencoderKL(TINY), vae_loss_fn(1e-6), (_smooth_images(8),), config,
                 progress=False, device="cpu")  # fmt: skip
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in result.history)


# ----- psnr -----------------------------------------------------------------------------------
def test_psnr_known_values() -> None:
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    assert psnr(x, x) == math.inf
    assert psnr(x, x + 0.2) == pytest.approx(20.0, abs=1e-4)  # 10 log10(2^2 / 0.2^2)
    offsets = torch.tensor([0.2, 0.02]).view(2, 1, 1, 1)
    assert psnr(x, x + offsets) == pytest.approx(30.0, abs=1e-3)  # mean of 20 and 40 dB
    assert psnr(x, x + 0.1, data_range=1.0) == pytest.approx(20.0, abs=1e-4)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:1])


# ----- helpful errors -------------------------------------------------------------------------
def test_bad_inputs_raise_helpful_errors() -> None:
    model = AutoencoderKL(TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*in_channels=3.*got \(2, 1, 8, 8\)"):
        model.encode(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"got \(3, 8, 8\)"):
        model.encode(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match=r"\(9, 8\) must be a multiple of .* 2.*pad or resize"):
        model(torch.randn(1, 3, 9, 8))
    with pytest.raises(ValueError, match=r"\(28, 28\) must be a multiple of .* 8.*pad_images"):
        AutoencoderKL(MNIST_F8).encode(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 2, H, W\).*embed_dim=2"):
        model.decode(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"mean and logvar stacked"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        vae_loss_fn(-1.0)
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        vae_loss(model, torch.randn(1, 3, 8, 8), 0.0, reconstruction="lpips")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"norm_num_groups": 3}, "lower norm_num_groups"),
        ({"ch": 0}, "ch must be an int >= 1, got 0"),
        ({"z_channels": 0}, "z_channels must be an int >= 1"),
        ({"ch_mult": ()}, "ch_mult must be positive ints"),
        ({"double_z": False}, "double_z must be True"),
        ({"scale_factor": 0.0}, "scale_factor > 0"),
        ({"attn_resolutions": (4,)}, r"resolution=None; choose from \[\], got \(4,\)"),
        ({"resolution": 8, "attn_resolutions": (2,)}, r"choose from \[8, 4\], got \(2,\)"),
    ],
)
def test_bad_configs_raise_helpful_errors(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.ch = 16  # type: ignore[misc]


# ----- the contract, edge by edge ---------------------------------------------------------------
def test_posterior_bounds_and_shapes() -> None:
    params = torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), -100.0)], 1)
    assert DiagonalGaussianDistribution(params).logvar.min() == -30.0  # ldm's lower clamp
    flat = DiagonalGaussianDistribution(torch.tensor([[1.0, 2.0, 0.0, 0.0]]))  # (B, 2*C)
    assert flat.mean.tolist() == [[1.0, 2.0]] and flat.kl().tolist() == [2.5]  # (1 + 4) / 2
    with pytest.raises(ValueError, match="mean and logvar stacked on dim 1"):
        DiagonalGaussianDistribution(torch.zeros(4))


def test_compute_scale_factor_at_the_edges() -> None:
    assert compute_scale_factor(torch.tensor([0.0, 2.0])) == pytest.approx(2**-0.5)  # 2 values
    small = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.5
    assert compute_scale_factor(small) == pytest.approx(2.0, rel=0.05)  # std below 1 is fine
    with pytest.raises(ValueError, match="have std"):
        compute_scale_factor(torch.tensor([3.0]))  # one value has no spread


def test_psnr_of_flat_and_multichannel_batches() -> None:
    x = torch.zeros(3, 16)  # (B, D): images already flattened
    assert psnr(x, x + 0.2) == pytest.approx(20.0, abs=1e-4)
    y = torch.zeros(1, 2, 2, 2)
    z = y.clone()
    z[0, 1, 0, 0] = 0.8  # one wrong value in eight: MSE 0.08
    assert psnr(y, z) == pytest.approx(10 * math.log10(4 / 0.08), abs=1e-4)


def test_loss_of_a_batch_of_one_and_a_light_perceptual_term() -> None:
    torch.manual_seed(0)
    model, x = AutoencoderKL(TINY), _smooth_images(1)
    loss, logs = vae_loss(model, x, 0.5, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(logs["rec"] + 0.5 * logs["kl"] / (3 * 8 * 8), rel=1e-5)
    features = torch.nn.Conv2d(3, 5, 3)
    loss, logs = vae_loss(model, x, 0.5, torch.Generator().manual_seed(0), "l1", features, 0.5)
    assert logs["perceptual"] > 0
    assert loss.item() == pytest.approx(
        logs["rec"] + 0.5 * logs["kl"] / (3 * 8 * 8) + 0.5 * logs["perceptual"], rel=1e-5
    )
    loss_fn = vae_loss_fn(0.5, "l1", features, 0.5)  # the loss for fit takes the network too
    assert loss_fn(model, (x,), torch.Generator().manual_seed(0)).item() == loss.item()
