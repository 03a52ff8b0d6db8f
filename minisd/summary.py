"""Look inside a model: parameter counts and the shape of every block's output on a forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ShapeRecord:
    name: str  # the module's name in the state dict, e.g. "input_blocks.3"
    kind: str  # its class name and the types inside it, e.g. "ResBlock+SpatialTransformer"
    shape: tuple[int, ...]  # output shape
    parameters: int


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Sequential) and len(module) and type(module).__name__ != "Sequential":
        return "+".join(type(m).__name__ for m in module)
    return type(module).__name__


@torch.no_grad()
def trace_shapes(model: nn.Module, *inputs, depth: int = 1, **kwargs) -> list[ShapeRecord]:
    """Run model(*inputs, **kwargs) and record the output shape of each module `depth` levels down.

    Children of ModuleLists count as the same level, so for a U-Net depth=1 lists every input
    block, the middle block, every output block and `out`.
    """
    records: list[ShapeRecord] = []
    hooks = []
    for name, module in _modules_at_depth(model, depth):

        def hook(mod, args, output, name=name):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
            records.append(ShapeRecord(name, _kind(mod), shape, count_parameters(mod)))

        hooks.append(module.register_forward_hook(hook))
    try:
        model(*inputs, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return records


def _modules_at_depth(model: nn.Module, depth: int):
    level = [(name, m) for name, m in model.named_children()]
    for _ in range(depth - 1):
        level = [(f"{n}.{c}", cm) for n, m in level for c, cm in m.named_children()] or level
    expanded = []
    for name, module in level:
        if isinstance(module, nn.ModuleList):
            expanded += [(f"{name}.{i}", m) for i, m in enumerate(module)]
        else:
            expanded.append((name, module))
    return expanded


def format_shapes(records: list[ShapeRecord]) -> str:
    """A fixed-width table of trace_shapes' records (stable text, good for notebooks)."""
    rows = [f"{'module':<18}{'what':<38}{'output shape':<22}{'params':>10}"]
    for r in records:
        rows.append(f"{r.name:<18}{r.kind:<38}{str(r.shape):<22}{r.parameters:>10,}")
    return "\n".join(rows)


# Where a U-Net's parameters live, by what the parameter does (ldm's names say it).
UNET_GROUPS = (
    ("self-attention", (".attn1.",)),
    ("cross-attention", (".attn2.",)),
    ("transformer feed-forward", (".ff.",)),
    ("transformer projections and norms", (".proj_in.", ".proj_out.", ".norm", ".norm1.")),
    ("time embedding", ("time_embed.", "label_emb.")),
)


def unet_parameter_groups(unet: nn.Module) -> dict[str, int]:
    """Parameters of a `UNetModel` by role: the attention and feed-forward layers of its
    transformers, its ResBlocks, the time embedding, and the rest (first and last convolutions,
    down- and upsampling). Works on the meta device."""
    from minisd.unet import ResBlock

    in_resblock = {
        f"{name}.{p}" for name, m in unet.named_modules() if isinstance(m, ResBlock)
        for p, _ in m.named_parameters()
    }  # fmt: skip
    groups = {name: 0 for name, _ in UNET_GROUPS} | {"ResBlocks": 0, "other convolutions": 0}
    for name, p in unet.named_parameters():
        if name in in_resblock:
            groups["ResBlocks"] += p.numel()
            continue
        for group, marks in UNET_GROUPS:
            if any(mark in "." + name for mark in marks):
                groups[group] += p.numel()
                break
        else:
            groups["other convolutions"] += p.numel()
    return groups
