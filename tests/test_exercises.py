"""The exercise checkers accept right answers and reject wrong or missing ones."""

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
    out = capsys.readouterr().out
    assert "look later" in out and "an int" in out and "not attempted" in out
