"""minisd.pipeline and `python -m minisd sd`: the cost estimate, dtypes, and SD's pipeline run end
to end with random weights (slow: it builds the full 1.07B-parameter model)."""

from __future__ import annotations

import pytest
import torch
from test_sd import small_sd

from minisd import pipeline
from minisd.sampling import SD_V1_SAMPLER


def test_fp16_is_refused_on_a_cpu_and_unknown_dtypes_are_named() -> None:
    assert pipeline.check_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="on a CPU use bf16"):
        pipeline.check_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        pipeline.check_dtype("int8", "cpu")


def test_the_estimate_counts_flops_that_grow_with_the_latents_and_guidance() -> None:
    sd = small_sd()
    flops_8, peak_8 = pipeline.unet_cost(sd, 8, 1)
    flops_16, peak_16 = pipeline.unet_cost(sd, 16, 1)
    assert 3.5 < flops_16 / flops_8 < 6  # 4x the pixels, a little more for attention
    assert peak_16 > peak_8 > 0
    guided = pipeline.estimate(sd, image_size=32, n=2, steps=5, guidance_scale=7.5)
    plain = pipeline.estimate(sd, image_size=32, n=2, steps=5, guidance_scale=1.0)
    assert guided.flops == pytest.approx(2 * plain.flops, rel=0.01) and guided.unet_calls == 10
    assert plain.weights_bytes == 4 * sum(
        p.numel() for m in sd.parts().values() for p in m.parameters()
    )
    assert "GiB" in str(guided) and guided.seconds > 0


def test_sampler_for_keeps_sds_settings() -> None:
    config = pipeline.sampler_for("dpm++2m", 20)
    assert config.sampler == "dpm++2m" and config.steps == 20
    assert config.steps_offset == SD_V1_SAMPLER.steps_offset == 1
    assert config.final_alpha_cumprod is None and config.clip_x0 is None


def test_text_to_image_with_the_small_model_is_seeded_and_guided() -> None:
    sd = small_sd()
    config = pipeline.sampler_for("ddim", 3)
    a = pipeline.text_to_image(sd, ["a cat", "a dog"], image_size=16, config=config,
                               guidance_scale=5.0, progress=False)  # fmt: skip
    b = pipeline.text_to_image(sd, ["a cat", "a dog"], image_size=16, config=config,
                               guidance_scale=5.0, progress=False)  # fmt: skip
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    c = pipeline.text_to_image(sd, ["a cat", "a dog"], image_size=16, config=config,
                               guidance_scale=1.0, progress=False)  # fmt: skip
    assert not torch.allclose(a, c)


@pytest.mark.slow
def test_the_sd_command_runs_sd_v1_with_random_weights_and_says_so(tmp_path, capsys) -> None:
    from minisd import cli

    out = tmp_path / "sd.png"
    cli.main(["sd", "--random-weights", "sd-v1", "a photo of a cat", "--size", "256",
              "--steps", "2", "--sampler", "dpm++2m", "--negative", "blurry", "--out",
              str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "memory: weights 4.0 GiB" in printed and "TFLOP" in printed
    assert "UNTRAINED" in printed and out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="--checkpoint FILE"):
        cli.main(["sd", "a cat", "--out", str(out)])


def test_a_bf16_model_samples_under_the_fp32_sampler() -> None:
    config = pipeline.sampler_for("ddim", 3)
    want = pipeline.text_to_image(small_sd(), ["a cat"], image_size=16, config=config,
                                  progress=False)  # fmt: skip
    got = pipeline.text_to_image(small_sd().to(dtype=torch.bfloat16), ["a cat"], image_size=16,
                                 config=config, progress=False)  # fmt: skip
    assert got.dtype == torch.float32
    assert (got - want).abs().mean() < 0.05  # bf16 keeps ~3 significant digits


def test_the_sd_command_counts_the_unet_steps_each_mode_runs() -> None:
    from argparse import Namespace

    from minisd.cli.sd import _unet_steps

    args = Namespace(steps=50, strength=0.6, repaint=1)
    assert _unet_steps(args, None, None) == 50  # text to image
    assert _unet_steps(args, "image", None) == 30  # img2img runs the strength's share
    assert _unet_steps(args, "image", "mask") == 50  # inpainting by replacement: every step
    args.repaint = 5  # RePaint redoes each step but the last 5 times
    assert _unet_steps(args, "image", "mask") == 50 + 49 * 4
