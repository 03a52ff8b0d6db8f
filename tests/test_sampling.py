"""Samplers: parity with diffusers' DDPM/DDIM schedulers, then invariants of the reverse process."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from minisd import sampling
from minisd.diffusion import eps_from_v, v_to_eps_fn
from minisd.sampling import (
    SAMPLERS,
    SD_V1_SAMPLER,
    SD_V1_STEPS_OFFSET,
    SamplerConfig,
    ddim_step,
    ddim_timesteps,
    ddpm_step,
    ddpm_timesteps,
    sample_ddim,
    sample_ddpm,
)
from minisd.schedule import DIFFUSERS_NAMES, NoiseSchedule

SHAPE = (2, 3, 4, 4)  # (B, C, H, W)
T = 1000
KINDS = ("linear", "scaled_linear")


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# Published ranges, not the library's defaults: DDPM's linear and Stable Diffusion v1's.
PUBLISHED_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def _diffusers_config(kind: str, num_timesteps: int = T) -> dict:
    beta_start, beta_end = PUBLISHED_BETA_RANGE[kind]
    return dict(
        num_train_timesteps=num_timesteps,
        beta_schedule=DIFFUSERS_NAMES[kind],
        beta_start=beta_start,
        beta_end=beta_end,
    )


def _use_float64_tables(scheduler, schedule: NoiseSchedule):
    """Give a diffusers scheduler our float64 tables, so parity is tested to float64 precision.

    Only once diffusers' own float32 tables, built from the published betas, agree with ours.
    """
    torch.testing.assert_close(
        schedule.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-6
    )
    scheduler.betas = schedule.betas.clone()
    scheduler.alphas = schedule.alphas.clone()
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        final = 1.0 if scheduler.config.set_alpha_to_one else schedule.alphas_cumprod[0].item()
        scheduler.final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)
    return scheduler


def _oracle_eps_fn(schedule: NoiseSchedule, x0: torch.Tensor):
    """The true noise for the single image x0: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alphas_cumprod[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    return eps_fn


# ----- parity with diffusers ------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip_x0", [None, 1.0])
def test_ddpm_step_matches_diffusers(kind, variance, clip_x0):
    schedule = NoiseSchedule(kind)
    ref = DDPMScheduler(
        **_diffusers_config(kind),
        variance_type=variance,
        clip_sample=clip_x0 is not None,
        clip_sample_range=clip_x0 or 1.0,
    )
    ref = _use_float64_tables(ref, schedule)
    x_t, eps = _randn(*SHAPE, seed=0), _randn(*SHAPE, seed=1)
    for t in (0, 1, 10, 500, T - 1):
        # diffusers draws its noise with torch.randn from the generator: seed both the same.
        expected = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = _randn(*SHAPE, seed=t)
        got = ddpm_step(schedule, x_t, eps, t, noise=noise, variance=variance, clip_x0=clip_x0)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        if t > 0:  # the noise term is really there (and the same)
            noiseless = ddpm_step(schedule, x_t, eps, t, noise=0 * noise, variance=variance)
            assert (got - noiseless).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_ddpm_step_matches_stock_float32_diffusers(kind):
    """Stock float32 diffusers agrees to ~2e-4; its 1 - alpha-bar cancels digits near t = 0."""
    schedule = NoiseSchedule(kind)
    ref = DDPMScheduler(**_diffusers_config(kind), clip_sample=False)
    x_t, eps = _randn(*SHAPE, seed=0), _randn(*SHAPE, seed=1)
    for t in (0, 1, 500, T - 1):
        noise = _randn(*SHAPE, seed=t, dtype=torch.float32)  # what diffusers draws
        got = ddpm_step(schedule, x_t.float(), eps.float(), t, noise=noise, clip_x0=None)
        generator = torch.Generator().manual_seed(t)
        expected = ref.step(eps.float(), t, x_t.float(), generator=generator).prev_sample
        torch.testing.assert_close(got, expected, rtol=0, atol=5e-4)
        # Our float64 tables keep a float32 step at float32 precision.
        exact = ddpm_step(schedule, x_t, eps, t, noise=noise.double(), clip_x0=None)
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("clip_x0", [None, 1.0])
def test_ddim_step_matches_diffusers(kind, set_alpha_to_one, clip_x0):
    schedule = NoiseSchedule(kind)
    ref = DDIMScheduler(
        **_diffusers_config(kind),
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=clip_x0 is not None,
        clip_sample_range=clip_x0 or 1.0,
    )
    ref.set_timesteps(50)  # diffusers steps from t to t - T // 50
    ref = _use_float64_tables(ref, schedule)
    final = 1.0 if set_alpha_to_one else None
    x_t, eps, noise = (_randn(*SHAPE, seed=s) for s in range(3))
    for eta in (0.0, 0.5, 1.0):
        for t in (T - 1, 500, 20, 10, 0):  # 10 and 0 step past t = 0: the final step
            expected = ref.step(eps, t, x_t, eta=eta, variance_noise=noise).prev_sample
            got = ddim_step(
                schedule, x_t, eps, t, t - T // 50, eta, noise, clip_x0, final_alpha_cumprod=final
            )
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spacing", sampling.SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, SD_V1_STEPS_OFFSET])
def test_ddim_timesteps_match_diffusers(spacing, steps_offset):
    # Every step count for T = 1000: ties such as 499.5 must round as diffusers' NumPy does.
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=steps_offset)
    for num_steps in range(1, T + 1):
        if spacing == "leading" and steps_offset and num_steps == T:
            continue  # diffusers returns t = 1000, out of range; we raise (tested below)
        ref.set_timesteps(num_steps)
        # diffusers' float arange sometimes appends t = -1 (61 trailing steps give 62): drop it.
        assert torch.equal(
            ddim_timesteps(T, num_steps, spacing, steps_offset), ref.timesteps[:num_steps]
        )


