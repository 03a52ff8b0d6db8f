"""Training: loss falls, resume equals an uninterrupted run, EMA, the objective, the CLI."""

import copy
import dataclasses
import json

import pytest
import torch
from helpers import randomize
from safetensors.torch import load_file
from torch import nn

from minisd import diffusion, train
from minisd.diffusion import diffusion_loss_fn
from minisd.pretrained import load_diffusion, save_diffusion
from minisd.provenance import portable_command
from minisd.schedule import NoiseSchedule
from minisd.train import TrainConfig, fit
from minisd.unet import TINY, UNetModel

TINY1 = dataclasses.replace(TINY, in_channels=1, out_channels=1)
SCHED = NoiseSchedule("linear", 100)


def toy_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return x, torch.randint(0, 10, (n,), generator=g)


def fresh_model(cfg=TINY1, seed=0):
    torch.manual_seed(seed)
    return UNetModel(cfg)


def test_loss_falls_on_a_fixed_batch():
    x, _ = toy_data(16)
    model = fresh_model()

    def held_out_loss():  # the same t and noise before and after, so only the model changes
        with torch.no_grad():
            return diffusion.diffusion_loss(
                model, SCHED, x, torch.Generator().manual_seed(123)
            ).item()

    before = held_out_loss()
    cfg = TrainConfig(steps=60, batch_size=16, lr=3e-3, ema_decay=None, log_every=20)
    result = fit(model, diffusion_loss_fn(SCHED), (x,), cfg, progress=False)
    assert held_out_loss() < 0.6 * before
    assert [r["step"] for r in result.history] == [20, 40, 60]
    assert result.step == 60 and result.ema is None and not result.model.training


class Interrupt(Exception):
    """Stands in for Ctrl-C or a killed job."""


def interrupted_after(loss_fn, steps: int):
    """loss_fn that raises on its call number steps + 1, as if the run was stopped then."""
    calls = []

    def wrapped(model, batch, gen):
        if len(calls) == steps:
            raise Interrupt
        calls.append(1)
        return loss_fn(model, batch, gen)

    return wrapped


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"{name} differs")


def logged(result):  # everything but the wall-clock seconds
    return [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]


RESUME_CASES = {
    "plain": dict(model={}, config={}),
    # dropout draws from torch's global RNG, not from the step's generator
    "dropout": dict(model={"dropout": 0.3}, config={}),
    # the record at step 6 averages steps 4-6, across the checkpoint at step 4
    "log_every_3": dict(model={}, config={"log_every": 3}),
    "warmup_and_decay": dict(model={}, config={"warmup_steps": 3, "decay_steps": 3}),
    "everything": dict(model={"dropout": 0.3}, config={"log_every": 3, "warmup_steps": 5}),
}


@pytest.mark.parametrize("case", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, case):
    x, _ = toy_data()
    model_cfg = dataclasses.replace(TINY1, **case["model"])
    cfg = TrainConfig(
        steps=8, batch_size=8, lr=1e-3, ema_decay=0.9, log_every=2, checkpoint_every=4
    )
    cfg = dataclasses.replace(cfg, **case["config"])
    loss_fn = diffusion_loss_fn(SCHED)
    straight = fit(fresh_model(model_cfg), loss_fn, (x,), cfg, progress=False)

    stopped = interrupted_after(loss_fn, 6)  # stopped in step 7, after the checkpoint at 4
    with pytest.raises(Interrupt):
        fit(fresh_model(model_cfg), stopped, (x,), cfg, run_dir=tmp_path, progress=False)
    resumed = fit(
        fresh_model(model_cfg, seed=1), loss_fn, (x,), cfg, tmp_path, resume=True, progress=False
    )

    assert resumed.step == 8
    assert_same_weights(straight.model, resumed.model)
    assert_same_weights(straight.ema, resumed.ema)
    assert logged(resumed) == logged(straight)
    # the run is not trivially repeatable: another seed takes other steps
    other = fit(
        fresh_model(model_cfg), loss_fn, (x,), dataclasses.replace(cfg, seed=1), progress=False
    )
    assert logged(other) != logged(straight)


