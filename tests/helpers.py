"""Shared by the parity tests: random weights, so that zero-initialised layers cannot hide bugs."""

import torch


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Overwrite every parameter with N(0, std^2) noise from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