def test_ddim_timesteps_sd_v1_and_range():
    sd_v1 = ddim_timesteps(T, 50, "leading", SD_V1_STEPS_OFFSET)
    assert sd_v1[[0, 1, -1]].tolist() == [981, 961, 1]
    for num_train in (7, 15, 17, 21):  # small T where NumPy's float arange adds a spurious step
        for num_steps in range(1, num_train + 1):
            for spacing in sampling.SPACINGS:
                ts = ddim_timesteps(num_train, num_steps, spacing)
                assert len(ts) == num_steps and ts.min() >= 0 and ts.max() < num_train
                assert (ts[:-1] > ts[1:]).all()


def test_sample_ddpm_matches_diffusers_loop():
    schedule = NoiseSchedule("linear", num_timesteps=20)
    ref = _use_float64_tables(DDPMScheduler(**_diffusers_config("linear", 20)), schedule)
    w = _randn(*SHAPE, seed=5)

    def eps_fn(x, t):
        return torch.tanh(x * w) + t.view(-1, 1, 1, 1) / 20

    x_T = _randn(*SHAPE, seed=6)
    got = sample_ddpm(
        eps_fn, x_T, schedule, ddpm_timesteps(20), generator=torch.Generator().manual_seed(0)
    )
    x, generator = x_T, torch.Generator().manual_seed(0)
    for t in ref.timesteps:
        x = ref.step(eps_fn(x, t.repeat(len(x))), t, x, generator=generator).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)


def test_sample_ddim_matches_diffusers_loop():
    """SD v1's settings: leading spacing, steps_offset=1, set_alpha_to_one=False; eta > 0."""
    schedule = NoiseSchedule("scaled_linear")
    ref = DDIMScheduler(
        **_diffusers_config("scaled_linear"),
        steps_offset=SD_V1_STEPS_OFFSET,
        set_alpha_to_one=False,
        clip_sample=False,
    )
    ref.set_timesteps(10)
    ref = _use_float64_tables(ref, schedule)
    w = _randn(*SHAPE, seed=5)

    def eps_fn(x, t):
        return torch.tanh(x * w) + t.view(-1, 1, 1, 1) / T

    x_T, eta = _randn(*SHAPE, seed=6), 0.7
    # SD v1's preset, with 10 steps and eta > 0
    config = dataclasses.replace(SD_V1_SAMPLER, steps=10, eta=eta)
    got = config.sample(eps_fn, x_T, schedule, generator=torch.Generator().manual_seed(0))
    x, generator = x_T, torch.Generator().manual_seed(0)
    for t in ref.timesteps:
        x = ref.step(eps_fn(x, t.repeat(len(x))), t, x, eta=eta, generator=generator).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)