def test_the_global_rng_of_a_step_is_not_the_step_generators_stream():
    cpu = torch.device("cpu")
    with train.seeded_global_rng(3, 7, cpu):
        dropout_draw = torch.rand(8)
    step_draw = torch.rand(8, generator=train.step_generator(3, 7, cpu))
    assert not torch.equal(dropout_draw, step_draw)
    with train.seeded_global_rng(3, 7, cpu):
        assert torch.equal(torch.rand(8), dropout_draw)  # and it is a function of (seed, step)


def test_dropout_masks_depend_on_the_step_not_on_global_rng_state():
    x, _ = toy_data()
    model_cfg = dataclasses.replace(TINY1, dropout=0.5)
    cfg = TrainConfig(steps=2, batch_size=8, ema_decay=None, log_every=1)
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # whatever the caller did with the global RNG before
        model = UNetModel(model_cfg)
        model.load_state_dict(fresh_model(model_cfg).state_dict())
        runs.append(fit(model, diffusion_loss_fn(SCHED), (x,), cfg, progress=False))
    assert_same_weights(runs[0].model, runs[1].model)
    state = torch.random.get_rng_state()
    fit(fresh_model(model_cfg), diffusion_loss_fn(SCHED), (x,), cfg, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # fit leaves the caller's RNG alone


def test_max_seconds_stops_early_and_checkpoints_where_it_stopped(tmp_path):
    x, _ = toy_data()
    cfg = TrainConfig(steps=50, batch_size=8, log_every=10, checkpoint_every=10, max_seconds=1e-9)
    result = fit(fresh_model(), diffusion_loss_fn(SCHED), (x,), cfg, tmp_path, progress=False)
    assert result.step == 1 and [r["step"] for r in result.history] == [1]
    # the run can go on from where the clock stopped it
    go_on = dataclasses.replace(cfg, steps=3, max_seconds=None)
    resumed = fit(
        fresh_model(), diffusion_loss_fn(SCHED), (x,), go_on, tmp_path, resume=True, progress=False
    )
    assert resumed.step == 3
    with pytest.raises(ValueError, match="max_seconds"):
        TrainConfig(steps=1, max_seconds=0)


def test_lr_warms_up_holds_and_decays_to_zero():
    cfg = TrainConfig(steps=10, warmup_steps=2, decay_steps=4, lr=1.0)
    lrs = [train._lr_at(cfg, step) for step in range(10)]
    assert lrs == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="decay_steps"):
        TrainConfig(steps=3, decay_steps=4)


def test_a_decay_can_branch_off_a_constant_lr_checkpoint(tmp_path):
    x, _ = toy_data()
    stable = TrainConfig(steps=4, batch_size=8, log_every=2, checkpoint_every=2)
    fit(fresh_model(), diffusion_loss_fn(SCHED), (x,), stable, tmp_path, progress=False)
    decay = dataclasses.replace(stable, steps=6, decay_steps=2)
    result = fit(
        fresh_model(), diffusion_loss_fn(SCHED), (x,), decay, tmp_path, resume=True, progress=False
    )
    assert [r["lr"] for r in result.history] == [stable.lr, stable.lr, stable.lr / 2]


def test_resume_refuses_what_would_be_a_different_run(tmp_path):
    x, _ = toy_data()
    cfg = TrainConfig(steps=2, batch_size=8, ema_decay=None)
    loss_fn = diffusion_loss_fn(SCHED)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        fit(fresh_model(), loss_fn, (x,), cfg, tmp_path, resume=True, progress=False)
    fit(fresh_model(), loss_fn, (x,), cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match="already at step 2"):
        fit(fresh_model(), loss_fn, (x,), cfg, tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"lr: 0.0002 -> 0.001"):
        fit(
            fresh_model(),
            loss_fn,
            (x,),
            dataclasses.replace(cfg, steps=4, lr=1e-3),
            tmp_path,
            resume=True,
        )


