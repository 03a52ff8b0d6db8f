"""Noise schedules: parity with diffusers' DDPMScheduler, invariants of q(x_t | x_0), bad inputs."""

import pytest
import torch
from diffusers import DDPMScheduler

from minisd.schedule import DIFFUSERS_NAMES, SCHEDULE_KINDS, NoiseSchedule, make_betas

# The published beta ranges, written here rather than read from the library, so a changed
# default fails the parity tests: DDPM (Ho et al. 2020, sec. 4: 1e-4 to 0.02 over T = 1000),
# Stable Diffusion v1's config (0.00085 to 0.012), and diffusers' defaults for the sigmoid.
PUBLISHED_BETA_RANGE = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "sigmoid": (1e-4, 0.02),
}


def diffusers_ref(kind: str, T: int = 1000, zero_snr: bool = False) -> DDPMScheduler:
    kwargs = {}
    if kind != "cosine":
        kwargs = dict(zip(("beta_start", "beta_end"), PUBLISHED_BETA_RANGE[kind], strict=True))
    return DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=DIFFUSERS_NAMES[kind],
        rescale_betas_zero_snr=zero_snr,
        **kwargs,
    )


def test_ddpm_linear_schedule_is_the_papers():
    s = NoiseSchedule("linear")  # no arguments: the defaults must be DDPM's
    assert s.num_timesteps == 1000
    assert (s.betas[0].item(), s.betas[-1].item()) == (1e-4, 0.02)
    # alpha-bar_T of DDPM's schedule: prod(1 - beta_t), computed here in plain Python
    ab_T = 1.0
    for i in range(1000):
        ab_T *= 1 - (1e-4 + i * (0.02 - 1e-4) / 999)
    assert ab_T == pytest.approx(4.0358e-05, rel=1e-4)
    assert s.alphas_cumprod[-1].item() == pytest.approx(ab_T, rel=1e-9)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_alphas_cumprod_and_add_noise_match_diffusers(kind, zero_snr):
    ref = diffusers_ref(kind, 1000, zero_snr)
    ours = NoiseSchedule(kind, 1000, zero_terminal_snr=zero_snr)
    # betas near the end of a zero-SNR schedule are a ratio of nearly equal float32 numbers in
    # diffusers, so they carry ~1e-5 relative round-off there; alpha-bar is what matters.
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-6
    )
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    # diffusers noises in float32, whose round-off near t = T depends on the CPU's vector
    # instructions (3.4e-5 seen on an AMD EPYC); a wrong coefficient would be off by >1e-3.
    torch.testing.assert_close(
        ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-4
    )


def test_scaled_linear_is_stable_diffusions_schedule():
    # SD v1: linear in sqrt(beta) from 0.00085 to 0.012, so alpha-bar_T is about 0.0047.
    s = NoiseSchedule("scaled_linear")
    assert s.betas[0].item() == pytest.approx(0.00085)
    assert s.betas[-1].item() == pytest.approx(0.012)
    assert s.betas.sqrt().diff().std() < 1e-12  # equal steps in sqrt(beta)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=1e-4)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_tables_are_consistent(kind):
    s = NoiseSchedule(kind, 200)
    assert s.num_timesteps == 200
    torch.testing.assert_close(s.alphas, 1 - s.betas)
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(s.alphas, 0))
    assert (s.alphas_cumprod.diff() < 0).all()  # noise only ever grows
    t = torch.arange(200)
    torch.testing.assert_close(s.snr(t), s.alphas_cumprod / (1 - s.alphas_cumprod))
    assert (s.log_snr(t).diff() < 0).all()