# ----- invariants -----------------------------------------------------------------------------
def test_ddim_eta_zero_is_deterministic():
    schedule = NoiseSchedule("linear")
    x_T = _randn(*SHAPE, seed=0, dtype=torch.float32)

    def eps_fn(x, t):
        return 0.5 * x

    ts = ddim_timesteps(1000, 10)
    first = sample_ddim(eps_fn, x_T, schedule, ts)
    assert torch.equal(first, sample_ddim(eps_fn, x_T, schedule, ts))


def test_seeded_ddpm_is_reproducible():
    schedule = NoiseSchedule("linear", num_timesteps=50)
    x_T = _randn(*SHAPE, seed=0, dtype=torch.float32)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample_ddpm(
            lambda x, t: 0.5 * x, x_T, schedule, ddpm_timesteps(50), generator=generator
        )

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


@pytest.mark.parametrize("spacing", sampling.SPACINGS)
def test_ddim_with_oracle_eps_recovers_x0(spacing):
    schedule = NoiseSchedule("scaled_linear")
    x0 = 0.9 * torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 0.9
    x_T = 3 * _randn(1, 3, 8, 8, seed=1, dtype=torch.float32)  # any start, even off-distribution
    out = sample_ddim(_oracle_eps_fn(schedule, x0), x_T, schedule, ddim_timesteps(T, 20, spacing))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


def test_ddpm_with_oracle_eps_converges_to_x0():
    schedule = NoiseSchedule("linear")
    x0 = 0.9 * torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 0.9
    x_T = _randn(1, 3, 8, 8, seed=1, dtype=torch.float32)
    generator = torch.Generator().manual_seed(2)
    out = sample_ddpm(
        _oracle_eps_fn(schedule, x0), x_T, schedule, ddpm_timesteps(T), generator=generator
    )
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


def test_callback_sees_every_step_in_order():
    schedule = NoiseSchedule("linear", num_timesteps=30)
    x_T = _randn(*SHAPE, seed=0, dtype=torch.float32)
    for sampler, timesteps, kwargs, num_steps in (
        (sample_ddpm, ddpm_timesteps(30), {}, 30),
        (sample_ddim, ddim_timesteps(30, 7), {"eta": 0.5}, 7),
    ):
        seen = []
        sampler(lambda x, t: 0.1 * x, x_T, schedule, timesteps, callback=seen.append, **kwargs)
        assert [info["i"] for info in seen] == list(range(num_steps))
        ts = [info["t"] for info in seen]
        assert ts == sorted(ts, reverse=True) and ts[-1] == 0
        assert all(info["x0_pred"].shape == info["x_t"].shape == SHAPE for info in seen)


def test_progress_bar_runs():
    schedule = NoiseSchedule("linear", num_timesteps=5)
    out = sample_ddim(lambda x, t: x, torch.zeros(SHAPE), schedule, [4, 2, 0], progress=True)
    assert out.shape == SHAPE


def test_ddim_eta_one_with_every_step_is_ddpm_fixed_small():
    """With t_prev = t - 1, DDIM's sigma(eta=1) is beta-tilde_t and its mean is DDPM's (eq. 16)."""
    schedule = NoiseSchedule("linear")
    t = torch.arange(1, T)  # every step at once, one per batch element
    x_t, eps = _randn(T - 1, 2, seed=0), _randn(T - 1, 2, seed=1)
    ones, zeros = torch.ones_like(x_t), torch.zeros_like(x_t)

    def ddim(noise):
        return ddim_step(schedule, x_t, eps, t, t - 1, eta=1.0, noise=noise)

    def ddpm(noise):
        return ddpm_step(schedule, x_t, eps, t, noise=noise, clip_x0=None)

    sigma_ddim, sigma_ddpm = ddim(ones) - ddim(zeros), ddpm(ones) - ddpm(zeros)
    expected = schedule.posterior_variance[1:].sqrt()[:, None].expand_as(x_t)
    torch.testing.assert_close(sigma_ddim, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sigma_ddpm, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ddim(zeros), ddpm(zeros), rtol=1e-9, atol=1e-9)


def test_ddpm_step_adds_no_noise_at_t_zero():
    schedule = NoiseSchedule("linear")
    x_t, eps = _randn(*SHAPE, seed=0), _randn(*SHAPE, seed=1)
    t = torch.tensor([0, 5])
    noisy = ddpm_step(schedule, x_t, eps, t, noise=torch.ones(SHAPE, dtype=torch.float64))
    clean = ddpm_step(schedule, x_t, eps, t, noise=torch.zeros(SHAPE, dtype=torch.float64))
    assert torch.equal(noisy[0], clean[0]) and not torch.equal(noisy[1], clean[1])


