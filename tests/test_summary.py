"""Model introspection: parameter counts and the block-by-block shape trace."""

import dataclasses

import torch

from minisd.summary import count_parameters, format_shapes, trace_shapes
from minisd.unet import TINY, UNetModel


def test_trace_lists_every_unet_block_in_order_with_its_output_shape():
    model = UNetModel(dataclasses.replace(TINY, in_channels=1, out_channels=1))
    records = trace_shapes(model, torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    names = [r.name for r in records]
    n_in, n_out = len(model.input_blocks), len(model.output_blocks)
    assert names == ["time_embed", *[f"input_blocks.{i}" for i in range(n_in)], "middle_block",
                     *[f"output_blocks.{i}" for i in range(n_out)], "out"]  # fmt: skip
    assert records[0].shape == (2, 32) and records[-1].shape == (2, 1, 8, 8)
    assert min(r.shape[-1] for r in records[1:]) == 4  # one downsampling in TINY
    assert sum(r.parameters for r in records) == count_parameters(model)
    assert not any(m._forward_hooks for m in model.modules())  # hooks are removed
    table = format_shapes(records)
    assert table.splitlines()[0].startswith("module") and "(2, 1, 8, 8)" in table


def test_unet_parameter_groups_add_up_and_find_sds_cross_attention() -> None:
    from minisd.summary import unet_parameter_groups
    from minisd.unet import SD_V1, UNetModel

    with torch.device("meta"):
        unet = UNetModel(SD_V1)
    groups = unet_parameter_groups(unet)
    assert sum(groups.values()) == 859_520_964
    # attn2 per transformer of width c: to_q and to_out (c x c, + bias), to_k and to_v (768 x c)
    per = {c: 2 * c * c + 2 * 768 * c + c for c in (320, 640, 1280)}
    assert groups["cross-attention"] == 5 * per[320] + 5 * per[640] + 6 * per[1280]
    assert groups["ResBlocks"] > sum(groups.values()) / 2  # most of SD is convolution