def test_zero_terminal_snr_ends_in_pure_noise():
    s = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    assert s.alphas_cumprod[-1].item() == 0.0
    assert s.snr(999).item() == 0.0
    x0, noise = torch.ones(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    torch.testing.assert_close(s.add_noise(x0, noise, 999), noise)


def test_add_noise_moments_and_step_by_step_agree():
    # Noising T steps one at a time (eq. 2) and jumping there in one go (eq. 4) give the same law.
    s = NoiseSchedule("linear", 100)
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((20000, 1), 0.7)
    t = 60
    x = x0
    for step in range(t + 1):
        x = s.add_noise_step(x, torch.randn(x.shape, generator=g), step)
    direct = s.add_noise(x0, torch.randn(x0.shape, generator=g), torch.full((20000,), t))
    ab = s.alphas_cumprod[t].item()
    for sample in (x, direct):
        assert sample.mean().item() == pytest.approx(ab**0.5 * 0.7, abs=0.02)
        assert sample.var().item() == pytest.approx(1 - ab, abs=0.03)


def test_posterior_matches_diffusers_fixed_small_variance():
    s = NoiseSchedule("linear", 1000)
    ref = diffusers_ref("linear")
    t = torch.tensor([1, 10, 500, 999])
    g = torch.Generator().manual_seed(2)
    x0, x_t = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    mean, var = s.posterior_mean_variance(x0, x_t, t)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # DDPM's, built independently
    for i, ti in enumerate(t.tolist()):
        beta, ab, ab_prev = betas[ti], (1 - betas[: ti + 1]).prod(), (1 - betas[:ti]).prod()
        coef_x0 = ab_prev.sqrt() * beta / (1 - ab)  # DDPM eq. 7
        coef_xt = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        torch.testing.assert_close(mean[i], (coef_x0 * x0[i] + coef_xt * x_t[i]).float())
        beta_tilde = beta * (1 - ab_prev) / (1 - ab)
        torch.testing.assert_close(var[i].flatten()[0], beta_tilde.float())
        # diffusers derives beta from a ratio of float32 alpha-bars: ~1e-4 relative round-off
        torch.testing.assert_close(var[i].flatten()[0], ref._get_variance(ti), rtol=1e-3, atol=1e-9)


def test_predict_x0_inverts_add_noise_and_velocity_is_consistent():
    s = NoiseSchedule("cosine", 1000)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 400, 900])
    x_t = s.add_noise(x0, noise, t)
    torch.testing.assert_close(s.predict_x0(x_t, noise, t), x0, rtol=1e-4, atol=1e-4)
    ref = diffusers_ref("cosine")
    torch.testing.assert_close(
        s.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5
    )


def test_from_betas_round_trip():
    betas = make_betas("linear", 50)
    s = NoiseSchedule.from_betas(betas.tolist())
    torch.testing.assert_close(s.alphas_cumprod, NoiseSchedule("linear", 50).alphas_cumprod)
    assert "custom" in repr(s)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "quadratic"}, "linear, scaled_linear, cosine, sigmoid"),
        ({"kind": "linear", "num_timesteps": 1}, "num_timesteps"),
        ({"kind": "linear", "beta_start": 0.0}, r"\(0, 1\)"),
        ({"kind": "linear", "beta_end": 1.5}, r"\(0, 1\)"),
        ({"kind": "cosine", "beta_start": 0.1}, "no beta range"),
    ],
)
def test_bad_schedule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kwargs)


def test_bad_betas():
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule.from_betas([0.1, -0.2, 0.3])
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule.from_betas([[0.1, 0.2]])


def test_bad_timesteps_and_shapes():
    s = NoiseSchedule("linear", 10)
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 9\].*got range \[0, 10\]"):
        s.add_noise(x0, torch.zeros_like(x0), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        s.snr(-1)
    with pytest.raises(ValueError, match="integers"):
        s.add_noise(x0, torch.zeros_like(x0), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        s.add_noise(x0, torch.zeros_like(x0), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="noise must have the shape"):
        s.add_noise(x0, torch.zeros(2, 1, 4, 5), 3)
    with pytest.raises(ValueError, match="one shape"):
        s.posterior_mean_variance(x0, torch.zeros(2, 1, 3, 3), 1)


def test_dtype_and_scalar_timestep():
    s = NoiseSchedule("linear", 10)
    x0 = torch.zeros(2, 1, 4, 4, dtype=torch.float16)
    out = s.add_noise(x0, torch.ones_like(x0), 9)
    assert out.dtype == torch.float16
    assert torch.allclose(
        out.float(),
        torch.full_like(out.float(), (1 - s.alphas_cumprod[9].item()) ** 0.5),
        atol=1e-3,
    )


# ----- the contract, edge by edge: defaults, bounds, dtypes, shapes ---------------------------
def test_defaults_are_ddpms_linear_schedule_in_float64():
    assert make_betas("linear").shape == (1000,)
    s = NoiseSchedule()
    assert s.kind == "linear" and s.zero_terminal_snr is False
    torch.testing.assert_close(s.betas, NoiseSchedule("linear", 1000).betas, rtol=0, atol=0)
    for kind in SCHEDULE_KINDS:
        assert make_betas(kind, 10).dtype == torch.float64, kind
    assert NoiseSchedule("linear", 10, zero_terminal_snr=True).zero_terminal_snr is True


def test_the_shortest_schedule_has_two_steps():
    assert make_betas("linear", 2).tolist() == [1e-4, 0.02]
    s = NoiseSchedule.from_betas([0.1, 0.2])
    assert s.num_timesteps == 2 and s.zero_terminal_snr is False
    with pytest.raises(ValueError, match=">= 2 values"):
        NoiseSchedule.from_betas([0.1])


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "sigmoid"])
@pytest.mark.parametrize(
    "start, end", [(0.0, 0.02), (1.0, 0.02), (1.5, 0.02), (1e-4, 0.0), (1e-4, 1.0), (1e-4, 1.5)]
)
def test_make_betas_rejects_a_range_outside_zero_one(kind, start, end):
    # make_betas itself must refuse: a range ending at 1 (or starting at 0) gives betas that
    # NoiseSchedule's later check could mistake for a zero-terminal-SNR schedule.
    with pytest.raises(ValueError, match=r"beta_start and beta_end must lie in \(0, 1\)"):
        make_betas(kind, 10, start, end)