def test_batches_are_epoch_permutations_and_depend_only_on_seed_and_step():
    idx = torch.cat([train.batch_indices(10, 5, s, seed=3) for s in range(2)])
    assert sorted(idx.tolist()) == list(range(10))  # one epoch sees every item once
    assert torch.equal(train.batch_indices(10, 5, 7, 3), train.batch_indices(10, 5, 7, 3))
    assert not torch.equal(train.batch_indices(10, 5, 2, 3), train.batch_indices(10, 5, 0, 3))
    with pytest.raises(ValueError, match="larger than the dataset"):
        train.batch_indices(4, 5, 0, 0)


def reference_fit(model, loss_fn, x, cfg, lr_factors):
    """fit() written out as the papers and torch's docs state it, for one tensor of data: AdamW;
    gradients rescaled by min(1, clip / (||g|| + 1e-6)) (torch's clip_grad_norm_); lr set per
    step; EMA decay min(decay, (1 + n) / (10 + n)) at update n (ldm's LitEma warm-up)."""
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses, norms = [], []
    for step, factor in enumerate(lr_factors):
        idx = train.batch_indices(len(x), cfg.batch_size, step, cfg.seed)
        gen = train.step_generator(cfg.seed, step, torch.device("cpu"))
        loss = loss_fn(model, (x[idx],), gen)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        if cfg.grad_clip:
            for g in grads:
                g.mul_(min(1.0, cfg.grad_clip / (norm.item() + 1e-6)))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * factor
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.copy_(decay * e + (1 - decay) * p)
        losses.append(loss.item())
        norms.append(norm.item())
    return model, ema, losses, norms