def test_eps_from_v_inverts_velocity():
    schedule = NoiseSchedule("scaled_linear")
    x0, noise = _randn(*SHAPE, seed=0), _randn(*SHAPE, seed=1)
    t = torch.tensor([3, 900])
    x_t = schedule.add_noise(x0, noise, t)
    v = schedule.velocity(x0, noise, t)
    torch.testing.assert_close(eps_from_v(v, x_t, t, schedule), noise)
    eps_fn = v_to_eps_fn(lambda x, t: schedule.velocity(x0, noise, t), schedule)
    torch.testing.assert_close(eps_fn(x_t, t), noise)


def test_samplers_do_not_track_gradients():
    schedule = NoiseSchedule("linear", num_timesteps=5)
    scale = torch.tensor(0.5, requires_grad=True)
    out = sample_ddim(lambda x, t: scale * x, torch.ones(SHAPE), schedule, [4, 2, 0])
    assert not out.requires_grad


# ----- bad inputs -----------------------------------------------------------------------------
def test_bad_inputs_raise():
    schedule = NoiseSchedule("linear", num_timesteps=10)
    x, eps = torch.zeros(SHAPE), torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="fixed_small, fixed_large"):
        ddpm_step(schedule, x, eps, 3, variance="learned")
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        ddim_timesteps(10, 5, spacing="karras")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_step(schedule, x, eps, 3, 2, eta=-0.1)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sample_ddim(lambda x, t: x, x, schedule, [5, 0], eta=-1.0)
    with pytest.raises(ValueError, match="shape of x_t"):
        ddpm_step(schedule, x, eps[:1], 3)
    with pytest.raises(ValueError, match="shape of x_t"):
        ddim_step(schedule, x, eps[..., :2], 3, 2)
    with pytest.raises(ValueError, match="eps_fn must return"):
        sample_ddpm(lambda x, t: x[:, :1], x, schedule, ddpm_timesteps(10))
    for num_steps in (0, 11, 2.5):
        with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 10\]"):
            ddim_timesteps(10, num_steps)
    with pytest.raises(ValueError, match="past the last timestep 9"):
        ddim_timesteps(10, 10, "leading", SD_V1_STEPS_OFFSET)
    with pytest.raises(ValueError, match="clip_x0"):
        ddpm_step(schedule, x, eps, 3, clip_x0=0.0)
    with pytest.raises(ValueError, match="t_prev"):
        ddim_step(schedule, x, eps, 3, 3)
    with pytest.raises(ValueError, match="timesteps must lie in"):
        ddpm_step(schedule, x, eps, 10)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        ddim_step(schedule, x, eps, 3, -1, final_alpha_cumprod=0.0)


# ----- the contract, edge by edge: defaults, generators, shapes, callback records -------------
def test_step_defaults():
    schedule = NoiseSchedule("linear", num_timesteps=1000)
    x_t = 3 * torch.ones(SHAPE, dtype=torch.float64)
    eps = torch.zeros(SHAPE, dtype=torch.float64)  # x0_pred = 3 / sqrt(ab_t), far outside [-1, 1]
    t = torch.tensor([500, 700])
    # DDPM clips x0 to [-1, 1] unless told otherwise.
    default = ddpm_step(schedule, x_t, eps, t, noise=torch.zeros_like(x_t))
    assert torch.equal(
        default, ddpm_step(schedule, x_t, eps, t, torch.zeros_like(x_t), clip_x0=1.0)
    )
    assert not torch.allclose(
        default, ddpm_step(schedule, x_t, eps, t, torch.zeros_like(x_t), clip_x0=2.0)
    )
    # DDIM is deterministic (eta = 0) unless told otherwise: no generator, no noise, same answer.
    torch.testing.assert_close(
        ddim_step(schedule, x_t, eps, t, t - 100),
        ddim_step(schedule, x_t, eps, t, t - 100, eta=0.0, noise=torch.ones_like(x_t)),
        rtol=0,
        atol=0,
    )
    # The default spacing is "leading" (diffusers' and SD v1's).
    assert torch.equal(ddim_timesteps(1000, 10), ddim_timesteps(1000, 10, "leading"))
    assert ddim_timesteps(1000, 10).tolist() == list(range(900, -1, -100))


