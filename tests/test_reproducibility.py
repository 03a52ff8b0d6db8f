"""Same seed, same images, on the CPU: every sampler, `generate`, and the command line, in this
process and in a fresh one (one thread everywhere: a sum's order is part of its result)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_text_model

from minisd.evaluation import generate
from minisd.pretrained import load_diffusion

REPO = Path(__file__).resolve().parent.parent
# DDPM draws fresh noise at every step and DDIM with eta > 0 does too: the seed must fix them
SETTINGS = {
    "ddpm": dict(sampler="ddpm", steps=20),
    "ddim": dict(sampler="ddim", steps=5),
    "ddim eta=1": dict(sampler="ddim", steps=5, eta=1.0),
    "dpm++2m": dict(sampler="dpm++2m", steps=5),
}


@pytest.fixture(scope="module")
def text_model_file(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("repro") / "text.safetensors", 20)


@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
def test_every_sampler_draws_the_same_images_from_the_same_seed(text_model_file, setting):
    model = load_diffusion(text_model_file)
    config = model.sampler_config(**setting)

    def draw(seed):
        return generate(model, 3, config, seed, image_size=8, cond=["seven", "two", "one"],
                        guidance_scale=2.0, batch_size=2)  # fmt: skip

    first = draw(seed=4)
    assert torch.equal(draw(seed=4), first)
    assert not torch.allclose(draw(seed=5), first, atol=1e-3)  # the seed is what decides


def test_generate_on_the_command_line_draws_what_it_drew_in_another_process(
    text_model_file, tmp_path, one_thread
):
    argv = [sys.executable, "-m", "minisd", "generate", "seven", "two", "--checkpoint",
            str(text_model_file), "--n", "2", "--steps", "4", "--sampler", "ddim", "--guidance",
            "3", "--seed", "11", "--out", ""]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    drawn = []
    for name in ("a.pt", "b.pt"):
        child = subprocess.run([*argv, "--save-tensor", str(tmp_path / name)], env=env,
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        assert child.returncode == 0, child.stderr
        drawn.append(torch.load(tmp_path / name))
    assert torch.equal(drawn[0], drawn[1])
    model = load_diffusion(text_model_file)
    here = generate(model, 4, model.sampler_config("ddim", 4), 11,
                    cond=["seven", "seven", "two", "two"], guidance_scale=3.0)  # fmt: skip
    assert torch.equal(here, drawn[0])