@pytest.mark.parametrize(
    "betas",
    [
        [0.0, 0.1, 0.2],  # zero first
        [0.1, 0.0, 0.2],  # zero inside
        [0.1, 0.2, 0.0],  # zero last
        [0.1, 1.0, 0.2],  # 1 before the last step: alpha-bar vanishes mid-schedule
        [1.0, 0.1, 0.2],
        [0.1, 1.5, 0.2],
        [0.1, 0.2, 1.5],  # above 1 at the last step
        [0.1, 0.2, float("nan")],
    ],
)
def test_from_betas_rejects_betas_outside_the_unit_interval(betas):
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        NoiseSchedule.from_betas(betas)


def test_from_betas_recognises_a_zero_terminal_snr_schedule():
    zt = NoiseSchedule.from_betas([0.1, 0.2, 1.0])
    assert zt.zero_terminal_snr is True and zt.alphas_cumprod[-1].item() == 0.0
    assert NoiseSchedule.from_betas([0.1, 1.0 - 1e-9, 0.5]).zero_terminal_snr is False
    assert NoiseSchedule.from_betas([0.1, 0.2, 0.3]).zero_terminal_snr is False


def test_timesteps_must_be_integer_scalars_or_one_per_sample():
    s = NoiseSchedule("linear", 10)
    with pytest.raises(ValueError, match="integers"):
        s.snr(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="scalar or 1-D"):
        s.snr(torch.zeros(2, 2, dtype=torch.long))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    # t of shape (1,) would broadcast over the batch silently; (3,) would not fit.
    for t in (torch.tensor([4]), torch.tensor([1, 2, 3])):
        for call in (
            lambda t=t: s.add_noise(x, noise, t),
            lambda t=t: s.add_noise_step(x, noise, t),
            lambda t=t: s.velocity(x, noise, t),
            lambda t=t: s.predict_x0(x, noise, t),
            lambda t=t: s.posterior_mean_variance(x, noise, t),
        ):
            with pytest.raises(ValueError, match=r"shape \(2,\)"):
                call()


def test_forward_step_and_closed_form_against_the_formulas():
    s = NoiseSchedule("linear", 10)
    # Batch 2 with 3 channels, so a batch read from the wrong axis cannot fit.
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([3, 7])
    beta = torch.tensor([1e-4 + 3 * (0.02 - 1e-4) / 9, 1e-4 + 7 * (0.02 - 1e-4) / 9])
    want = (1 - beta).sqrt().view(2, 1, 1, 1) * x + beta.sqrt().view(2, 1, 1, 1) * noise
    torch.testing.assert_close(s.add_noise_step(x, noise, t), want.double())
    # x0 of shape (B,): one number per sample is still a batch.
    x1, n1 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 0.0, -1.0])
    ab = s.alphas_cumprod[torch.tensor([0, 5, 9])].float()
    torch.testing.assert_close(
        s.add_noise(x1, n1, torch.tensor([0, 5, 9])), ab.sqrt() * x1 + (1 - ab).sqrt() * n1
    )
    with pytest.raises(ValueError, match="batch dimension"):
        s.add_noise(torch.tensor(1.0), torch.tensor(0.0), 0)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_a_schedule_is_rebuilt_from_its_dict(kind, zero_snr):
    s = NoiseSchedule(kind, 50, zero_terminal_snr=zero_snr)
    d = s.to_dict()
    assert d["beta_start"] == (None if kind == "cosine" else PUBLISHED_BETA_RANGE[kind][0])
    rebuilt = NoiseSchedule.from_dict(d)
    assert (rebuilt.kind, rebuilt.zero_terminal_snr) == (kind, zero_snr)
    torch.testing.assert_close(rebuilt.betas, s.betas, rtol=0, atol=0)


def test_a_custom_schedule_is_rebuilt_from_its_betas():
    s = NoiseSchedule.from_betas([0.1, 0.2, 1.0])
    rebuilt = NoiseSchedule.from_dict(s.to_dict())
    assert rebuilt.kind == "custom" and rebuilt.zero_terminal_snr
    torch.testing.assert_close(rebuilt.betas, s.betas, rtol=0, atol=0)
