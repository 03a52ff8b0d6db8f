"""One training loop for every model in the course: AdamW, EMA, clipping, AMP, atomic resume.

`fit(model, loss_fn, data, config)` trains any module whose loss is `loss_fn(model, batch, gen)`.
The batch order and each step's random draws (timesteps, noise, label dropout, and nn.Dropout's
masks from torch's global RNG, seeded per step) are pure functions of (seed, step), and the
checkpoint keeps the losses not yet logged, so a run that is stopped and resumed from its
checkpoint continues exactly as if it had never stopped: weights and loss history alike.
Ctrl-C or SIGTERM stops it after the current step with such a checkpoint; a non-finite loss
stops it before the update. Under torchrun it trains with DistributedDataParallel
(`minisd.distributed`). The objective it trains a diffusion model on is
`minisd.diffusion.diffusion_loss_fn`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minisd.checkpoint import load_tensors, save_tensors
from minisd.course import LossFn, get_device
from minisd.course import progress as progress_bar
from minisd.distributed import World, agree, barrier, replicate

CHECKPOINT_NAME = "checkpoint.safetensors"
# Mixing constants so (seed, step) pairs never share a random stream.
_STEP_SEED_MULT, _EPOCH_SEED_MULT = 1_000_003, 7_919
# torch's CPU generator keeps only the low 32 bits of a seed, so the global RNG's seed for a step
# (dropout draws from it) is drawn from the step's own seed: a stream unlike the step generator's.
_GLOBAL_SEED_RANGE = 2**62
# Under DistributedDataParallel rank r draws its shard's noise from its own stream; rank 0's is
# the single-process one. Runs never reach 2**40 steps, so no (step, rank) pairs collide.
_RANK_SEED_OFFSET = 2**40
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; `steps` is the total, so a resumed run may raise it to go on."""

    steps: int
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay_steps: int = 0  # lr falls linearly to 0 over the last decay_steps steps
    ema_decay: float | None = 0.999
    grad_clip: float | None = 1.0
    mixed_precision: bool = True  # only on CUDA; CPU always trains in float32
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    max_seconds: float | None = None  # stop early once training has taken this long (wall clock)
    # torch.compile the model for the training step (inductor). Off by default: on a 2-core CPU
    # compiling the small text U-Net's step takes minutes and then runs no faster than eager
    # (bench group `compile`); on a GPU it can pay. The first step's time includes compiling.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise ValueError("log_every and checkpoint_every must be >= 1")
        if not 0 <= self.decay_steps <= self.steps or self.warmup_steps < 0:
            raise ValueError(
                f"decay_steps must be in [0, steps={self.steps}] and warmup_steps >= 0, "
                f"got {self.decay_steps} and {self.warmup_steps}"
            )
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0 or None, got {self.max_seconds}")


# Settings that must match when resuming (changing them would make a different run).
_RESUME_MUST_MATCH = ("batch_size", "lr", "weight_decay", "warmup_steps", "ema_decay", "seed")


@dataclass
class TrainResult:
    model: nn.Module
    ema: nn.Module | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    step: int = 0
    compile_seconds: float | None = None  # with config.compile: the first step, compiling included

    @property
    def sampling_model(self) -> nn.Module:
        """The EMA weights if there are any (they sample better), else the raw model."""
        return self.ema if self.ema is not None else self.model


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch at `step`: a new permutation per epoch, last partial batch dropped."""
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n} items)")
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(
        n, generator=torch.Generator().manual_seed(seed * _EPOCH_SEED_MULT + epoch)
    )
    return perm[i * batch_size : (i + 1) * batch_size]


def _step_seed(seed: int, step: int, rank: int = 0) -> int:
    return seed * _STEP_SEED_MULT + step + rank * _RANK_SEED_OFFSET


def step_generator(seed: int, step: int, device: torch.device, rank: int = 0) -> torch.Generator:
    """The generator for one step's random draws (timesteps, noise, dropout of labels); under
    DistributedDataParallel, `rank`'s own (rank 0 draws what a single process would)."""
    return torch.Generator(device=device).manual_seed(_step_seed(seed, step, rank))


