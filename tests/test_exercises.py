"""The exercise checkers accept right answers and reject wrong or missing ones."""

import math

import pytest
import torch

from minisd import exercises


def right_alphas_cumprod(betas):
    return torch.cumprod(1 - betas, dim=0)


def right_q_sample(x0, noise, t, alphas_cumprod):
    ab = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def not_attempted(*args):
    raise NotImplementedError


def test_alphas_cumprod_checker(capsys):
    assert exercises.check_alphas_cumprod(right_alphas_cumprod)
    assert not exercises.check_alphas_cumprod(lambda b: 1 - b)
    assert not exercises.check_alphas_cumprod(not_attempted)
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("correct") and "torch.cumprod" in out[1] and "not attempted" in out[2]


def test_q_sample_checker(capsys):
    assert exercises.check_q_sample(right_q_sample)
    # a classic slip: forgetting the square roots
    assert not exercises.check_q_sample(
        lambda x0, n, t, ab: ab[t].reshape(-1, 1, 1, 1) * x0 + (1 - ab[t].reshape(-1, 1, 1, 1)) * n
    )
    assert not exercises.check_q_sample(lambda x0, n, t, ab: x0[0])  # wrong shape
    assert not exercises.check_q_sample(lambda *a: 1 / 0)  # a crash is feedback
    out = capsys.readouterr().out
    assert "expected a tensor of shape (5, 1, 8, 8)" in out and "ZeroDivisionError" in out


def test_snr_crossing_checker(capsys):
    from minisd.schedule import NoiseSchedule

    snr = NoiseSchedule("linear").snr(torch.arange(1000))
    answer = int((snr < 1).nonzero()[0])
    assert exercises.check_snr_crossing(answer)
    assert not exercises.check_snr_crossing(answer - 20)
    assert not exercises.check_snr_crossing(float(answer))
    assert not exercises.check_snr_crossing(None)
    assert not exercises.check_snr_crossing(1000)  # past the end: a verdict, not an IndexError
    out = capsys.readouterr().out
    assert "t runs from 0 to 999" in out and "look later" in out
    assert "an int" in out and "not attempted" in out


def test_timestep_embedding_checker(capsys):
    import math

    def right(t, dim):
        half = dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
        args = t.float()[:, None] * freqs
        return torch.cat([args.cos(), args.sin()], dim=1)

    def swapped(t, dim):
        return right(t, dim).roll(dim // 2, dims=1)

    assert exercises.check_timestep_embedding(right)
    assert not exercises.check_timestep_embedding(swapped)
    assert not exercises.check_timestep_embedding(not_attempted)
    assert "swapped" in capsys.readouterr().out


def test_ddpm_loss_checker():
    def right(model, x0, t, noise, ab):
        a = ab[t].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return ((model(x_t, t) - noise) ** 2).mean()

    def predicts_x0(model, x0, t, noise, ab):
        a = ab[t].reshape(-1, 1, 1, 1)
        return ((model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t) - x0) ** 2).mean()

    assert exercises.check_ddpm_loss(right)
    assert not exercises.check_ddpm_loss(predicts_x0)
    assert not exercises.check_ddpm_loss(lambda m, x0, t, n, ab: torch.zeros(4))


