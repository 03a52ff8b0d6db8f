"""Faults during training: a signal, a NaN, a full disk, a process killed while it saves.

Each ends with what was saved intact and a resumed run equal to the uninterrupted one: weights,
EMA and logged losses, exactly (CPU, one thread, in every process involved).
"""

import dataclasses
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from minisd import checkpoint
from minisd.checkpoint import load_tensors
from minisd.cli import entry
from minisd.diffusion import diffusion_loss_fn
from minisd.schedule import NoiseSchedule
from minisd.train import CHECKPOINT_NAME, TrainConfig, TrainingInterrupted, fit
from minisd.unet import TINY, UNetModel

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def tiny_run(seed: int = 0):
    """A model, loss, data and config small enough to train in a second, with dropout (global
    RNG), EMA, and log/checkpoint intervals that do not divide each other."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    torch.manual_seed(seed)
    model = UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1, dropout=0.1))
    config = TrainConfig(steps=8, batch_size=8, lr=1e-3, ema_decay=0.9, log_every=2,
                         checkpoint_every=4)  # fmt: skip
    return model, diffusion_loss_fn(NoiseSchedule("linear", 100)), (x,), config


def uninterrupted():
    model, loss_fn, data, config = tiny_run()
    return fit(model, loss_fn, data, config, progress=False)


def resumed(run_dir):
    model, loss_fn, data, config = tiny_run(seed=1)  # other initial weights: all must be loaded
    return fit(model, loss_fn, data, config, run_dir, resume=True, progress=False)


def assert_same_run(a, b):
    for name, p in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[name], p, rtol=0, atol=0, msg=name)
    for name, p in a.ema.state_dict().items():
        torch.testing.assert_close(b.ema.state_dict()[name], p, rtol=0, atol=0, msg=name)
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in x.history] for x in (a, b)]
    assert strip[0] == strip[1] and a.step == b.step


def saved_step(run_dir) -> int:
    return load_tensors(Path(run_dir) / CHECKPOINT_NAME)[1]["step"]


# The child trains and, in its third step, waits until fit's signal handler has run (it puts the
# previous handler back when it does), so the parent's signal lands in a known step: one that is
# neither a log step nor a checkpoint step, so its loss waits in the checkpoint's log window.
SIGNALLED_CHILD = textwrap.dedent(
    """
    import signal, sys, time
    sys.path.insert(0, sys.argv[2])
    import torch
    torch.set_num_threads(1)
    from test_faults import tiny_run
    from minisd.train import TrainingInterrupted, fit

    model, loss_fn, data, config = tiny_run()
    calls = []

    def waits_in_step_3(model, batch, gen):
        calls.append(1)
        if len(calls) == 3:
            fits_handler = signal.getsignal(signal.SIGTERM)
            print("in step 3", flush=True)
            deadline = time.time() + 60
            while signal.getsignal(signal.SIGTERM) is fits_handler and time.time() < deadline:
                time.sleep(0.01)
        return loss_fn(model, batch, gen)

    try:
        fit(model, waits_in_step_3, data, config, sys.argv[1], progress=False)
    except TrainingInterrupted as err:
        print(err, file=sys.stderr)
        sys.exit(128 + err.signum)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_from_another_process_stops_training_with_a_checkpoint_to_resume(
    tmp_path, one_thread, signum
):
    child = subprocess.Popen(
        [sys.executable, "-c", SIGNALLED_CHILD, str(tmp_path), str(TESTS)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV,
    )  # fmt: skip
    assert child.stdout.readline().strip() == "in step 3"
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert child.returncode == 128 + signum, err
    assert err.strip() == (f"{name}: training stopped after step 3, checkpoint of step 3 in "
                           f"{tmp_path}; continue with --resume")  # fmt: skip
    assert saved_step(tmp_path) == 3  # not a checkpoint_every step: written for the signal
    assert_same_run(uninterrupted(), resumed(tmp_path))


def test_a_signal_in_process_raises_training_interrupted_after_the_step(tmp_path):
    model, loss_fn, data, config = tiny_run()

    def signal_at_step_5(record):
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    config = dataclasses.replace(config, log_every=1)
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with pytest.raises(TrainingInterrupted, match="SIGINT: training stopped after step 5") as info:
        fit(model, loss_fn, data, config, tmp_path, progress=False, callback=signal_at_step_5)
    assert info.value.result.step == 5 and saved_step(tmp_path) == 5
    assert isinstance(info.value, KeyboardInterrupt)  # code that handles Ctrl-C still does
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    model, loss_fn, data, config = tiny_run()

    def impatient(record):
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # fit will stop after this step...
            os.kill(os.getpid(), signal.SIGINT)  # ...no: now

    config = dataclasses.replace(config, log_every=1)
    with pytest.raises(KeyboardInterrupt) as info:
        fit(model, loss_fn, data, config, tmp_path, progress=False, callback=impatient)
    assert not isinstance(info.value, TrainingInterrupted)
    assert saved_step(tmp_path) == 4  # step 5 was never saved; step 4's file is whole
    assert resumed(tmp_path).step == 8


def test_a_nan_loss_stops_training_and_the_last_good_checkpoint_survives(tmp_path):
    model, loss_fn, data, config = tiny_run()

    def nan_at_step_6(model, batch, gen, calls=[]):  # noqa: B006 (counts the calls)
        calls.append(1)
        loss = loss_fn(model, batch, gen)
        return loss * float("nan") if len(calls) == 7 else loss

    with pytest.raises(FloatingPointError) as info:
        fit(model, nan_at_step_6, data, config, tmp_path, progress=False)
    message = str(info.value)
    assert message.startswith("the loss is nan at step 6: training stopped before this step's")
    assert f"{tmp_path / CHECKPOINT_NAME} keeps the last good state" in message
    assert "lower learning rate (--lr)" in message and "float32" in message and "--fp32" in message
    assert saved_step(tmp_path) == 4
    before = load_tensors(tmp_path / CHECKPOINT_NAME)[0]
    assert all(torch.isfinite(v).all() for v in before.values() if v.is_floating_point())
    assert_same_run(uninterrupted(), resumed(tmp_path))  # the saved state is the good one


def test_a_full_disk_during_a_checkpoint_loses_nothing(tmp_path, capsys):
    model, loss_fn, data, config = tiny_run()
    config = dataclasses.replace(config, checkpoint_every=2)
    real_save, saves = checkpoint.save_file, []

    def full_on_the_third_save(tensors, filename, metadata=None):
        saves.append(filename)
        if len(saves) == 3:  # a partial file, then the disk is full
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, filename, metadata=metadata)

    with (
        mock.patch.object(checkpoint, "save_file", full_on_the_third_save),
        pytest.raises(OSError, match="No space left on device"),
    ):
        fit(model, loss_fn, data, config, tmp_path, progress=False)
    assert saved_step(tmp_path) == 4  # the step-6 save failed; step 4's file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temp files
    assert_same_run(uninterrupted(), resumed(tmp_path))