def test_fit_is_adamw_with_clipping_lr_schedule_and_ema_written_out():
    x, _ = toy_data()
    cfg = TrainConfig(
        steps=6,
        batch_size=8,
        lr=1e-2,
        weight_decay=0.1,  # not AdamW's default 0.01, so fit must pass it on
        warmup_steps=2,
        decay_steps=2,
        ema_decay=0.9,
        grad_clip=0.05,
        log_every=1,
    )
    lr_factors = [0.5, 1, 1, 1, 1, 0.5]  # warm up over 2 steps; fall linearly to 0 over the last 2
    loss_fn = diffusion_loss_fn(SCHED)
    result = fit(fresh_model(), loss_fn, (x,), cfg, progress=False)
    model, ema, losses, norms = reference_fit(fresh_model(), loss_fn, x, cfg, lr_factors)

    assert min(norms) > 5 * cfg.grad_clip  # clipping was active at every step
    assert [r["lr"] for r in result.history] == [cfg.lr * f for f in lr_factors]
    torch.testing.assert_close([r["loss"] for r in result.history], losses)
    # Adam divides by sqrt(v): summation-order rounding in the clipped gradients grows to ~1e-5
    # in six steps (more with one thread); leaving out the weight decay moves weights by ~1e-2.
    for got, want in ((result.model, model), (result.ema, ema)):
        for (name, a), b in zip(got.state_dict().items(), want.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{name} differs")
    # and the comparison can tell: without clipping, fit takes other steps
    unclipped = fit(
        fresh_model(), loss_fn, (x,), dataclasses.replace(cfg, grad_clip=None), progress=False
    )
    diff = max(
        (a - b).abs().max()
        for a, b in zip(unclipped.model.parameters(), model.parameters(), strict=True)
    )
    assert diff > 1e-3


def test_ema_decay_warms_up_like_ldm():
    model, ema = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    train.update_ema(ema, model, decay=0.999, step=0)  # decay min(0.999, 1/10) = 0.1
    torch.testing.assert_close(ema.weight, torch.full((2, 2), 0.9))
    train.update_ema(ema, model, decay=0.999, step=5)  # decay 6/15 = 0.4: 0.4 * 0.9 + 0.6 * 1
    torch.testing.assert_close(ema.weight, torch.full((2, 2), 0.96))


def test_ema_moves_toward_the_model():
    model, ema = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    train.update_ema(ema, model, decay=0.99, step=10_000)
    torch.testing.assert_close(ema.weight, torch.full((2, 2), 0.01))


class Recorder(nn.Module):
    """Stands in for a U-Net: records what it is called with, predicts zeros."""

    def __init__(self, num_classes=None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.config = type("Cfg", (), {"num_classes": num_classes})()
        self.null_class = num_classes
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((x, t, y))
        return torch.zeros_like(x) + self.w


def _draws(x0, seed):
    """The t and noise diffusion_loss draws from a generator seeded `seed` (t first, then noise)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, SCHED.num_timesteps, (x0.shape[0],), generator=g)
    return t, torch.randn(x0.shape, generator=g)


def _by_hand(model, x0, seed, prediction, gamma=None):
    """The objective written out: x_t = sqrt(ab) x0 + sqrt(1-ab) eps; target eps or
    v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho 2022, sec. 4); Min-SNR-gamma weight
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v (Hang et al. 2023)."""
    t, eps = _draws(x0, seed)
    ab = SCHED.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = eps if prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    err = (model(x_t, t) - target).pow(2).flatten(1).mean(1)
    if gamma is None:
        return err.mean(), t
    snr = (ab / (1 - ab)).flatten()
    weight = snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)
    return (weight * err).mean(), t


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_diffusion_loss_is_the_objective_written_out(prediction, gamma):
    model = fresh_model().eval()
    randomize(model, std=0.05)  # outputs that depend on x_t and t, not zeros
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        got = diffusion.diffusion_loss(model, SCHED, x0, gen, prediction, min_snr_gamma=gamma)
        want, t = _by_hand(model, x0, 3, prediction, gamma)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        # the test can tell the targets apart: the other one gives another loss
        other, _ = _by_hand(model, x0, 3, "v" if prediction == "eps" else "eps", gamma)
        assert abs(other - want) > 0.05 * want
    snr = SCHED.snr(t)
    assert (snr > 5).any() and (snr < 5).any()  # both branches of the min are exercised
    with pytest.raises(ValueError, match="eps"):
        diffusion.diffusion_loss(model, SCHED, x0, torch.Generator(), "x0")


def test_class_dropout_replaces_labels_with_the_null_class():
    model = Recorder(num_classes=10)
    x, y = toy_data(1000)
    diffusion_loss_fn(SCHED, class_dropout=0.3)(model, (x, y), torch.Generator().manual_seed(0))
    used = model.calls[-1][2]
    dropped = (used == 10).float().mean().item()
    assert 0.25 < dropped < 0.35 and torch.equal(used[used != 10], y[used != 10])
    with pytest.raises(ValueError, match="needs batches of"):
        diffusion_loss_fn(SCHED)(model, (x,), torch.Generator())
    with pytest.raises(ValueError, match="class_dropout"):
        diffusion_loss_fn(SCHED, class_dropout=1.0)


def test_bad_config_and_data():
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(steps=1, ema_decay=1.0)
    with pytest.raises(ValueError, match="steps and batch_size"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="one length"):
        fit(
            fresh_model(),
            diffusion_loss_fn(SCHED),
            (torch.zeros(4, 1, 8, 8), torch.zeros(3)),
            TrainConfig(1),
        )


def test_diverging_loss_stops_with_a_clear_error():
    x, _ = toy_data(8)
    with pytest.raises(FloatingPointError, match="lower learning rate"):
        fit(
            fresh_model(),
            lambda m, b, g: torch.tensor(float("nan")),
            (x,),
            TrainConfig(2, 8),
            progress=False,
        )


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_pretrained_round_trip(tmp_path, prediction):
    model = fresh_model().eval()
    with torch.no_grad():
        for p in model.parameters():  # make the zero-initialised output layer do something
            p.add_(0.05 * torch.randn_like(p))
    sched = NoiseSchedule("cosine", 50)
    path = save_diffusion(tmp_path / "m.safetensors", model, sched, prediction)
    bundle = load_diffusion(path)
    assert bundle.schedule.kind == "cosine" and bundle.prediction == prediction
    torch.testing.assert_close(bundle.schedule.alphas_cumprod, sched.alphas_cumprod)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    torch.testing.assert_close(bundle.unet(x, t), model(x, t), rtol=0, atol=5e-3)  # fp16 weights
    eps = bundle.eps_fn()(x, t)
    if prediction == "eps":
        torch.testing.assert_close(eps, bundle.unet(x, t))
    else:
        from minisd.diffusion import eps_from_v

        torch.testing.assert_close(eps, eps_from_v(bundle.unet(x, t), x, t, bundle.schedule))


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--export"):
        load_diffusion(tmp_path / "none.safetensors")
    from minisd.checkpoint import save_tensors

    save_tensors(tmp_path / "other.safetensors", {"w": torch.ones(1)}, {"format": "something"})
    with pytest.raises(ValueError, match="not a minisd diffusion checkpoint"):
        load_diffusion(tmp_path / "other.safetensors")


def test_command_line_train_resume_export_sample(tmp_path, monkeypatch):
    from minisd import cli, data
    from minisd.cli import diffusion as cli_diffusion

    x, y = toy_data(64)
    x = torch.nn.functional.pad(x, (10, 10, 10, 10), value=-1.0)  # 28x28 like MNIST
    monkeypatch.setattr(
        cli_diffusion, "load_dataset", lambda name, train, limit: (x[:limit], y[:limit])
    )
    assert data.LOADERS  # the real loader is tested in test_data.py
    run, out = tmp_path / "run", tmp_path / "m.safetensors"
    base = [
        "train",
        "--preset",
        "TINY",
        "--limit",
        "32",
        "--batch-size",
        "8",
        "--run-dir",
        str(run),
    ]
    cli.main(base + ["--steps", "2", "--checkpoint-every", "1"])
    cli.main(base + ["--steps", "4", "--resume", "--export", str(out)])
    sidecar = __import__("json").loads(out.with_suffix(".json").read_text())
    assert sidecar["steps"] == 4 and sidecar["weights"] == "EMA"
    assert len(sidecar["commands"]) == 2 and "--resume" in sidecar["commands"][1]
    shown = portable_command(sidecar["commands"][1])  # what notebooks print: no machine path
    assert str(run) not in shown and shown.endswith(
        "--run-dir RUN_DIR --steps 4 --resume --export " + out.name  # outside the repo: its name
    )
    assert sidecar["hardware"]["torch"] == torch.__version__
    png, pt = tmp_path / "s.png", tmp_path / "s.pt"
    cli.main(
        [
            "sample",
            "--checkpoint",
            str(out),
            "--n",
            "4",
            "--steps",
            "3",
            "--out",
            str(png),
            "--save-tensor",
            str(pt),
        ]
    )
    assert png.stat().st_size > 0 and torch.load(pt).shape == (4, 1, 28, 28)


def test_command_line_init_from_branches_a_run_and_keeps_its_history(tmp_path, monkeypatch):
    from minisd import cli
    from minisd.cli import diffusion as cli_diffusion

    x, y = toy_data(64)
    x = torch.nn.functional.pad(x, (10, 10, 10, 10), value=-1.0)
    monkeypatch.setattr(
        cli_diffusion, "load_dataset", lambda name, train, limit: (x[:limit], y[:limit])
    )
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    base = ["train", "--preset", "TINY", "--limit", "32", "--batch-size", "8"]
    cli.main(base + ["--steps", "3", "--export", str(first)])
    cli.main(base + ["--steps", "2", "--decay-steps", "2", "--init-from", str(first),
                     "--export", str(second)])  # fmt: skip
    a = json.loads(first.with_suffix(".json").read_text())
    b = json.loads(second.with_suffix(".json").read_text())
    assert b["steps"] == 5 and b["init_from"]["steps"] == 3
    assert b["commands"][:1] == a["commands"] and "--init-from" in b["commands"][1]
    with pytest.raises(ValueError, match="trained with other settings"):
        cli.main(base + ["--steps", "1", "--schedule", "cosine", "--init-from", str(first)])


def test_min_snr_gamma_must_be_positive():
    with pytest.raises(ValueError, match="min_snr_gamma"):
        diffusion_loss_fn(SCHED, min_snr_gamma=0.0)
    model = fresh_model().eval()
    randomize(model)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    with torch.no_grad():  # a gamma above every SNR weights every step 1 for eps: the plain loss
        plain = diffusion.diffusion_loss(model, SCHED, x0, torch.Generator().manual_seed(3))
        huge = diffusion.diffusion_loss(
            model, SCHED, x0, torch.Generator().manual_seed(3), min_snr_gamma=1e12
        )
    torch.testing.assert_close(huge, plain)


# ----- the loop's bookkeeping, against a clock the test controls ------------------------------
class FakeClock:
    """time.perf_counter for train.py only: starts far from 0 (as a real uptime does) and moves
    one second per call, so every reported duration is known."""

    def __init__(self, start=1e6):
        self.now = start

    def perf_counter(self):
        self.now += 1.0
        return self.now


def test_seconds_log_means_callbacks_and_checkpoints(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(train, "time", clock)
    saved = []
    real_save = train._save_state

    def save_state(ckpt, result, *args):
        saved.append(result.step)
        real_save(ckpt, result, *args)

    monkeypatch.setattr(train, "_save_state", save_state)
    losses, records = [], []

    def loss_fn(model, batch, gen):
        loss = diffusion_loss_fn(SCHED)(model, batch, gen)
        losses.append(loss.item())
        return loss

    x, _ = toy_data()
    cfg = TrainConfig(
        steps=7, batch_size=8, ema_decay=None, log_every=3, checkpoint_every=3, max_seconds=1e4
    )
    result = fit(
        fresh_model(), loss_fn, (x,), cfg, tmp_path, progress=False, callback=records.append
    )
    assert result.step == 7  # a generous time limit stops nothing
    assert saved == [3, 6, 7]  # every checkpoint_every steps, and at the end
    assert [r["step"] for r in result.history] == [3, 6, 7]
    # each record is the mean of the losses since the last one
    means = [sum(losses[0:3]) / 3, sum(losses[3:6]) / 3, losses[6]]
    assert [r["loss"] for r in result.history] == pytest.approx(means, rel=1e-12)
    assert records == result.history  # the callback sees every record as it is logged
    seconds = [r["seconds"] for r in result.history]
    assert all(isinstance(s, float) for s in seconds)
    assert 0 < seconds[0] < seconds[1] < seconds[2] <= result.seconds < 100
    # a resumed run's clock carries on from the checkpoint's
    go_on = dataclasses.replace(cfg, steps=9)
    resumed = fit(fresh_model(), loss_fn, (x,), go_on, tmp_path, resume=True, progress=False)
    before = result.history[-1]["seconds"]
    assert before < resumed.history[-1]["seconds"] <= resumed.seconds < before + 100


def test_fit_hands_the_loss_the_steps_generator():
    seen = []

    def loss_fn(model, batch, gen):
        seen.append(torch.randint(0, 2**30, (4,), generator=gen))
        return diffusion_loss_fn(SCHED)(model, batch, gen)

    x, _ = toy_data()
    cfg = TrainConfig(steps=2, batch_size=8, ema_decay=None, log_every=1, seed=5)
    fit(fresh_model(), loss_fn, (x,), cfg, progress=False)
    for step, draw in enumerate(seen):
        want = torch.randint(0, 2**30, (4,), generator=train.step_generator(5, step, x.device))
        assert torch.equal(draw, want)


def test_update_ema_copies_buffers():
    model, ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        model.running_mean.fill_(5.0)
    model.num_batches_tracked.fill_(7)
    train.update_ema(ema, model, decay=0.999, step=10_000)
    assert torch.equal(ema.running_mean, model.running_mean)
    assert ema.num_batches_tracked.item() == 7


def test_loss_fn_passes_min_snr_and_dropout_draws_through_its_generator():
    model = fresh_model().eval()
    randomize(model, std=0.05)
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        via_fn = diffusion_loss_fn(SCHED, min_snr_gamma=0.5)(
            model, (x0,), torch.Generator().manual_seed(3)
        )
        direct = diffusion.diffusion_loss(
            model, SCHED, x0, torch.Generator().manual_seed(3), min_snr_gamma=0.5
        )
        plain = diffusion.diffusion_loss(model, SCHED, x0, torch.Generator().manual_seed(3))
    assert via_fn.item() == direct.item() and abs(direct - plain) > 0.05 * plain
    with pytest.raises(ValueError, match="min_snr_gamma"):
        diffusion.diffusion_loss(model, SCHED, x0, torch.Generator(), min_snr_gamma=0.0)

    # labels are dropped by the generator fit hands over, whatever the global RNG holds
    x, y = toy_data(200)
    used = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        recorder = Recorder(num_classes=10)
        diffusion_loss_fn(SCHED, class_dropout=0.5)(
            recorder, (x, y), torch.Generator().manual_seed(4)
        )
        used.append(recorder.calls[-1][2])
    assert torch.equal(used[0], used[1])


def test_loss_fn_accepts_a_model_without_a_config():
    class Bare(nn.Module):  # any eps model(x, t): no config attribute, no classes
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x, t):
            return self.w * x

    x0 = torch.zeros(4, 1, 8, 8)
    loss = diffusion_loss_fn(SCHED)(Bare(), (x0,), torch.Generator().manual_seed(0))
    t, eps = _draws(x0, 0)
    x_t = (1 - SCHED.alphas_cumprod[t]).sqrt().float().view(-1, 1, 1, 1) * eps  # x0 = 0
    torch.testing.assert_close(loss, (x_t - eps).pow(2).mean())


def test_portable_command_shows_no_machine_path():
    """What notebooks print of a recorded command: the run folder as RUN_DIR, paths inside the
    repository relative to it, others by file name (an export made in a scratch folder)."""
    from minisd.provenance import REPO

    recorded = (
        f"python -m minisd train --init-from {REPO / 'data/checkpoints/m.safetensors'} "
        "--run-dir /home/me/runs/a --export /scratch/me/out_r1.safetensors --steps 9"
    )
    assert portable_command(recorded) == (
        "python -m minisd train --init-from data/checkpoints/m.safetensors --run-dir RUN_DIR "
        "--export out_r1.safetensors --steps 9"
    )


def test_compile_trains_the_compiled_step_and_saves_plain_keys(tmp_path, monkeypatch):
    """TrainConfig(compile=True) runs the steps through torch.compile's module, reports the first
    step's time and keeps checkpoints in the model's own keys; the weights are the eager run's.
    (aot_eager: dynamo and AOT autograd without inductor's C++ build, so the test is quick.)"""
    compiled = []
    real_compile = torch.compile

    def compile_(module):
        compiled.append(real_compile(module, backend="aot_eager"))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", compile_)
    seen = []

    def loss_fn(model, batch, gen):
        seen.append(model)
        return diffusion_loss_fn(SCHED)(model, batch, gen)

    x, _ = toy_data()
    cfg = TrainConfig(steps=2, batch_size=8, ema_decay=None, log_every=1)
    eager = fit(fresh_model(), diffusion_loss_fn(SCHED), (x,), cfg, progress=False)
    result = fit(
        fresh_model(), loss_fn, (x,), dataclasses.replace(cfg, compile=True), tmp_path,
        progress=False,
    )  # fmt: skip
    assert len(compiled) == 1 and seen == [compiled[0]] * 2
    assert eager.compile_seconds is None and 0 < result.compile_seconds <= result.seconds
    for a, b in zip(eager.model.parameters(), result.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    saved = load_file(tmp_path / train.CHECKPOINT_NAME)
    model_keys = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    assert model_keys == set(result.model.state_dict())  # no "_orig_mod." from the wrapper
