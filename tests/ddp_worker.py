"""One process of the two-process tests in test_distributed.py, started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py \
        fixed|diffusion OUT.safetensors [--run-dir DIR] [--resume] [--steps N] [--signal-at K]

Rank 0 writes the trained model, its EMA and the loss history to OUT.
"""

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minisd.checkpoint import save_tensors  # noqa: E402
from minisd.distributed import barrier, init_distributed  # noqa: E402
from minisd.schedule import NoiseSchedule  # noqa: E402
from minisd.train import TrainConfig, TrainingInterrupted, fit  # noqa: E402
from minisd.unet import TINY, UNetModel  # noqa: E402

SCHED = NoiseSchedule("linear", 100)


def fixed_draws_run(steps: int = 4):
    """The diffusion objective with each image's t and noise drawn once, into the dataset: the
    loss draws nothing, so a global batch gives one gradient however it is split over ranks."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, SCHED.num_timesteps, (32,), generator=g)
    torch.manual_seed(0)
    model = UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1))

    def loss_fn(model, batch, gen):
        x0, noise, t = batch
        return torch.nn.functional.mse_loss(model(SCHED.add_noise(x0, noise, t), t), noise)

    config = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9,
                         log_every=1)  # fmt: skip
    return model, loss_fn, (x0, noise, t), config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("fixed", "diffusion"))
    parser.add_argument("out")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--signal-at", type=int, default=None, help="rank 1 gets SIGTERM then")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = init_distributed("cpu")
    assert world.size == 2, world
    if args.kind == "fixed":
        model, loss_fn, data, config = fixed_draws_run()
    else:
        from test_faults import tiny_run

        model, loss_fn, data, config = tiny_run(seed=world.rank)  # DDP syncs rank 0's weights
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    calls = []

    def signalled_loss(model, batch, gen):
        calls.append(1)
        if world.rank == 1 and len(calls) == args.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # rank 0 must stop at the same step
        return loss_fn(model, batch, gen)

    try:
        result = fit(model, signalled_loss, data, config, args.run_dir, args.resume,
                     progress=False, device="cpu")  # fmt: skip
    except TrainingInterrupted as err:
        print(f"rank {world.rank}: {err}", flush=True)
        barrier(world)  # both ranks stopped at the same step; tear down together
        torch.distributed.destroy_process_group()
        sys.exit(128 + err.signum)
    if world.rank == 0:
        tensors = {f"model.{k}": v for k, v in result.model.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in result.ema.state_dict().items()}
        save_tensors(args.out, tensors, {"history": result.history, "step": result.step})
    else:
        assert result.ema is None  # rank 0 alone keeps it
    # Tearing gloo down while rank 0 still saves crashed rank 1 once ("terminate called
    # without an active exception", SIGABRT): wait for each other first.
    barrier(world)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
