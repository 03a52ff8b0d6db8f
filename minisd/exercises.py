"""Checkers for the notebooks' exercises: each runs the student's answer against the library.

A checker prints one line and returns True (correct) or False (wrong or not attempted), so an
executed notebook records the verdict and `pytest --nbval` re-checks it on the grader's machine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minisd.schedule import NoiseSchedule

NOT_ATTEMPTED = "not attempted yet: replace `raise NotImplementedError` with your answer"


def _report(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{name}: {'correct' if ok else 'not yet'}" + (f" ({detail})" if detail else ""))
    return ok


def _attempt(name: str, fn: Callable, *args):
    """Call the student's function; (result, None) or (None, message) if it raised."""
    try:
        return fn(*args), None
    except NotImplementedError:
        return None, NOT_ATTEMPTED
    except Exception as err:  # a student's bug is feedback, not a crash of the notebook
        return None, f"your function raised {type(err).__name__}: {err}"


# ----- notebook 01: forward noising ------------------------------------------------------------
def check_alphas_cumprod(fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Exercise 01.1: fn(betas) -> alpha-bar, the running product of (1 - beta)."""
    name = "Exercise 1 (alpha-bar from betas)"
    for kind in ("linear", "cosine"):
        sched = NoiseSchedule(kind, 1000)
        got, err = _attempt(name, fn, sched.betas.clone())
        if err:
            return _report(name, False, err)
        got = torch.as_tensor(got, dtype=torch.float64)
        if got.shape != sched.alphas_cumprod.shape:
            return _report(
                name,
                False,
                f"expected shape {tuple(sched.alphas_cumprod.shape)}, got {tuple(got.shape)}",
            )
        if not torch.allclose(got, sched.alphas_cumprod, rtol=1e-4, atol=1e-6):
            worst = int((got - sched.alphas_cumprod).abs().argmax())
            return _report(
                name,
                False,
                f"{kind} schedule differs first badly at t={worst}; hint: torch.cumprod",
            )
    return _report(name, True)


def check_q_sample(fn: Callable[..., torch.Tensor]) -> bool:
    """Exercise 01.2: fn(x0, noise, t, alphas_cumprod) -> x_t, the closed form of q(x_t | x_0)."""
    name = "Exercise 2 (q_sample)"
    sched = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 250, 700, 999])
    want = sched.add_noise(x0, noise, t)
    got, err = _attempt(name, fn, x0, noise, t, sched.alphas_cumprod.float())
    if err:
        return _report(name, False, err)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return _report(name, False, f"expected a tensor of shape {tuple(want.shape)}, got {shape}")
    if not torch.allclose(got, want, atol=1e-5):
        per_item = (got - want).flatten(1).abs().amax(1)
        bad = t[per_item > 1e-5].tolist()
        return _report(
            name,
            False,
            f"wrong at t={bad}; hint: index alpha-bar by each item's t, reshape to (B, 1, 1, 1)",
        )
    return _report(name, True)


def check_snr_crossing(answer: int) -> bool:
    """Exercise 01.3: the first t at which the linear (DDPM) schedule's SNR drops below 1."""
    name = "Exercise 3 (where signal and noise are equal)"
    sched = NoiseSchedule("linear", 1000)
    snr = sched.snr(torch.arange(1000))
    want = int((snr < 1).nonzero()[0])
    if answer is None:
        return _report(name, False, "not attempted yet: set snr_crossing to your answer")
    if not isinstance(answer, int) or isinstance(answer, bool):
        return _report(name, False, f"answer with an int timestep, got {type(answer).__name__}")
    if answer == want:
        return _report(name, True, f"SNR({answer}) = {snr[answer].item():.3f}")
    direction = "later" if answer < want else "earlier"
    return _report(
        name, False, f"at t={answer} the SNR is {snr[answer].item():.3f}; look {direction}"
    )


# ----- notebook 02: the U-Net, training and sampling -------------------------------------------
def check_timestep_embedding(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> bool:
    """Exercise 02.1: fn(t, dim) -> (B, dim) sinusoidal features, cos half first (as ldm)."""
    from minisd.unet import timestep_embedding

    name = "Exercise 1 (timestep embedding)"
    t = torch.tensor([0, 1, 10, 500, 999])
    want = timestep_embedding(t, 32)
    got, err = _attempt(name, fn, t, 32)
    if err:
        return _report(name, False, err)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return _report(name, False, f"expected shape {tuple(want.shape)}, got {shape}")
    if torch.allclose(got, want.roll(16, dims=1), atol=1e-5):
        return _report(name, False, "sin and cos halves are swapped: ldm puts cos first")
    if not torch.allclose(got, want, atol=1e-5):
        return _report(
            name, False, "hint: freqs = exp(-log(10000) * arange(dim // 2) / (dim // 2))"
        )
    return _report(name, True)


def check_ddpm_loss(fn: Callable[..., torch.Tensor]) -> bool:
    """Exercise 02.2: fn(model, x0, t, noise, alphas_cumprod) -> the scalar DDPM loss."""
    name = "Exercise 2 (the training loss)"
    sched = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([3, 100, 600, 990])
    weight = torch.randn(1, generator=g)

    def model(x_t, t):  # any function of (x_t, t) will do for checking the loss
        return weight * x_t + t.float().reshape(-1, 1, 1, 1) / 1000

    want = torch.mean((model(sched.add_noise(x0, noise, t), t) - noise) ** 2)
    got, err = _attempt(name, fn, model, x0, t, noise, sched.alphas_cumprod.float())
    if err:
        return _report(name, False, err)
    got = torch.as_tensor(got)
    if got.numel() != 1:
        return _report(name, False, f"return one number (the mean), got shape {tuple(got.shape)}")
    if not torch.allclose(got.float(), want, rtol=1e-4, atol=1e-6):
        return _report(
            name, False, "hint: noise x0 to x_t, ask the model for eps, mean squared error"
        )
    return _report(name, True)


def check_ddim_step(fn: Callable[..., torch.Tensor]) -> bool:
    """Exercise 02.3: fn(x_t, eps, ab_t, ab_prev) -> x_prev, one deterministic DDIM step."""
    from minisd.sampling import ddim_step

    name = "Exercise 3 (a DDIM step)"
    sched = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(2)
    x_t, eps = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    for t, t_prev in [(999, 979), (500, 480), (40, 20)]:
        want = ddim_step(sched, x_t, eps, t, t_prev, eta=0.0)
        ab_t, ab_prev = sched.alphas_cumprod[t].item(), sched.alphas_cumprod[t_prev].item()
        got, err = _attempt(name, fn, x_t, eps, ab_t, ab_prev)
        if err:
            return _report(name, False, err)
        if not isinstance(got, torch.Tensor) or not torch.allclose(got, want, atol=1e-4):
            return _report(
                name,
                False,
                f"wrong at t={t}; hint: predict x0, then re-noise it to ab_prev with eps",
            )
    return _report(name, True)


# ----- notebook 03: the autoencoder and latent space -------------------------------------------
def check_reparameterize(fn: Callable[..., torch.Tensor]) -> bool:
    """Exercise 03.1: fn(mean, logvar, eps) -> z = mean + std * eps, std from the log-variance."""
    name = "Exercise 1 (the reparameterisation trick)"
    g = torch.Generator().manual_seed(3)
    mean, logvar, eps = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    want = mean + torch.exp(0.5 * logvar) * eps
    got, err = _attempt(name, fn, mean, logvar, eps)
    if err:
        return _report(name, False, err)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return _report(name, False, f"return a tensor shaped like mean, {tuple(want.shape)}")
    if torch.allclose(got, mean + torch.exp(logvar) * eps, atol=1e-5):
        return _report(name, False, "that scales eps by the variance; std = exp(logvar / 2)")
    if not torch.allclose(got, want, atol=1e-5):
        return _report(name, False, "hint: z = mean + exp(0.5 * logvar) * eps")
    return _report(name, True)


def check_gaussian_kl(fn: Callable[..., torch.Tensor]) -> bool:
    """Exercise 03.2: fn(mean, logvar) -> KL(N(mean, exp(logvar)) || N(0, I)) per sample, (B,)."""
    from minisd.vae import DiagonalGaussianDistribution

    name = "Exercise 2 (KL to the standard normal)"
    g = torch.Generator().manual_seed(4)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    want = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).kl()
    got, err = _attempt(name, fn, mean, logvar)
    if err:
        return _report(name, False, err)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return _report(name, False, f"one KL per sample: expected shape (3,), got {shape}")
    if not torch.allclose(got, want, rtol=1e-4):
        return _report(
            name, False, "hint: 0.5 * (mean^2 + exp(logvar) - 1 - logvar), summed over C, H, W"
        )
    return _report(name, True)


def check_scale_factor(fn: Callable[[torch.Tensor], float]) -> bool:
    """Exercise 03.3: fn(latents) -> the factor that gives the latents unit standard deviation."""
    name = "Exercise 3 (the latent scale factor)"
    latents = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(5)) * 5.5 + 0.3
    want = 1.0 / latents.flatten().std().item()
    got, err = _attempt(name, fn, latents)
    if err:
        return _report(name, False, err)
    try:
        got = float(got)
    except (TypeError, ValueError):
        return _report(name, False, f"return one number, got {type(got).__name__}")
    if abs(got - 1 / want) < 1e-3 * (1 / want):
        return _report(name, False, "that is the std itself; the factor multiplies the latents")
    if abs(got - want) > 1e-3 * want:
        return _report(name, False, "hint: one std over all values of all latents, then 1 / it")
    return _report(name, True)