# The training process is SIGKILLed (no cleanup at all) half-way through writing its third
# checkpoint (step 6, checkpoint_every=2).
KILLED_TRAINER = textwrap.dedent(
    """
    import dataclasses, os, signal, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save
    from minisd import checkpoint
    from minisd.train import fit
    from test_faults import tiny_run

    saves = []
    real = checkpoint.save_file

    def save_file(tensors, filename, metadata=None):
        saves.append(1)
        if len(saves) < 3:
            return real(tensors, filename, metadata=metadata)
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_file = save_file
    model, loss_fn, data, config = tiny_run()
    config = dataclasses.replace(config, checkpoint_every=2)
    fit(model, loss_fn, data, config, sys.argv[1], progress=False)
    """
)


def test_a_trainer_killed_while_saving_leaves_the_previous_checkpoint_to_resume(
    tmp_path, one_thread
):
    child = subprocess.run([sys.executable, "-c", KILLED_TRAINER, str(tmp_path), str(TESTS)],
                           capture_output=True, text=True, env=CHILD_ENV, timeout=120)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert saved_step(tmp_path) == 4
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != CHECKPOINT_NAME]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{CHECKPOINT_NAME}.")  # the torso
    assert_same_run(uninterrupted(), resumed(tmp_path))


# ----- the same through the command line ------------------------------------------------------
@pytest.fixture
def mnist_fixture(tmp_path, monkeypatch):
    from test_data import write_idx_split

    write_idx_split(tmp_path / "data" / "MNIST" / "raw", "train", 64, gz=False)
    monkeypatch.setenv("MINISD_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_command_line_training_stops_on_sigint_and_resumes(tmp_path, mnist_fixture):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "minisd", "train", "--preset", "TINY", "--limit", "32",
            "--batch-size", "8", "--steps", "100000", "--checkpoint-every", "1",
            "--run-dir", str(run), "--device", "cpu"]  # fmt: skip
    env = {**CHILD_ENV, "MINISD_DATA": str(mnist_fixture)}
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)  # fmt: skip
    deadline = time.time() + 120
    while not (run / CHECKPOINT_NAME).is_file() and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130
    ours = [line for line in err.splitlines() if line.startswith("minisd")]  # not the bar
    assert len(ours) == 1
    last = ours[0]
    assert last.startswith("minisd train: SIGINT: training stopped after step ")
    assert last.endswith(f"in {run}; continue with --resume") and "Traceback" not in err
    step = saved_step(run)
    assert f"after step {step}," in last
    export = tmp_path / "m.safetensors"
    assert entry([*argv[3:-8], "--steps", str(step + 2), "--run-dir", str(run), "--resume",
                  "--device", "cpu", "--export", str(export)]) == 0  # fmt: skip
    assert saved_step(run) == step + 2 and export.is_file()


def test_command_line_full_disk_is_one_line(tmp_path, mnist_fixture, capsys):
    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    with mock.patch.object(checkpoint, "save_file", full):
        code = entry(["train", "--preset", "TINY", "--limit", "16", "--batch-size", "8", "--steps",
                      "2", "--run-dir", str(tmp_path / "run"), "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.strip().splitlines()[-1] == (
        "minisd train: error: [Errno 28] No space left on device (--debug shows the traceback)"
    )
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["commands.txt"]  # no torso


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on CUDA only")
def test_mixed_precision_keeps_normalisation_and_softmax_in_float32():
    from minisd.train import _autocast

    cfg = dataclasses.replace(TINY, in_channels=1, out_channels=1, context_dim=16)
    model = UNetModel(cfg).cuda()
    dtypes = {}

    def record(name):
        return lambda module, args, out: dtypes.setdefault(name, out.dtype)

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm):
            module.register_forward_hook(record(name))
    x, context = torch.randn(2, 1, 8, 8).cuda(), torch.randn(2, 4, 16).cuda()
    with _autocast(torch.device("cuda"), True):
        out = model(x, torch.tensor([1, 2]).cuda(), context=context)
        probs = torch.randn(2, 4, 8, device="cuda", dtype=out.dtype).softmax(-1)
    assert out.dtype in (torch.bfloat16, torch.float16)  # the convolutions did run in half
    assert dtypes and set(dtypes.values()) == {torch.float32}, dtypes
    assert probs.dtype == torch.float32