def test_ddim_step_checker():
    def right(x_t, eps, ab_t, ab_prev):
        x0 = (x_t - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
        return ab_prev**0.5 * x0 + (1 - ab_prev) ** 0.5 * eps

    def forgets_renoising(x_t, eps, ab_t, ab_prev):
        return (x_t - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5

    assert exercises.check_ddim_step(right)
    assert not exercises.check_ddim_step(forgets_renoising)


def test_reparameterize_checker(capsys):
    assert not exercises.check_reparameterize(lambda m, lv, e: m + torch.exp(lv) * e)
    assert "variance" in capsys.readouterr().out
    assert exercises.check_reparameterize(lambda m, lv, e: m + torch.exp(0.5 * lv) * e)
    assert not exercises.check_reparameterize(not_attempted)


def test_gaussian_kl_checker(capsys):
    def kl(m, lv):
        return 0.5 * (m**2 + lv.exp() - 1 - lv).sum((1, 2, 3))

    assert exercises.check_gaussian_kl(kl)
    assert not exercises.check_gaussian_kl(lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv))
    assert "one KL per sample" in capsys.readouterr().out
    assert not exercises.check_gaussian_kl(lambda m, lv: (m**2 + lv.exp() - 1 - lv).sum((1, 2, 3)))


def test_scale_factor_checker(capsys):
    assert exercises.check_scale_factor(lambda z: 1 / z.std().item())
    assert not exercises.check_scale_factor(lambda z: z.std().item())
    assert "std itself" in capsys.readouterr().out
    assert not exercises.check_scale_factor(lambda z: 1 / z.abs().max().item())


@pytest.mark.parametrize("exercise", sorted(exercises.SOLUTIONS))
def test_every_revealed_solution_passes_its_checker(exercise, capsys):
    name, checker, code, _ = exercises.SOLUTIONS[exercise]
    assert exercises.solution(exercise) == code and code in capsys.readouterr().out
    namespace = {"torch": torch, "math": math}
    exec(code, namespace)
    assert getattr(exercises, checker)(namespace[name]) is True


@pytest.fixture
def records(monkeypatch):
    """Run the checkers as in a notebook's kernel; collect what they display."""
    import IPython.display

    shown = []
    monkeypatch.setattr(exercises, "_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", lambda data, raw: shown.append(data))
    return shown


@pytest.mark.parametrize("exercise", sorted(exercises.SOLUTIONS))
def test_in_a_notebook_each_verdict_is_shown_with_its_record(exercise, records):
    """The record the grader reads: the solution's id, and the three verdicts told apart."""
    name, checker, code, _ = exercises.SOLUTIONS[exercise]
    namespace = {"torch": torch, "math": math}
    exec(code, namespace)
    is_function = f"def {name}(" in code
    check = getattr(exercises, checker)
    assert check(namespace[name]) is True
    assert check(not_attempted if is_function else None) is False
    assert check((lambda *a: torch.zeros(1)) if is_function else 12345) is False
    assert [r[exercises.VERDICT_MIME] for r in records] == [
        {"exercise": exercise, "notebook": exercise[:2], "verdict": verdict}
        for verdict in ("correct", "not yet", "wrong")
    ]
    lines = [r["text/plain"] for r in records]
    assert lines[0].startswith(f"Exercise {exercise[3:]} (") and "): correct" in lines[0]
    assert ": not yet (not attempted" in lines[1] and ": not yet (" in lines[2]


def test_outside_a_notebook_a_checker_prints_its_line_only(capsys):
    assert exercises._ipython() is None  # pytest runs no IPython shell
    exercises.check_snr_crossing(None)
    assert capsys.readouterr().out == (
        "Exercise 3 (where signal and noise are equal): not yet "
        "(not attempted yet: set snr_crossing to your answer)\n"
    )


def test_every_checker_has_a_solution_and_unknown_ids_are_refused():
    checkers = {n for n in dir(exercises) if n.startswith("check_")}
    assert checkers == {checker for _, checker, _, _ in exercises.SOLUTIONS.values()}
    with pytest.raises(ValueError, match="choose one of 01.1"):
        exercises.solution("9.9")


def test_the_reasoning_exercises_reject_the_tempting_wrong_answers(capsys):
    assert not exercises.check_untrained_loss(None)
    assert not exercises.check_untrained_loss(0.0)  # "it outputs zero, so zero loss"
    assert not exercises.check_untrained_loss("one")
    assert "mean square of a standard normal" in capsys.readouterr().out
    assert exercises.check_untrained_loss(0.98)  # a prediction, not a float to the last digit
    assert not exercises.check_snr_multiplier(5.5)  # the std, not the variance
    assert "the std itself" in capsys.readouterr().out
    assert not exercises.check_snr_multiplier(1 / 5.5**2)
    assert exercises.check_snr_multiplier(30.25)


def test_cross_attention_checker(capsys):
    def one_head(attn, x, context):
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        return attn.to_out(torch.softmax(q @ k.transpose(-1, -2) / 16**0.5, -1) @ v)

    assert not exercises.check_cross_attention(one_head)
    assert "one head of 16" in capsys.readouterr().out
    assert not exercises.check_cross_attention(lambda attn, x, c: attn(x, c[:, :3]))
    assert not exercises.check_cross_attention(not_attempted)
    assert "not attempted" in capsys.readouterr().out


def test_uniform_attention_and_clip_padding_checkers(capsys):
    assert not exercises.check_uniform_attention(1 / 16)
    assert "padding gets no weight" in capsys.readouterr().out
    assert not exercises.check_uniform_attention(None)
    assert exercises.check_uniform_attention(0.2)
    assert not exercises.check_clip_padding(73)  # 77 - 4 words: forgot start and end
    assert "start and end" in capsys.readouterr().out
    assert not exercises.check_clip_padding(71.0)
    assert exercises.check_clip_padding(71)


def test_guidance_exercises_catch_the_usual_slips(capsys):
    assert exercises.check_guidance(lambda u, c, s: u + s * (c - u))
    assert not exercises.check_guidance(lambda u, c, s: c + s * (u - c))
    assert "swapped" in capsys.readouterr().out
    assert not exercises.check_guidance(lambda u, c, s: (1 + s) * c - s * u)
    assert "s is 1 + w" in capsys.readouterr().out
    assert not exercises.check_guidance(not_attempted)
    assert not exercises.check_weight_to_scale(2)
    assert "differ" in capsys.readouterr().out
    assert exercises.check_weight_to_scale(3.0)
    assert not exercises.check_guided_evaluations(20)
    assert "eps_c and eps_u" in capsys.readouterr().out
    assert not exercises.check_guided_evaluations(40.0)
    assert exercises.check_guided_evaluations(40)


def test_the_lesson_06_checkers_name_the_usual_slips(capsys):
    import torch.nn.functional as F

    assert not exercises.check_img2img_calls(30)
    assert "unconditional prediction" in capsys.readouterr().out
    assert not exercises.check_img2img_calls(40)  # 1 - strength of the steps, twice
    assert not exercises.check_img2img_calls(60.0)  # a float is not a count
    assert not exercises.check_latent_mask(lambda m, f: F.avg_pool2d(m, f))
    assert "not the mean" in capsys.readouterr().out
    assert not exercises.check_latent_mask(lambda m, f: (F.avg_pool2d(m, f) == 1).float())
    assert "one pixel is enough" in capsys.readouterr().out
    assert not exercises.check_latent_mask(not_attempted)
    assert not exercises.check_upscaling_psnr("c")  # more steps cannot recover lost detail
    assert "cannot recover" in capsys.readouterr().out
    assert not exercises.check_upscaling_psnr("e") and exercises.check_upscaling_psnr(" B ")