@pytest.mark.parametrize("stepper", ["ddpm", "ddim"])
def test_noise_from_a_generator_is_the_noise_it_would_draw(stepper):
    schedule = NoiseSchedule("linear", num_timesteps=50)
    x_t, eps = _randn(*SHAPE, seed=0), _randn(*SHAPE, seed=1)
    t = torch.tensor([30, 40])

    def step(**kwargs):
        if stepper == "ddpm":
            return ddpm_step(schedule, x_t, eps, t, **kwargs)
        return ddim_step(schedule, x_t, eps, t, t - 10, eta=1.0, **kwargs)

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    drawn = step(generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(drawn, step(noise=noise), rtol=0, atol=0)
    assert not torch.allclose(drawn, step(noise=torch.zeros_like(noise)))


def test_steps_check_their_timesteps_against_the_batch():
    schedule = NoiseSchedule("linear", num_timesteps=10)
    x, eps = torch.zeros(SHAPE), torch.zeros(SHAPE)
    one = torch.tensor([5])  # shape (1,) broadcasts over a batch of 2 unless it is checked
    for call in (
        lambda: ddpm_step(schedule, x, eps, one),
        lambda: ddim_step(schedule, x, eps, one, 2),
        lambda: eps_from_v(eps, x, one, schedule),
    ):
        with pytest.raises(ValueError, match=r"shape \(2,\)"):
            call()


def test_ddim_step_rejects_bad_t_prev_clip_and_final_alpha():
    schedule = NoiseSchedule("linear", num_timesteps=10)
    x, eps = torch.zeros(SHAPE), torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="t_prev must be an integer"):
        ddim_step(schedule, x, eps, 3, 2.0)
    with pytest.raises(ValueError, match="t_prev must be an integer"):
        ddim_step(schedule, x, eps, torch.tensor([3, 4]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="clip_x0"):
        ddim_step(schedule, x, eps, 3, 2, clip_x0=0.0)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        ddim_step(schedule, x, eps, 3, -1, final_alpha_cumprod=1.5)
    ddim_step(schedule, x, eps, 3, -1, final_alpha_cumprod=1.0)  # 1 itself is allowed


def test_ddim_timesteps_bounds():
    assert ddim_timesteps(1, 1).tolist() == [0]  # a one-step schedule sampled in one step
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive int"):
        ddim_timesteps(1000.0, 10)
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive int"):
        ddim_timesteps(0, 1)
    with pytest.raises(ValueError, match="steps_offset must be a non-negative int"):
        ddim_timesteps(1000, 10, "leading", -1)


def test_sample_ddim_defaults_and_clipping_pass_through():
    schedule = NoiseSchedule("linear", num_timesteps=1000)
    x_T = 3 * _randn(*SHAPE, seed=0, dtype=torch.float32)
    seen = []
    sample_ddim(
        lambda x, t: torch.zeros_like(x), x_T, schedule, ddim_timesteps(T, 5), callback=seen.append
    )
    assert SamplerConfig().steps == 50 and SamplerConfig().sampler == "ddim"  # the defaults
    assert max(info["x0_pred"].abs().max().item() for info in seen) > 1.5
    clipped = []
    sample_ddim(
        lambda x, t: torch.zeros_like(x), x_T, schedule, ddim_timesteps(T, 5), clip_x0=1.0,
        callback=clipped.append,
    )  # fmt: skip
    assert max(info["x0_pred"].abs().max().item() for info in clipped) == 1.0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_callback_records_chain_from_step_to_step(sampler):
    schedule = NoiseSchedule("linear", num_timesteps=20)
    x_T = _randn(*SHAPE, seed=0, dtype=torch.float32)

    def eps_fn(x, t):
        return 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1)

    seen = []
    if sampler == "ddpm":
        out = sample_ddpm(
            eps_fn, x_T, schedule, ddpm_timesteps(20), generator=torch.Generator().manual_seed(0),
            callback=seen.append,
        )  # fmt: skip
    else:
        out = sample_ddim(eps_fn, x_T, schedule, ddim_timesteps(20, 5), callback=seen.append)
        assert [info["t_prev"] for info in seen] == [info["t"] for info in seen[1:]] + [-1]
    assert torch.equal(seen[0]["x_t"], x_T) and torch.equal(seen[-1]["x_prev"], out)
    for info, after in zip(seen, seen[1:], strict=False):
        assert torch.equal(info["x_prev"], after["x_t"])
    for info in seen:
        t_batch = torch.full((SHAPE[0],), info["t"], dtype=torch.long)
        assert torch.equal(info["eps"], eps_fn(info["x_t"], t_batch))


