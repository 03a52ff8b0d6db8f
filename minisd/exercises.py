"""Checkers for the notebooks' exercises: each runs the student's answer against the library.

A checker shows one line and returns True (correct) or False (wrong or not attempted), so an
executed notebook records the verdict and `pytest --nbval` re-checks it on the grader's machine.
In a notebook the line also carries a machine-readable record (`VERDICT_MIME`: the exercise's id,
its notebook and the verdict), which `python -m minisd grade` reads (minisd.grading).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minisd.schedule import NoiseSchedule

UNANSWERED = "not attempted yet"  # every "not attempted" message starts so: the verdict "not yet"
NOT_ATTEMPTED = f"{UNANSWERED}: replace `raise NotImplementedError` with your answer"
# The record's MIME type: front-ends show the text/plain line beside it, nbval compares both.
VERDICT_MIME = "application/vnd.minisd.verdict+json"
VERDICTS = ("correct", "wrong", "not yet")


@dataclass(frozen=True)
class Exercise:
    """One exercise: its stable id ("01.2": notebook 01, exercise 2) and the title it prints."""

    id: str
    title: str

    @property
    def notebook(self) -> str:
        return self.id.split(".")[0]

    def __str__(self) -> str:
        return f"Exercise {self.id.split('.')[1]} ({self.title})"


def verdict_record(exercise: Exercise, ok: bool, detail: str = "") -> dict[str, str]:
    """The machine-readable verdict: correct, wrong (attempted) or not yet (not attempted)."""
    verdict = "correct" if ok else "not yet" if detail.startswith(UNANSWERED) else "wrong"
    return {"exercise": exercise.id, "notebook": exercise.notebook, "verdict": verdict}


def _report(name: Exercise, ok: bool, detail: str = "") -> bool:
    """The checkers' one way out: the verdict line, and in IPython its record beside it."""
    line = f"{name}: {'correct' if ok else 'not yet'}" + (f" ({detail})" if detail else "")
    shell = _ipython()
    if shell is None:
        print(line)
    else:
        from IPython.display import display

        display({"text/plain": line, VERDICT_MIME: verdict_record(name, ok, detail)}, raw=True)
    return ok


def _ipython():
    """The running IPython shell (a notebook's kernel), or None in plain Python."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _attempt(name: str, fn: Callable, *args):
    """Call the student's function; (result, None) or (None, message) if it raised."""
    try:
        return fn(*args), None
    except NotImplementedError:
        return None, NOT_ATTEMPTED
    except Exception as err:  # a student's bug is feedback, not a crash of the notebook
        return None, f"your function raised {type(err).__name__}: {err}"


def _number(name: str, answer, variable: str) -> tuple[float | None, str | None]:
    """A predicted number as a float, or (None, why not) for a missing or non-numeric answer."""
    if answer is None:
        return None, f"{UNANSWERED}: set {variable} to your answer"
    try:
        return float(answer), None
    except (TypeError, ValueError):
        return None, f"answer with a number, got {type(answer).__name__}"


def _integer(answer, variable: str, what: str = "an int") -> str | None:
    """Why an int answer cannot be checked (missing, or not an int), or None if it can."""
    if answer is None:
        return f"{UNANSWERED}: set {variable} to your answer"
    if not isinstance(answer, int) or isinstance(answer, bool):
        return f"answer with {what}, got {type(answer).__name__}"
    return None