@contextlib.contextmanager
def seeded_global_rng(seed: int, step: int, device: torch.device, rank: int = 0):
    """Seed torch's global RNG from (seed, step, rank) for one step, and restore it afterwards.

    Modules such as nn.Dropout draw from the global RNG, not from a generator we pass; seeding it
    per step makes those draws a function of (seed, step) too, so a resumed run repeats them.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        seeder = torch.Generator().manual_seed(_step_seed(seed, step, rank))
        step_seed = int(torch.randint(_GLOBAL_SEED_RANGE, (1,), generator=seeder))
        torch.default_generator.manual_seed(step_seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(step_seed)
        yield


def _lr_at(config: TrainConfig, step: int) -> float:
    """Warm up linearly, hold lr, then (if decay_steps) fall linearly to 0 at the last step.

    Warmup-stable-decay: the constant phase can be resumed and extended at will, and a decay can
    be branched off any of its checkpoints, which is why decay_steps may change on resume.
    """
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    left = config.steps - step
    if config.decay_steps and left <= config.decay_steps:
        return config.lr * left / config.decay_steps
    return config.lr


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- decay * ema + (1 - decay) * model, with decay warmed up over the first steps.

    One foreach call over all parameters (a loop of per-tensor lerps costs a Python round trip
    per tensor, which small models notice)."""
    decay = min(decay, (1 + step) / (10 + step))
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if len(ema_params) != len(params):
        raise ValueError(f"ema has {len(ema_params)} parameters, the model {len(params)}")
    torch._foreach_lerp_(ema_params, params, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def make_optimizer(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW as every training loop here builds it: the fused kernel (one pass over all
    parameters, on CPU as on CUDA) where torch has it for these tensors, else the foreach one.

    Same update as the per-parameter loop to float tolerance; on the small text U-Net the
    optimiser step was ~6% of a CPU training step (bench/profiles/train-text.txt)."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None,
                             foreach=None if fused else True)  # fmt: skip


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped `fit` between two steps; with a run_dir, a checkpoint
    of the step it stopped at was written first, so `resume=True` goes on exactly."""

    def __init__(self, message: str, signum: int, result: TrainResult) -> None:
        super().__init__(message)
        self.signum, self.result = signum, result


@contextlib.contextmanager
def _stop_requests():
    """Turn SIGINT/SIGTERM into a request to stop after the current step (a dict's "signum").

    The first signal only sets the request and puts the previous handlers back, so a second
    Ctrl-C stops at once (the atomic save still keeps the last checkpoint whole). Signals can
    only be caught in the main thread; elsewhere a run stops as it would without this.
    """
    request: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def handler(signum, frame):
        request["signum"] = signum
        for s, h in previous.items():
            signal.signal(s, h)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _out_of_time(config: TrainConfig, t0: float) -> bool:
    return config.max_seconds is not None and time.perf_counter() - t0 >= config.max_seconds


def _interrupted(
    signum: int | None, result: TrainResult, ckpt: Path | None, world: World
) -> TrainingInterrupted:
    """What a stop request ends in, once the step's checkpoint is written (and, under DDP,
    every rank knows it is: none exits while rank 0 is still saving)."""
    barrier(world)
    signum = signum or signal.SIGTERM  # under DDP another rank may have had the signal
    name = signal.Signals(signum).name
    if ckpt is not None:
        then = f"checkpoint of step {result.step} in {ckpt.parent}; continue with --resume"
    else:
        then = "nothing saved (no run_dir)"
    return TrainingInterrupted(f"{name}: training stopped after step {result.step}, {then}",
                               signum, result)  # fmt: skip


def _not_finite(loss: float, step: int, ckpt: Path | None) -> FloatingPointError:
    if ckpt is None:
        kept = "no checkpoint was written (pass a run_dir to keep one)"
    elif ckpt.is_file():
        kept = f"{ckpt} keeps the last good state"
    else:
        kept = f"no checkpoint yet in {ckpt.parent}"
    return FloatingPointError(
        f"the loss is {loss} at step {step}: training stopped before this step's update ({kept}). "
        "Try a lower learning rate (--lr), a longer warm-up (--warmup), or float32 instead of "
        "mixed precision (TrainConfig(mixed_precision=False), `train --fp32`); check the data for "
        "NaN/inf"
    )


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[torch.Tensor, ...],
    config: TrainConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[dict[str, float]], None] | None = None,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train `model` in place for config.steps steps; checkpoint to run_dir; resume if asked.

    SIGINT/SIGTERM stop it after the current step with a checkpoint (`TrainingInterrupted`).
    In a process group (torchrun, `init_distributed`) it trains with DistributedDataParallel:
    each rank takes its share of config.batch_size (the global batch), DDP averages the
    gradients, and rank 0 alone keeps the EMA, logs progress and writes the checkpoint.
    """
    data = _check_data(data)
    world = World.current()
    if config.batch_size % world.size:
        raise ValueError(
            f"batch_size {config.batch_size} (the global batch) does not split over "
            f"{world.size} processes; use a multiple of {world.size}"
        )
    device = world.place(get_device(None if device is None else str(device)))
    model.to(device).train()
    lead = world.rank == 0  # the one process that keeps the EMA, logs and saves
    ema = copy.deepcopy(model).eval().requires_grad_(False) if config.ema_decay and lead else None
    optimizer = make_optimizer(model.parameters(), config.lr, config.weight_decay)
    use_scaler = (
        config.mixed_precision and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    result = TrainResult(model, ema)
    ckpt = Path(run_dir) / CHECKPOINT_NAME if run_dir is not None else None
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT_NAME} in run_dir {run_dir!r}")
        window = _load_state(ckpt, result, optimizer, config)
    else:
        window = []  # losses since the last logged record
    net = model
    if world.size > 1:  # after loading: DDP starts every rank from rank 0's weights
        net = replicate(model, device)
    if config.compile:  # compiled lazily, in the first step: its time is reported
        net = torch.compile(net)
    start, t0 = result.step, time.perf_counter() - result.seconds
    bar = progress_bar(range(start, config.steps), progress and lead, desc="train", initial=start,
                       total=config.steps)  # fmt: skip
    with _stop_requests() as stop:
        for step in bar:
            idx = batch_indices(len(data[0]), config.batch_size, step, config.seed)
            idx = idx[world.rank :: world.size]  # this rank's share, as DistributedSampler deals
            batch = tuple(d[idx].to(device, non_blocking=True) for d in data)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(config, step)
            with (
                seeded_global_rng(config.seed, step, device, world.rank),
                _autocast(device, config.mixed_precision),
            ):
                loss = loss_fn(net, batch, step_generator(config.seed, step, device, world.rank))
            if world.size > 1:  # the ranks agree now on the loss and on whether to stop
                loss_value, signalled, out_of_time = agree(
                    world, loss, stop["signum"] is not None, _out_of_time(config, t0)
                )
            else:
                loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise _not_finite(loss_value, step, ckpt)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                update_ema(ema, model, config.ema_decay, step)
            window.append(loss_value)
            if config.compile and result.compile_seconds is None:
                result.compile_seconds = time.perf_counter() - t0 - result.seconds
            result.step = step + 1
            if world.size == 1:  # alone, the clock is read after the step
                out_of_time = _out_of_time(config, t0)
            last = result.step == config.steps or out_of_time
            # An interrupted step logs nothing extra (its losses wait in the checkpoint's log
            # window), so the resumed run's records are the uninterrupted run's.
            if result.step % config.log_every == 0 or last:
                record = {
                    "step": result.step,
                    "loss": sum(window) / len(window),
                    "lr": _lr_at(config, step),
                }
                record["seconds"] = result.seconds = time.perf_counter() - t0
                result.history.append(record)
                window.clear()
                if progress and lead and hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                if callback is not None and lead:
                    callback(record)
            if world.size == 1:  # a signal during the step or its callback stops after it
                signalled = stop["signum"] is not None
            if (
                ckpt is not None
                and lead
                and (result.step % config.checkpoint_every == 0 or last or signalled)
            ):
                result.seconds = time.perf_counter() - t0
                _save_state(ckpt, result, optimizer, config, window)
            if signalled:
                raise _interrupted(stop["signum"], result, ckpt, world)
            if out_of_time:
                break
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result


def _check_data(data: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    if isinstance(data, torch.Tensor):
        data = (data,)
    if not data or any(len(d) != len(data[0]) for d in data):
        raise ValueError(
            f"data must be a tuple of tensors with one length, got {[len(d) for d in data]}"
        )
    return tuple(data)


def _save_state(
    path: Path,
    result: TrainResult,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    window: list[float],
) -> None:
    tensors = {f"model.{k}": v for k, v in result.model.state_dict().items()}
    if result.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in result.ema.state_dict().items()})
    opt = optimizer.state_dict()
    for i, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{i}.{name}"] = torch.as_tensor(value)
    meta = {"step": result.step, "seconds": result.seconds, "history": result.history}
    # Losses not yet logged: when log_every does not divide checkpoint_every, the next record
    # averages steps from before and after the checkpoint. (JSON keeps floats exactly.)
    meta["log_window"] = window
    meta["config"] = dataclasses.asdict(config)
    save_tensors(path, tensors, meta)