# ----- one way into sampling: the list of samplers, their timesteps, a frozen config -----------
def test_every_sampler_has_one_signature_and_a_name():
    schedule = NoiseSchedule("linear", num_timesteps=10)
    x_T = _randn(*SHAPE, seed=0, dtype=torch.float32)
    assert set(SAMPLERS) == {"ddim", "ddpm", "dpm++2m"}
    for name, sampler in SAMPLERS.items():
        config = SamplerConfig(name, 10 if name == "ddpm" else 6)  # DDPM takes all T
        seen = []
        g = torch.Generator().manual_seed(3)
        out = sampler(
            lambda x, t: 0.1 * x, x_T, schedule, config.timesteps(10), generator=g,
            callback=seen.append, progress=False, **config.options(),
        )  # fmt: skip
        again = config.sample(
            lambda x, t: 0.1 * x, x_T, schedule, generator=torch.Generator().manual_seed(3)
        )
        assert torch.equal(out, again) and len(seen) == config.steps
    assert SamplerConfig("ddim", 20, eta=0.5).name == "DDIM-20 eta=0.5"
    assert SamplerConfig("ddpm", 1000).name == "DDPM-1000"


def test_sd_v1_sampler_is_its_scheduler_config():
    cfg = DDIMScheduler.from_config(
        {**_diffusers_config("scaled_linear"), "steps_offset": 1, "set_alpha_to_one": False}
    )
    cfg.set_timesteps(50)
    assert SD_V1_SAMPLER.timesteps(1000).tolist() == cfg.timesteps.tolist()
    assert SD_V1_SAMPLER.timesteps(1000)[:2].tolist() == [981, 961]
    assert SD_V1_SAMPLER.final_alpha_cumprod is None and SD_V1_SAMPLER.clip_x0 is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        SD_V1_SAMPLER.steps = 20


def test_timesteps_are_checked_once_per_call():
    schedule = NoiseSchedule("linear", num_timesteps=10)
    x = torch.zeros(SHAPE)
    assert ddpm_timesteps(5).tolist() == [4, 3, 2, 1, 0]
    assert ddpm_timesteps(10, start=3).tolist() == [3, 2, 1, 0]  # begin part way (img2img)
    # a partly noised start is fine for both samplers
    sample_ddpm(lambda x, t: x, x, schedule, [3, 2, 1, 0])
    sample_ddim(lambda x, t: x, x, schedule, [6, 3])
    for bad, match in (
        ([2, 5], "strictly descending"),
        ([3, 3, 0], "strictly descending"),
        ([], "non-empty 1-D"),
        ([[3, 0]], "non-empty 1-D"),
        ([2.0, 0.0], "non-empty 1-D"),
        ([12, 0], r"\[0, 9\]"),
    ):
        with pytest.raises(ValueError, match=match):
            sample_ddim(lambda x, t: x, x, schedule, bad)
    with pytest.raises(ValueError, match="every timestep down to 0.*sample_ddim with eta=1"):
        sample_ddpm(lambda x, t: x, x, schedule, [9, 5, 0])
    with pytest.raises(ValueError, match="every timestep down to 0"):
        sample_ddpm(lambda x, t: x, x, schedule, [3, 2, 1])
    with pytest.raises(ValueError, match="DDPM runs all 10 steps"):
        SamplerConfig("ddpm", 5).timesteps(10)
    for kwargs, match in (
        ({"sampler": "euler"}, "ddim, ddpm"),
        ({"steps": 0}, "positive int"),
        ({"eta": -1.0}, "eta"),
        ({"spacing": "karras"}, "leading"),
        ({"steps_offset": -1}, "steps_offset"),
        ({"final_alpha_cumprod": 0.0}, "final_alpha_cumprod"),
        ({"clip_x0": 0.0}, "clip_x0"),
        ({"variance": "learned"}, "fixed_small"),
    ):
        with pytest.raises(ValueError, match=match):
            SamplerConfig(**kwargs)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_a_sampling_call_checks_its_timesteps_once(sampler, monkeypatch):
    schedule = NoiseSchedule("linear", num_timesteps=10)
    calls = []
    real = NoiseSchedule.check_timesteps
    monkeypatch.setattr(
        NoiseSchedule,
        "check_timesteps",
        lambda self, *a, **k: calls.append(1) or real(self, *a, **k),
    )
    x = torch.zeros(SHAPE)
    timesteps = ddpm_timesteps(10) if sampler == "ddpm" else ddim_timesteps(10, 5)
    SAMPLERS[sampler](lambda x, t: 0.1 * x, x, schedule, timesteps)
    assert len(calls) == 1  # the sequence, once; not again in every step
    # and the tables the steps read were copied to the device once, in float64 on the CPU
    table = schedule.table("alphas_cumprod", "cpu")
    assert table is schedule.table("alphas_cumprod", torch.device("cpu"))
    assert table.dtype == torch.float64 and torch.equal(table, schedule.alphas_cumprod)


