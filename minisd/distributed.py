"""Training on several processes: torchrun's process group, DistributedDataParallel, and the
one all-reduce per step that keeps the ranks in step.

torchrun starts one process per GPU and tells each its RANK, LOCAL_RANK and WORLD_SIZE in the
environment; `init_distributed` joins them (NCCL on GPUs, gloo on CPUs). `minisd.train.fit`
asks `World.current()` where it stands and, in a group, trains a `replicate`d model: DDP
averages the gradients during backward, so every rank takes the same optimiser step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place in a distributed run: rank of size (0 of 1 when alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def place(self, device: torch.device) -> torch.device:
        """The device this process trains on: under DDP, GPU number local_rank."""
        if self.size > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    @classmethod
    def current(cls) -> World:
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return cls(dist.get_rank(), dist.get_world_size(), local)


def init_distributed(device: str | None = None) -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR in the
    environment): NCCL on GPUs, gloo on CPUs. A no-op outside torchrun; returns this process's
    World. `python -m minisd train` calls it, so the command runs unchanged under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return World.current()


class Replicated(nn.parallel.DistributedDataParallel):
    """DDP that answers attribute look-ups (config, conditioner) as the model it wraps, so a
    loss_fn written for the bare model runs unchanged on the replicated one."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def replicate(model: nn.Module, device: torch.device) -> Replicated:
    """The model under DDP; its construction copies rank 0's weights to every rank."""
    return Replicated(model, device_ids=[device.index] if device.type == "cuda" else None)


def agree(world: World, loss: torch.Tensor, *flags: bool) -> tuple:
    """In one all-reduce: the global batch's loss (the ranks' mean), and each flag (a signal
    came, out of time) set if any rank set it, so all ranks log the same loss and stop, or
    fail, at the same step. Returns (loss, *flags)."""
    values = torch.tensor([float(f) for f in flags], device=loss.device)
    both = torch.cat([loss.detach().float().reshape(1), values])
    dist.all_reduce(both)
    return (both[0].item() / world.size, *(bool(v > 0) for v in both[1:].tolist()))


def barrier(world: World) -> None:
    """Wait for every rank (none exits while rank 0 is still writing a checkpoint)."""
    if world.size > 1:
        dist.barrier()
