"""Shared by the parity tests: random weights, so that zero-initialised layers cannot hide bugs."""

import torch


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Overwrite every parameter with N(0, std^2) noise from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def tagged(state_dict: dict, prefix: str) -> dict[str, torch.Tensor]:
    """Each tensor of state_dict (meta ones too) as a stride-0 tensor of its shape filled with its
    own index, under prefix: after a key conversion, the values say where each tensor went."""
    return {
        prefix + k: torch.tensor(float(i)).expand(v.shape)
        for i, (k, v) in enumerate(state_dict.items())
    }


def assert_one_to_one(converted: dict[str, torch.Tensor], want: dict, n_ours: int) -> None:
    """converted (from `tagged` tensors) fills every key of want with its shape, and each of our
    n_ours tensors went to exactly one key, whole: no tensor copied twice, none dropped."""
    assert set(converted) == set(want)
    assert all(converted[k].shape == want[k].shape for k in want)
    sources = {}
    for key, value in converted.items():
        first, last = value.flatten()[0].item(), value.flatten()[-1].item()
        assert first == last, f"{key} mixes two of our tensors"
        sources.setdefault(first, []).append(key)
    assert len(sources) == n_ours, f"{n_ours - len(sources)} of our tensors went nowhere"
    assert all(len(keys) == 1 for keys in sources.values()), "one tensor went to several keys"


def save_tiny_text_model(path, timesteps: int):
    """A tiny text-conditioned model (random U-Net, small transformer text encoder) saved to
    path as a float32 checkpoint with a linear schedule of `timesteps` steps; returns the path."""
    import dataclasses

    from minisd.conditioning import TextConditioner
    from minisd.pretrained import save_diffusion
    from minisd.schedule import NoiseSchedule
    from minisd.text import TransformerTextConfig, TransformerTextEncoder
    from minisd.unet import TINY, UNetModel

    torch.manual_seed(0)
    encoder = TransformerTextEncoder(TransformerTextConfig(dim=16, heads=2, max_length=16))
    cfg = dataclasses.replace(TINY, in_channels=1, out_channels=1, context_dim=encoder.dim)
    unet = UNetModel(cfg).eval()
    randomize(unet, std=0.1)
    return save_diffusion(path, unet, NoiseSchedule("linear", timesteps), "eps",
                          conditioner=TextConditioner(encoder), dtype=torch.float32)  # fmt: skip