def _load_state(
    path: Path, result: TrainResult, optimizer: torch.optim.Optimizer, config: TrainConfig
) -> list[float]:
    """Restore model, EMA, optimiser and history from `path`; return the unlogged losses."""
    tensors, meta = load_tensors(path)
    saved = meta.get("config", {})
    changed = [k for k in _RESUME_MUST_MATCH if saved.get(k) != getattr(config, k)]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)} -> {getattr(config, k)}" for k in changed)
        raise ValueError(f"cannot resume {path}: settings differ ({diffs}); use a new run_dir")
    if meta["step"] >= config.steps:
        raise ValueError(f"{path} is already at step {meta['step']}; raise steps above it to go on")
    device = next(result.model.parameters()).device
    result.model.load_state_dict(_strip(tensors, "model."))
    if result.ema is not None:
        result.ema.load_state_dict(_strip(tensors, "ema."))
    opt = optimizer.state_dict()
    opt["state"] = {}
    for i, _ in enumerate(p for g in opt["param_groups"] for p in g["params"]):
        state = _strip(tensors, f"optim.{i}.")
        if state:
            opt["state"][i] = {k: v.to(device) if k != "step" else v for k, v in state.items()}
    optimizer.load_state_dict(opt)
    result.step, result.seconds, result.history = meta["step"], meta["seconds"], meta["history"]
    return list(meta.get("log_window", []))


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def throughput(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[torch.Tensor, ...],
    batch_size: int,
    steps: int = 5,
):
    """Images per second of training steps (after one warm-up step), for planning runs."""
    config = TrainConfig(steps=steps + 1, batch_size=batch_size, ema_decay=None, log_every=1)
    times: list[float] = []
    fit(model, loss_fn, data, config, progress=False, callback=lambda r: times.append(r["seconds"]))
    return batch_size * steps / (times[-1] - times[0]) if len(times) > 1 else math.nan
