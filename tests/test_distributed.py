"""Training under torchrun: two CPU processes (gloo) against one, and resume across processes.

Each test launches `python -m torch.distributed.run --standalone --nproc_per_node 2`, as a
student would on two GPUs, with tests/ddp_worker.py or `-m minisd train` as the program.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import fixed_draws_run

from minisd.checkpoint import load_tensors
from minisd.train import CHECKPOINT_NAME, fit

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": str(TESTS.parent), "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(*argv, env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


def worker(*argv) -> subprocess.CompletedProcess:
    return torchrun(TESTS / "ddp_worker.py", *argv)


def saved(path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors, meta = load_tensors(path)
    return tensors, meta["history"]


def test_two_processes_train_as_one_does_on_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp.safetensors"
    child = worker("fixed", out)
    assert child.returncode == 0, child.stderr[-3000:]
    two, two_history = saved(out)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, loss_fn, data, config = fixed_draws_run()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        one = fit(model, loss_fn, data, config, progress=False)  # batch 8 in one process
    finally:
        torch.set_num_threads(before)
    moved = max((v - start[k]).abs().max().item() for k, v in one.model.state_dict().items())
    assert moved > 1e-3  # 4 AdamW steps moved the weights by far more than the tolerance
    for prefix, module in (("model.", one.model), ("ema.", one.ema)):
        for name, p in module.state_dict().items():
            torch.testing.assert_close(two[prefix + name], p, rtol=1e-4, atol=1e-5, msg=name)
    assert [r["step"] for r in two_history] == [1, 2, 3, 4]
    for a, b in zip(two_history, one.history, strict=True):  # the global batch's loss
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]


@pytest.mark.slow
def test_a_resumed_two_process_run_matches_an_uninterrupted_one(tmp_path):
    straight = worker("diffusion", tmp_path / "straight.safetensors")
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "run"
    stopped = worker("diffusion", tmp_path / "x.safetensors", "--run-dir", run,
                     "--signal-at", 3)  # fmt: skip
    # Rank 1 alone got SIGTERM, in step 3; both ranks stopped after it and rank 0 saved it.
    assert stopped.returncode != 0 and not (tmp_path / "x.safetensors").exists()
    for rank in (0, 1):
        assert (f"rank {rank}: SIGTERM: training stopped after step 3, checkpoint of step 3 in "
                f"{run}; continue with --resume") in stopped.stdout  # fmt: skip
    assert load_tensors(run / CHECKPOINT_NAME)[1]["step"] == 3

    resumed = worker("diffusion", tmp_path / "resumed.safetensors", "--run-dir", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, a_history = saved(tmp_path / "straight.safetensors")
    b, b_history = saved(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in h]
             for h in (a_history, b_history)]  # fmt: skip
    assert strip[0] == strip[1] and [r["step"] for r in a_history] == [2, 4, 6, 8]


def test_python_m_minisd_train_runs_unchanged_under_torchrun(tmp_path):
    from test_data import write_idx_split

    write_idx_split(tmp_path / "data" / "MNIST" / "raw", "train", 64, gz=False)
    export, run = tmp_path / "m.safetensors", tmp_path / "run"
    child = torchrun("-m", "minisd", "train", "--preset", "TINY", "--limit", "32", "--batch-size",
                     "8", "--steps", "3", "--run-dir", run, "--export", export, "--device", "cpu",
                     env={**ENV, "MINISD_DATA": str(tmp_path / "data")})  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.count("training a ") == 1 and child.stdout.count("exported ") == 1
    assert len((run / "commands.txt").read_text().splitlines()) == 1  # written by rank 0 only
    assert load_tensors(run / CHECKPOINT_NAME)[1]["step"] == 3 and export.is_file()