# ----- DPM-Solver++(2M) ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, steps, spacing, offset",
    [("linear", 5, "linspace", 0), ("linear", 20, "linspace", 0), ("linear", 12, "trailing", 0),
     ("scaled_linear", 10, "leading", 1), ("scaled_linear", 25, "leading", 1)],
)  # fmt: skip
def test_dpm_solver_matches_diffusers_step_for_step(kind, steps, spacing, offset):
    from diffusers import DPMSolverMultistepScheduler

    from minisd.sampling import dpm_solver_timesteps, sample_dpm_solver

    schedule = NoiseSchedule(kind)
    ref = DPMSolverMultistepScheduler(
        **_diffusers_config(kind), algorithm_type="dpmsolver++", solver_order=2,
        timestep_spacing=spacing, steps_offset=offset,
    )  # fmt: skip
    ref.set_timesteps(steps)
    timesteps = dpm_solver_timesteps(T, steps, spacing, offset)
    assert timesteps.tolist() == ref.timesteps.tolist()
    w = _randn(*SHAPE, seed=5, dtype=torch.float32)

    def eps_fn(x, t):
        return torch.tanh(x * w) + t.view(-1, 1, 1, 1) / T

    x_T = _randn(*SHAPE, seed=6, dtype=torch.float32)
    ours = []
    got = sample_dpm_solver(eps_fn, x_T, schedule, timesteps,
                            callback=lambda info: ours.append(info["x_prev"]))  # fmt: skip
    x = x_T
    for i, t in enumerate(ref.timesteps):
        x = ref.step(eps_fn(x, t.repeat(len(x))), t, x).prev_sample
        torch.testing.assert_close(ours[i], x, rtol=1e-4, atol=1e-5)  # every step, not only the end
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-5)


def test_dpm_solver_of_order_one_is_ddim():
    from minisd.sampling import sample_dpm_solver

    schedule = NoiseSchedule("linear", num_timesteps=50)
    x_T = _randn(*SHAPE, seed=0)

    def eps_fn(x, t):
        return torch.sin(x) * (1 + t.view(-1, 1, 1, 1) / 50)

    ts = ddim_timesteps(50, 7, "trailing")
    first = sample_dpm_solver(eps_fn, x_T, schedule, ts, order=1)
    ddim = sample_ddim(eps_fn, x_T, schedule, ts, final_alpha_cumprod=1.0)
    torch.testing.assert_close(first, ddim, rtol=1e-10, atol=1e-10)
    second = sample_dpm_solver(eps_fn, x_T, schedule, ts)
    assert (second - first).abs().max() > 1e-3  # the second-order correction does something
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        sample_dpm_solver(eps_fn, x_T, schedule, ts, order=3)


def test_dpm_solver_with_oracle_eps_recovers_x0_in_few_steps():
    from minisd.sampling import SamplerConfig

    schedule = NoiseSchedule("linear")
    x0 = _randn(1, 1, 4, 4, seed=1).clamp(-1, 1)
    config = SamplerConfig("dpm++2m", 10, spacing="linspace")
    assert config.name == "DPM++2M-10" and len(config.timesteps(T)) == 10
    out = config.sample(_oracle_eps_fn(schedule, x0), _randn(1, 1, 4, 4, seed=2), schedule)
    torch.testing.assert_close(out, x0, rtol=1e-6, atol=1e-6)


def test_dpm_solver_timesteps_bounds():
    from minisd.sampling import dpm_solver_timesteps

    assert dpm_solver_timesteps(1000, 4).tolist() == [999, 749, 500, 250]  # no t = 0: x0 is last
    assert dpm_solver_timesteps(10, 9, "leading").tolist() == list(range(9, 0, -1))
    with pytest.raises(ValueError, match=r"\[1, 9\]"):
        dpm_solver_timesteps(10, 10)