# ----- notebook 01: forward noising ------------------------------------------------------------
def check_alphas_cumprod(fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Exercise 01.1: fn(betas) -> alpha-bar, the running product of (1 - beta)."""
    name = Exercise("01.1", "alpha-bar from betas")
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
    name = Exercise("01.2", "q_sample")
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
    name = Exercise("01.3", "where signal and noise are equal")
    sched = NoiseSchedule("linear", 1000)
    snr = sched.snr(torch.arange(1000))
    want = int((snr < 1).nonzero()[0])
    err = _integer(answer, "snr_crossing", "an int timestep")
    if err:
        return _report(name, False, err)
    if not 0 <= answer < len(snr):
        return _report(name, False, f"t runs from 0 to {len(snr) - 1}, got {answer}")
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

    name = Exercise("02.1", "timestep embedding")
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
    name = Exercise("02.2", "the training loss")
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

    name = Exercise("02.3", "a DDIM step")
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


def check_untrained_loss(answer: float | None) -> bool:
    """Exercise 02.4 (predict, then check): the DDPM loss of a network that always outputs 0."""
    name = Exercise("02.4", "the loss before training")
    answer, err = _number(name, answer, "untrained_loss")
    if err:
        return _report(name, False, err)
    # measured, not assumed: zero predictions at every t, on data of any scale
    sched = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(6)
    losses = []
    for t in (0, 500, 999):
        x0 = 3 * torch.rand(256, 1, 8, 8, generator=g) - 1.5
        noise = torch.randn(x0.shape, generator=g)
        sched.add_noise(x0, noise, t)  # what the network would see; it ignores it
        losses.append(((0 * x0 - noise) ** 2).mean().item())
    if abs(answer - 1.0) > 0.05:
        return _report(
            name,
            False,
            f"measured {', '.join(f'{v:.3f}' for v in losses)} at t = 0, 500, 999; "
            "what is the mean square of a standard normal?",
        )
    return _report(name, True, "E[eps^2] = 1 whatever t and x0 are: the target is the noise")


def check_snr_multiplier(answer: float | None) -> bool:
    """Exercise 03.4 (reason, then check): how unscaled latents of std 5.5 change SNR(t)."""
    name = Exercise("03.4", "SNR of unscaled latents")
    answer, err = _number(name, answer, "snr_multiplier")
    if err:
        return _report(name, False, err)
    sched = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(4096, generator=g, dtype=torch.float64)
    z = z / z.std()  # unit variance exactly, so the measured ratio is the answer's
    t = torch.tensor([100, 400, 800])
    ab = sched.alphas_cumprod[t]
    # signal-to-noise ratio of x_t = sqrt(ab) x0 + sqrt(1 - ab) eps: signal power over noise's
    measured = ((ab * (5.5 * z).var()) / (ab * z.var())).mean().item()
    if abs(answer - measured) > 0.01 * measured:
        hint = "the std itself?" if abs(answer - 5.5) < 0.1 else "think of variances"
        return _report(name, False, f"not that ({hint}); SNR is signal power / noise power")
    return _report(name, True, f"x{measured:.2f} at every t: the variance 5.5^2 multiplies SNR")


# ----- notebook 03: the autoencoder and latent space -------------------------------------------
def check_reparameterize(fn: Callable[..., torch.Tensor]) -> bool:
    """Exercise 03.1: fn(mean, logvar, eps) -> z = mean + std * eps, std from the log-variance."""
    name = Exercise("03.1", "the reparameterisation trick")
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

    name = Exercise("03.2", "KL to the standard normal")
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
    name = Exercise("03.3", "the latent scale factor")
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


# ----- solutions a student can reveal -----------------------------------------------------------
# Each: (what it defines, the checker it passes, the code, why). `solution("02.3")` prints one;
# tests/test_exercises.py runs every one through its checker.
# ----- notebook 04: cross-attention and text ---------------------------------------------------
def check_cross_attention(fn: Callable[..., torch.Tensor]) -> bool:
    """Exercise 04.1: fn(attn, x, context) -> attn(x, context), from to_q/to_k/to_v/to_out."""
    from minisd.attention import CrossAttention

    name = Exercise("04.1", "cross-attention by hand")
    torch.manual_seed(4)
    attn = CrossAttention(16, 12, heads=2, dim_head=8).eval()
    g = torch.Generator().manual_seed(4)
    x, context = torch.randn(2, 5, 16, generator=g), torch.randn(2, 7, 12, generator=g)
    with torch.no_grad():
        want = attn(x, context)
        got, err = _attempt(name, fn, attn, x, context)
    if err:
        return _report(name, False, err)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return _report(name, False, f"return a tensor shaped like x, {tuple(want.shape)}")
    if torch.allclose(got, want, atol=1e-5):
        return _report(name, True, "softmax(q k^T / sqrt(d)) v per head, then to_out")
    # the usual slips, each with its own hint
    one_head = CrossAttention(16, 12, heads=1, dim_head=16).eval()
    one_head.load_state_dict(attn.state_dict())
    with torch.no_grad():
        if torch.allclose(got, one_head(x, context), atol=1e-5):
            return _report(name, False, "that is one head of 16; split into attn.heads heads of 8")
    return _report(name, False, "hint: q from x, k and v from context; scale by 1/sqrt(8)")


def check_uniform_attention(answer: float | None) -> bool:
    """Exercise 04.2 (predict, then check): the weight on each kept token when all keys agree."""
    from minisd.attention import CrossAttention, record_attention

    name = Exercise("04.2", "attention over identical tokens")
    answer, err = _number(name, answer, "weight_per_token")
    if err:
        return _report(name, False, err)
    torch.manual_seed(5)
    block = torch.nn.Module()
    block.attn2 = CrossAttention(16, 12, heads=2, dim_head=8).eval()
    x = torch.randn(1, 4, 16)
    context = torch.randn(1, 1, 12).expand(1, 16, 12)  # 16 copies of one token
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, :5] = True  # 5 real tokens, 11 padding
    with torch.no_grad(), record_attention(block) as rec:
        block.attn2(x, context, keep)
    measured = rec.maps[0].probs[0, :, :, 0].mean().item()
    if abs(answer - measured) > 1e-3:
        hint = "padding gets no weight" if abs(answer - 1 / 16) < 1e-3 else "equal scores..."
        return _report(name, False, f"not that ({hint}); what does softmax do to equal scores?")
    return _report(name, True, f"{measured:.3f}: equal scores share the weight evenly, 1/5 each")


def check_clip_padding(answer: int | None) -> bool:
    """Exercise 04.3: how many of CLIP's 77 positions are padding for one caption."""
    from minisd.text import clip_tokenizer

    name = Exercise("04.3", "CLIP's 77 positions")
    prompt = "a handwritten digit seven"
    ids = clip_tokenizer()(prompt)["input_ids"]  # start, the words' pieces, end
    want = 77 - len(ids)
    err = _integer(answer, "clip_padding")
    if err:
        return _report(name, False, err)
    if answer == want:
        return _report(name, True, f"{len(ids)} real tokens (start and end included), {want} pad")
    if answer == want + 2:
        return _report(name, False, "the start and end tokens are real tokens too")
    return _report(name, False, "tokenize it and count: each word here is one BPE piece")


# ----- notebook 05: guidance --------------------------------------------------------------------
def check_guidance(fn: Callable[..., torch.Tensor]) -> bool:
    """Exercise 05.1: fn(eps_u, eps_c, s) -> the classifier-free guided noise prediction."""
    name = Exercise("05.1", "classifier-free guidance")
    g = torch.Generator().manual_seed(6)
    eps_u, eps_c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for s in (3.0, 7.5, 0.0, 1.0):  # the telling scales first: at 0 and 1 some slips agree
        got, err = _attempt(name, fn, eps_u, eps_c, s)
        if err:
            return _report(name, False, err)
        if not isinstance(got, torch.Tensor) or got.shape != eps_u.shape:
            return _report(name, False, f"return a tensor shaped like eps_u, {tuple(eps_u.shape)}")
        if torch.allclose(got, eps_u + s * (eps_c - eps_u), atol=1e-5):
            continue
        if torch.allclose(got, eps_c + s * (eps_u - eps_c), atol=1e-5):
            return _report(name, False, "the roles are swapped: start from the unconditional one")
        if torch.allclose(got, (1 + s) * eps_c - s * eps_u, atol=1e-5):
            return _report(name, False, "that is Ho & Salimans' form with w = s; SD's s is 1 + w")
        return _report(name, False, f"at s = {s:g}: hint, s = 1 must give eps_c, s = 0 eps_u")
    return _report(name, True, "eps_u + s (eps_c - eps_u): s = 0 unconditional, 1 conditional")


def check_weight_to_scale(answer: float | None) -> bool:
    """Exercise 05.2 (predict, then check): the SD scale that equals guidance weight w = 2."""
    name = Exercise("05.2", "from a guidance weight to a guidance scale")
    answer, err = _number(name, answer, "scale")
    if err:
        return _report(name, False, err)
    if abs(answer - 3.0) < 1e-9:
        return _report(name, True, "(1 + w) eps_c - w eps_u = eps_u + (1 + w)(eps_c - eps_u)")
    if abs(answer - 2.0) < 1e-9:
        return _report(name, False, "the two conventions differ: expand both and compare")
    return _report(name, False, "write (1 + w) eps_c - w eps_u as eps_u + s (eps_c - eps_u)")


def check_guided_evaluations(answer: int | None) -> bool:
    """Exercise 05.3: U-Net evaluations per image for DPM-Solver++(2M), 20 steps, scale 3."""
    name = Exercise("05.3", "what guidance costs")
    err = _integer(answer, "evaluations")
    if err:
        return _report(name, False, err)
    if answer == 40:
        return _report(name, True, "two predictions per step (one batch of 2B), 20 steps")
    if answer == 20:
        return _report(name, False, "guidance needs eps_c and eps_u at every step")
    if answer == 60:
        return _report(name, False, "a multistep solver reuses its last x0: one step, one call")
    return _report(name, False, "count the network calls per step, then the steps")


# ----- notebook 06: Stable Diffusion and its applications --------------------------------------
def check_img2img_calls(answer: int | None) -> bool:
    """Exercise 06.1: U-Net evaluations of SD img2img, DDIM-50, strength 0.6, guidance 7.5."""
    name = Exercise("06.1", "what image-to-image costs")
    err = _integer(answer, "evaluations")
    if err:
        return _report(name, False, err)
    if answer == 60:
        return _report(name, True, "round(0.6 x 50) = 30 steps, two predictions each")
    if answer == 30:
        return _report(name, False, "guidance needs the unconditional prediction too")
    if answer == 100:
        return _report(name, False, "the strength decides how many of the 50 steps run")
    if answer in (20, 40):
        return _report(name, False, "strength is the share of steps that run, not that is skipped")
    return _report(name, False, "count the steps that run, then the predictions per step")


def check_latent_mask(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> bool:
    """Exercise 06.2: fn(mask, factor) -> the mask at latent resolution (any pixel -> cell)."""
    import torch.nn.functional as F

    name = Exercise("06.2", "the mask on the latent grid")
    g = torch.Generator().manual_seed(3)
    for factor, side in ((8, 64), (4, 32)):
        mask = (torch.rand(3, 1, side, side, generator=g) < 0.02).float()
        mask[0, 0, :, : side // 2] = 1
        got, err = _attempt(name, fn, mask.clone(), factor)
        if err:
            return _report(name, False, err)
        want = F.max_pool2d(mask, factor)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return _report(name, False, f"return a tensor of shape {tuple(want.shape)}")
        if torch.equal(got.float(), want):
            continue
        if torch.allclose(got.float(), F.avg_pool2d(mask, factor)):
            return _report(name, False, "a cell with one hidden pixel must be filled: not the mean")
        if torch.equal(got.float(), (F.avg_pool2d(mask, factor) == 1).float()):
            return _report(name, False, "that fills only wholly hidden cells; one pixel is enough")
        return _report(name, False, "hint: the largest value in each factor x factor cell")
    return _report(name, True, "max-pooling: a cell is filled if any of its pixels is")


def check_upscaling_psnr(answer: str | None) -> bool:
    """Exercise 06.3 (reasoning): why the upscaler stays below the autoencoder's PSNR."""
    name = Exercise("06.3", "what an upscaler can know")
    if answer is None:
        return _report(name, False, f"{UNANSWERED}: set answer to one of 'a', 'b', 'c', 'd'")
    if not isinstance(answer, str) or answer.strip().lower() not in ("a", "b", "c", "d"):
        return _report(name, False, f"answer with one letter, 'a' to 'd', got {answer!r}")
    why = {
        "a": "the ceiling row decodes through the same autoencoder and reaches it",
        "b": "many 28x28 digits shrink to the same 14x14 one; the model draws one of them, and "
        "the details it invents differ from the ones that were lost",
        "c": "more steps refine a sample; they cannot recover what the 14x14 input no longer holds",
        "d": "PSNR compares pixels with the original; no classifier is involved",
    }
    letter = answer.strip().lower()
    return _report(name, letter == "b", why[letter])


SOLUTIONS: dict[str, tuple[str, str, str, str]] = {
    "01.1": (
        "alphas_cumprod",
        "check_alphas_cumprod",
        "def alphas_cumprod(betas):\n    return torch.cumprod(1 - betas, dim=0)\n",
        "alpha-bar_t is the product of alpha_s = 1 - beta_s for s <= t: a running product.",
    ),
    "01.2": (
        "q_sample",
        "check_q_sample",
        "def q_sample(x0, noise, t, alphas_cumprod):\n"
        "    ab = alphas_cumprod[t].reshape(-1, *([1] * (x0.ndim - 1)))\n"
        "    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise\n",
        "DDPM eq. 4; alpha-bar is gathered per sample and reshaped to (B, 1, 1, 1) to broadcast.",
    ),
    "01.3": (
        "snr_crossing",
        "check_snr_crossing",
        "ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)\n"
        "snr_crossing = int((ab / (1 - ab) < 1).nonzero()[0])\n",
        "SNR = ab / (1 - ab) < 1 exactly when ab < 1/2: the first step that keeps less than "
        "half of the signal's variance. SNR only falls, so the first such t is the crossing.",
    ),
    "02.1": (
        "my_timestep_embedding",
        "check_timestep_embedding",
        "def my_timestep_embedding(t, dim):\n"
        "    half = dim // 2\n"
        "    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)\n"
        "    args = t.float()[:, None] * freqs[None]\n"
        "    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)\n",
        "Geometric frequencies from 1 down to 1/10000; ldm puts the cosines first.",
    ),
    "02.2": (
        "ddpm_loss",
        "check_ddpm_loss",
        "def ddpm_loss(model, x0, t, noise, alphas_cumprod):\n"
        "    ab = alphas_cumprod[t].reshape(-1, 1, 1, 1)\n"
        "    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise\n"
        "    return ((model(x_t, t) - noise) ** 2).mean()\n",
        "Noise x0 in closed form, ask the model for the noise, mean squared error (Alg. 1).",
    ),
    "02.3": (
        "ddim_step",
        "check_ddim_step",
        "def ddim_step(x_t, eps, ab_t, ab_prev):\n"
        "    x0 = (x_t - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5\n"
        "    return ab_prev**0.5 * x0 + (1 - ab_prev) ** 0.5 * eps\n",
        "Predict x0 by inverting eq. 4, then noise it to the less noisy level ab_prev with the "
        "same eps (DDIM eq. 12 with sigma = 0): no fresh noise, so the step is deterministic.",
    ),
    "02.4": (
        "untrained_loss",
        "check_untrained_loss",
        "untrained_loss = 1.0\n",
        "The target is the noise eps ~ N(0, I); predicting 0 leaves the whole of it as error, and "
        "E[eps^2] = 1 per value, whatever t or the image: t only decides what the network sees.",
    ),
    "03.1": (
        "reparameterize",
        "check_reparameterize",
        "def reparameterize(mean, logvar, eps):\n    return mean + torch.exp(0.5 * logvar) * eps\n",
        "std = exp(logvar / 2); z is a differentiable function of mean and logvar.",
    ),
    "03.2": (
        "gaussian_kl",
        "check_gaussian_kl",
        "def gaussian_kl(mean, logvar):\n"
        "    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar)\n"
        "    return kl.flatten(1).sum(1)\n",
        "The KL of two Gaussians in closed form, per value, summed over C, H, W of each sample.",
    ),
    "03.3": (
        "scale_factor",
        "check_scale_factor",
        "def scale_factor(latents):\n    return 1.0 / latents.flatten().std().item()\n",
        "One std over every value of every latent (a dataset statistic), and its inverse.",
    ),
    "03.4": (
        "snr_multiplier",
        "check_snr_multiplier",
        "snr_multiplier = 5.5**2\n",
        "SNR(t) = ab_t Var(x0) / (1 - ab_t): the data's variance multiplies it at every step. "
        "Latents of std 5.5 keep 30x the SNR, so noise at a given t destroys far less of them.",
    ),
    "04.1": (
        "cross_attention",
        "check_cross_attention",
        "def cross_attention(attn, x, context):\n"
        "    h = attn.heads\n"
        "    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)\n"
        "    split = lambda z: z.view(z.shape[0], z.shape[1], h, -1).transpose(1, 2)\n"
        "    q, k, v = split(q), split(k), split(v)  # (B, heads, N or M, d)\n"
        "    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)\n"
        "    return attn.to_out((w @ v).transpose(1, 2).flatten(2))\n",
        "Queries come from the image tokens, keys and values from the text; each head mixes the "
        "values with weights softmax(q k^T / sqrt(d)), then the heads are joined and projected.",
    ),
    "04.2": (
        "weight_per_token",
        "check_uniform_attention",
        "weight_per_token = 1 / 5\n",
        "Identical keys give every query identical scores; masked tokens get -inf, so the "
        "softmax spreads the weight evenly over the 5 real tokens, whatever the query is.",
    ),
    "04.3": (
        "clip_padding",
        "check_clip_padding",
        "from minisd.text import clip_tokenizer\n\n"
        'clip_padding = 77 - len(clip_tokenizer()("a handwritten digit seven")["input_ids"])\n',
        "4 words, one BPE piece each, plus the start and end tokens: 6 real, 71 padding "
        "(SD pads with the end token, 49407).",
    ),
    "05.1": (
        "guided",
        "check_guidance",
        "def guided(eps_u, eps_c, s):\n    return eps_u + s * (eps_c - eps_u)\n",
        "Start at the unconditional prediction and move s times the way the prompt pulls: "
        "s = 1 lands on eps_c, s > 1 goes past it.",
    ),
    "05.2": (
        "scale",
        "check_weight_to_scale",
        "scale = 1 + 2\n",
        "(1 + w) eps_c - w eps_u = eps_u + (1 + w)(eps_c - eps_u): SD's s is 1 + w, so w = 2 "
        "is s = 3 (and w = 0, the plain conditional model, is s = 1).",
    ),
    "05.3": (
        "evaluations",
        "check_guided_evaluations",
        "evaluations = 2 * 20\n",
        "Each step needs eps_c and eps_u (run as one batch of 2B, but twice the work); "
        "DPM-Solver++(2M) makes one model call per step, reusing the previous step's x0.",
    ),
    "06.1": (
        "evaluations",
        "check_img2img_calls",
        "evaluations = 2 * round(0.6 * 50)\n",
        "Image-to-image runs the last 60% of the 50 DDIM steps (it starts at t ~ 600), and "
        "each step with guidance predicts the noise with and without the prompt.",
    ),
    "06.2": (
        "my_latent_mask",
        "check_latent_mask",
        "import torch.nn.functional as F\n\n"
        "def my_latent_mask(mask, factor):\n    return F.max_pool2d(mask, factor)\n",
        "A latent cell covers factor x factor pixels; if any of them is to be filled, the cell "
        "must be generated, so take the maximum over each cell (max-pooling).",
    ),
    "06.3": (
        "answer",
        "check_upscaling_psnr",
        'answer = "b"\n',
        "Downsampling throws information away: every 14x14 digit is the shrunken image of many "
        "28x28 ones. A diffusion upscaler samples one plausible digit; its invented strokes sit "
        "a pixel or two from the lost ones, which PSNR punishes, while the classifier, which "
        "asks only whether it is the same digit, reads it perfectly.",
    ),
}


def solution(exercise: str) -> str:
    """Print (and return) one answer to an exercise, e.g. solution("02.3"), and why it works."""
    if exercise not in SOLUTIONS:
        raise ValueError(f"no exercise {exercise!r}; choose one of {', '.join(SOLUTIONS)}")
    _, _, code, why = SOLUTIONS[exercise]
    print(f"# Exercise {exercise}: {why}\n{code}")
    return code
