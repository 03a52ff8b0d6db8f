"""The bad-input catalogue: what a student gets wrong, and the one clear error each gives.

Every case names what was expected and what was given (and, where there is one, what to do);
each pattern below is matched against the message. The command line's cases run `entry`, the
function behind `python -m minisd`: a bad argument or file is one line on stderr and exit status
1 (argparse's own: 2), no traceback, and no output file is left behind.
"""

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize

from minisd import data, guidance, text
from minisd.checkpoint import load_tensors, save_tensors, write_sidecar
from minisd.cli import entry
from minisd.pretrained import load_autoencoder, load_diffusion, save_autoencoder, save_diffusion
from minisd.sampling import SamplerConfig, ddim_timesteps, sample_ddim, sample_ddpm
from minisd.schedule import NoiseSchedule
from minisd.sd import read_checkpoint
from minisd.train import TrainConfig, fit
from minisd.unet import TINY, UNetModel
from minisd.vae import TINY as TINY_VAE
from minisd.vae import AutoencoderKL

REPO = Path(__file__).resolve().parent.parent
TINY1 = dataclasses.replace(TINY, in_channels=1, out_channels=1)
SCHED = NoiseSchedule("linear", 20)


def _unet(**changes) -> UNetModel:
    torch.manual_seed(0)
    return UNetModel(dataclasses.replace(TINY1, **changes)).eval()


def _x(*shape, fill=None):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if fill is not None:
        x.view(-1)[3] = fill
    return x


def _eps_zero(x, t):
    return torch.zeros_like(x)


def _text_encoder(max_length=8):
    torch.manual_seed(0)
    config = text.TransformerTextConfig(dim=16, heads=2, max_length=max_length)
    return text.TransformerTextEncoder(config)


# (what goes wrong, call, error type, pattern the message must match)
API_CASES = [
    # ----- the U-Net and the autoencoder: shapes they cannot take
    ("unet wrong channel count", lambda: _unet()(_x(2, 3, 8, 8), 5),
     ValueError, r"x must have shape \(B, 1, H, W\).*in_channels=1.*got \(2, 3, 8, 8\)"),
    ("unet size not divisible", lambda: _unet()(_x(2, 1, 9, 9), 5),
     ValueError, r"input size \(9, 9\) must be a multiple of 2.*pad or resize"),
    ("unet missing batch dim", lambda: _unet()(_x(1, 8, 8), 5),
     ValueError, r"x must have shape \(B, 1, H, W\).*got \(1, 8, 8\)"),
    ("unet t of another batch", lambda: _unet()(_x(2, 1, 8, 8), torch.tensor([1, 2, 3])),
     ValueError, r"t must be a scalar or shape \(2,\), got \(3,\)"),
    ("unet label out of range", lambda: _unet(num_classes=10)(_x(2, 1, 8, 8), 5,
                                                            y=torch.tensor([3, 11])),
     ValueError, r"y must be 2 integer labels in \[0, 10\]"),
    ("unet labels for an unconditional model", lambda: _unet()(_x(2, 1, 8, 8), 5,
                                                              y=torch.tensor([1, 2])),
     ValueError, r"not class-conditional.*pass y=None"),
    ("unet text context of the wrong width",
     lambda: _unet(context_dim=16)(_x(2, 1, 8, 8), 5, context=_x(2, 4, 7)),
     ValueError, r"context.*16.*\(2, 4, 7\)"),
    ("vae wrong channel count", lambda: AutoencoderKL(TINY_VAE).encode(_x(2, 1, 8, 8)),
     ValueError, r"must have shape \(B, 3, H, W\).*in_channels=3.*got \(2, 1, 8, 8\)"),
    ("vae size not divisible", lambda: AutoencoderKL(TINY_VAE).encode(_x(2, 3, 7, 7)),
     ValueError, r"image size \(7, 7\) must be a multiple of the downsampling factor 2.*pad"),
    ("vae latent of the wrong channels", lambda: AutoencoderKL(TINY_VAE).decode(_x(2, 3, 4, 4)),
     ValueError, r"\(B, 2, H, W\).*got \(2, 3, 4, 4\)"),
    ("vae input of another dtype", lambda: AutoencoderKL(TINY_VAE).encode(_x(2, 3, 8, 8).double()),
     ValueError, r"x is torch.float64, the autoencoder's weights torch.float32; pass x.to"),
    ("vae latent on another device",
     lambda: AutoencoderKL(TINY_VAE).decode(torch.empty(2, 2, 4, 4, device="meta")),
     ValueError, r"z is on meta, the autoencoder on cpu; pass z.to\('cpu'\)"),
    # ----- schedules and timesteps
    ("unknown schedule", lambda: NoiseSchedule("cosinus", 100),
     ValueError, r"unknown schedule 'cosinus'; choose one of linear"),
    ("one-step schedule", lambda: NoiseSchedule("linear", 1),
     ValueError, r"num_timesteps must be an int >= 2, got 1"),
    ("beta out of (0, 1)", lambda: NoiseSchedule("linear", 100, beta_start=1e-4, beta_end=1.5),
     ValueError, r"beta_start and beta_end must lie in \(0, 1\), got 0.0001 and 1.5"),
    ("timestep = T", lambda: SCHED.add_noise(_x(2, 1, 4, 4), _x(2, 1, 4, 4), torch.tensor([0, 20])),
     ValueError, r"timesteps must lie in \[0, 19\].*got range \[0, 20\]"),
    ("negative timestep", lambda: SCHED.snr(torch.tensor([-1])),
     ValueError, r"timesteps must lie in \[0, 19\].*got range \[-1, -1\]"),
    ("float timestep", lambda: SCHED.snr(torch.tensor([1.5])),
     ValueError, r"timesteps must be integers in \[0, 19\], got dtype torch.float32"),
    # ----- samplers: steps, options, the starting noise
    ("zero sampler steps", lambda: SamplerConfig("ddim", 0),
     ValueError, r"steps must be a positive int, got 0"),
    ("negative sampler steps", lambda: SamplerConfig("dpm++2m", -5),
     ValueError, r"steps must be a positive int, got -5"),
    ("unknown sampler", lambda: SamplerConfig("euler"),
     ValueError, r"unknown sampler 'euler'; choose one of ddim, ddpm, dpm\+\+2m"),
    ("more DDIM steps than timesteps", lambda: ddim_timesteps(20, 50),
     ValueError, r"num_steps must be an int in \[1, 20\] \(the schedule's training steps\), "
                 r"got 50; pick fewer sampling steps"),
    ("NaN eta", lambda: SamplerConfig("ddim", 10, eta=math.nan),
     ValueError, r"eta must be >= 0.*got nan"),
    ("DDPM on fewer steps than T", lambda: SamplerConfig("ddpm", 10).timesteps(1000),
     ValueError, r"DDPM runs all 1000 steps, got 10; for fewer steps use DDIM"),
    ("NaN in x_T", lambda: sample_ddim(_eps_zero, _x(2, 1, 4, 4, fill=math.nan), SCHED,
                                       ddim_timesteps(20, 4)),
     ValueError, r"x_T has 1 non-finite value\(s\) \(NaN or inf\) of 32.*torch.randn"),
    ("inf in x_T", lambda: sample_ddpm(_eps_zero, _x(2, 1, 4, 4, fill=math.inf), SCHED,
                                       range(19, -1, -1)),
     ValueError, r"x_T has 1 non-finite value"),
    ("integer x_T", lambda: sample_ddim(_eps_zero, torch.zeros(2, 1, 4, 4, dtype=torch.long),
                                        SCHED, ddim_timesteps(20, 4)),
     ValueError, r"x_T must be a floating-point tensor.*got torch.int64 \(2, 1, 4, 4\)"),
    ("eps_fn of the wrong shape", lambda: sample_ddim(lambda x, t: x[:, :, :2], _x(2, 1, 4, 4),
                                                      SCHED, ddim_timesteps(20, 4)),
     ValueError, r"eps_fn\(x, t\) must have the shape of x_t \(2, 1, 4, 4\), got \(2, 1, 2, 4\)"),
    ("ascending timesteps", lambda: sample_ddim(_eps_zero, _x(2, 1, 4, 4), SCHED, [0, 5, 10]),
     ValueError, r"strictly descending.*\[0, 5, 10\]"),
    # ----- guidance and prompts
    ("NaN guidance scale", lambda: guidance.check_scale(math.nan),
     ValueError, r"guidance scale must be finite and >= 0.*SD uses 7.5\), got nan"),
    ("negative guidance scale", lambda: guidance.check_scale(-2),
     ValueError, r"guidance scale must be finite and >= 0.*got -2"),
    ("guidance scale not a number", lambda: guidance.check_scale("high"),
     TypeError, r"guidance scale must be a number, got 'high'"),
    ("empty list of prompts", lambda: text.check_prompts([]),
     ValueError, r"empty list of prompts; pass at least one"),
    ("a prompt that is a number", lambda: text.check_prompts(["a seven", 7]),
     TypeError, r"prompts must be strings, got int 7.*caption\(7\)"),
    ("prompts as a tensor", lambda: text.check_prompts(torch.tensor([7])),
     TypeError, r"prompts must be a string or a list of strings, got <class 'torch.Tensor'>"),
    # ----- training settings
    ("zero training steps", lambda: TrainConfig(steps=0),
     ValueError, r"steps and batch_size must be >= 1, got 0, 128"),
    ("NaN learning rate", lambda: TrainConfig(steps=5, lr=math.nan),
     ValueError, r"lr must be > 0, got nan"),
    ("batch larger than the dataset", lambda: fit(_unet(), lambda m, b, g: b[0].mean(),
                                                  (torch.zeros(4, 1, 8, 8),), TrainConfig(1, 8),
                                                  progress=False),
     ValueError, r"batch_size 8 is larger than the dataset \(4 items\)"),
    # ----- datasets
    ("unknown dataset", lambda: data.load_dataset("imagenet"),
     ValueError, r"unknown dataset 'imagenet'; choose one of mnist, fashion_mnist, cifar10"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "call", "error", "pattern"), API_CASES,
                         ids=[c[0] for c in API_CASES])  # fmt: skip
def test_public_api_bad_input(what, call, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        call()
    assert type(info.value) is error or issubclass(type(info.value), error)


def test_training_data_with_a_nan_stops_at_the_first_step():
    x = _x(8, 1, 8, 8, fill=math.nan)
    want = r"the loss is nan at step 0: training stopped before this step's update \(no checkpoint"
    want += r" was written \(pass a run_dir.*lower learning rate.*check the data"
    with pytest.raises(FloatingPointError, match=want):
        fit(_unet(), lambda m, b, g: (m(b[0], 3) - b[0]).pow(2).mean(), (x,), TrainConfig(2, 8),
            progress=False)  # fmt: skip


def test_a_global_batch_that_does_not_split_over_the_processes(monkeypatch):
    from minisd.distributed import World

    monkeypatch.setattr(World, "current", classmethod(lambda cls: cls(0, 3)))
    want = r"batch_size 8 \(the global batch\) does not split over 3 processes; use a multiple of 3"
    with pytest.raises(ValueError, match=want):
        fit(_unet(), lambda m, b, g: b[0].mean(), (_x(16, 1, 8, 8),), TrainConfig(1, 8),
            progress=False)  # fmt: skip


def test_resuming_a_run_that_has_no_checkpoint(tmp_path):
    want = r"cannot resume: no checkpoint.safetensors in run_dir '.*empty'"
    with pytest.raises(FileNotFoundError, match=want):
        fit(_unet(), lambda m, b, g: b[0].mean(), (_x(16, 1, 8, 8),), TrainConfig(1, 8),
            run_dir=str(tmp_path / "empty"), resume=True, progress=False)  # fmt: skip


def test_over_long_prompt_is_truncated_with_a_warning():
    encoder = _text_encoder(max_length=6)
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) longer than the encoder's 6 tokens "
                                         r"were truncated, e.g. 'someone wrote"):  # fmt: skip
        ids = encoder.tokenize(["seven", "someone wrote the number seven by hand, carefully"])
    assert ids.shape == (2, 6)


def test_a_missing_dataset_names_the_folder_the_variable_and_the_command(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_mnist(root=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "download=False" in message
    assert data.DATA_ENV in message and f"python -m minisd.data mnist --root {tmp_path}" in message


def test_x_T_on_another_device_than_the_model():
    model = load_diffusion_like()
    with pytest.raises(ValueError, match=r"x_T is on meta, the model on cpu; pass x_T.to"):
        model.sample(torch.empty(2, 1, 8, 8, device="meta"))


def test_unet_input_of_another_dtype_than_its_weights():
    with pytest.raises(ValueError, match=r"float64.*float32"):
        _unet()(_x(2, 1, 8, 8).double(), 5)


# ----- checkpoint files: missing, another kind, another architecture, damaged ------------------
def load_diffusion_like():
    from minisd.pretrained import DiffusionModel

    return DiffusionModel(_unet(), SCHED, "eps", {})


@pytest.fixture
def diffusion_file(tmp_path):
    """A tiny exported model with its sidecar, as `train --export` writes them."""
    unet = _unet()
    randomize(unet, std=0.05)
    path = save_diffusion(tmp_path / "m.safetensors", unet, SCHED, "eps", dtype=torch.float32)
    write_sidecar(path, {"steps": 1})
    return path


def _flip_bit(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_checkpoint_that_does_not_exist(tmp_path):
    want = r"no diffusion checkpoint at .*nope.safetensors; the shipped ones are in .*--export PATH"
    with pytest.raises(FileNotFoundError, match=want):
        load_diffusion(tmp_path / "nope.safetensors")


def test_a_checkpoint_of_another_kind(tmp_path):
    path = save_autoencoder(tmp_path / "vae.safetensors", AutoencoderKL(TINY_VAE))
    with pytest.raises(ValueError, match=r"vae.safetensors is not a minisd diffusion checkpoint "
                                         r"\(format 'minisd.autoencoder/1'\)"):  # fmt: skip
        load_diffusion(path)


def test_a_checkpoint_whose_weights_are_of_another_architecture(diffusion_file, tmp_path):
    tensors, meta = load_tensors(diffusion_file)
    meta = {k: v for k, v in meta.items() if k != "weights_sha256"}
    meta["unet_config"]["model_channels"] = 16  # says 16 channels; the weights have 8
    path = save_tensors(tmp_path / "edited.safetensors", tensors, meta)
    want = (r"edited.safetensors: the U-Net weights do not fit the U-Net its metadata describes "
            r"\(0 missing.*0 unexpected.*\d+ of another shape, e.g. \['input_blocks.0.0.bias: "
            r"file \(8,\) vs model \(16,\)'.*export it again")  # fmt: skip
    with pytest.raises(ValueError, match=want):
        load_diffusion(path)


def test_a_diffusion_checkpoint_where_an_autoencoder_is_expected(diffusion_file):
    with pytest.raises(ValueError, match=r"not a minisd autoencoder checkpoint"):
        load_autoencoder(diffusion_file)


def test_a_checkpoint_of_another_architecture_for_stable_diffusion(tmp_path):
    from minisd.sd import load_checkpoint

    path = save_tensors(tmp_path / "other.safetensors", {"model.layer.weight": torch.ones(2, 2)})
    want = r"other.safetensors has no SD U-Net under 'model.diffusion_model.'.*LoRA, a VAE"
    with pytest.raises(ValueError, match=want):
        load_checkpoint(path, preset="sd-v1")


def test_a_truncated_checkpoint(diffusion_file):
    raw = diffusion_file.read_bytes()
    diffusion_file.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"m.safetensors is not a readable safetensors file .*"
                                         r"re-download or retrain it"):  # fmt: skip
        load_diffusion(diffusion_file)


def test_a_bit_flipped_in_the_header(diffusion_file):
    _flip_bit(diffusion_file, 12)  # inside the JSON header (its first byte is at offset 8)
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        load_diffusion(diffusion_file)


def test_a_bit_flipped_in_the_weights_is_caught_by_the_sidecar_hash(diffusion_file):
    _flip_bit(diffusion_file, diffusion_file.stat().st_size - 7)  # a weight: still loadable
    want = r"m.safetensors is not the file its sidecar m.json describes .*damaged; copy or download"
    with pytest.raises(ValueError, match=want):
        load_diffusion(diffusion_file)


def test_a_pickle_with_code_named_ckpt_is_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({"state_dict": {"w": torch.ones(1)}, "hook": RunsCode()}, tmp_path / "m.ckpt")
    want = r"m.ckpt could not be read as plain tensors with torch.load\(weights_only=True\)"
    with pytest.raises(ValueError, match=want + r".*convert it"):
        read_checkpoint(tmp_path / "m.ckpt")
    assert not marker.exists()


def test_a_pickle_renamed_safetensors(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"m.safetensors is not a readable safetensors file"):
        read_checkpoint(tmp_path / "m.safetensors")


# ----- the command line ------------------------------------------------------------------------
@pytest.fixture
def unwritable_dir(tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o555)
        yield folder
        folder.chmod(0o755)
    elif not os.access("/sys", os.W_OK) or _cannot_create_in("/sys"):
        yield Path("/sys")  # read-only even for root (containers mount it so)
    else:
        pytest.skip("running as root with no read-only folder to write to")


def _cannot_create_in(folder: str) -> bool:
    try:
        Path(folder, ".minisd_probe").touch()
    except OSError:
        return True
    Path(folder, ".minisd_probe").unlink()
    return False


def run_cli(capsys, *argv):
    code = entry([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


CLI_CASES = [
    # (what goes wrong, argv given the fixture's paths, exit status, stderr pattern)
    ("missing checkpoint", lambda p: ["sample", "--checkpoint", p["dir"] / "no.safetensors",
                                      "--out", p["dir"] / "s.png"],
     1, r"^minisd sample: error: no diffusion checkpoint at .*no.safetensors"),
    ("output folder missing", lambda p: ["sample", "--checkpoint", p["ckpt"],
                                         "--out", p["dir"] / "nowhere" / "s.png"],
     1, r"--out .*s.png: the folder .*nowhere does not exist; create it first"),
    ("output folder unwritable", lambda p: ["sample", "--checkpoint", p["ckpt"],
                                            "--out", p["locked"] / "s.png"],
     1, r"--out .*s.png: cannot write in the folder .*choose a folder you can write to"),
    ("output of an unknown format", lambda p: ["sample", "--checkpoint", p["ckpt"],
                                               "--out", p["dir"] / "s.bmpx"],
     1, r"--out .*s.bmpx: expected a file ending in one of .png"),
    ("zero sampling steps", lambda p: ["sample", "--checkpoint", p["ckpt"], "--steps", "0",
                                       "--out", p["dir"] / "s.png"],
     1, r"steps must be a positive int, got 0"),
    ("unknown sampler", lambda p: ["sample", "--checkpoint", p["ckpt"], "--sampler", "euler"],
     2, r"argument --sampler: invalid choice: 'euler'"),
    ("unknown preset", lambda p: ["train", "--steps", "1", "--preset", "HUGE"],
     2, r"argument --preset: invalid choice: 'HUGE'"),
    ("unknown schedule", lambda p: ["train", "--steps", "1", "--schedule", "cosinus"],
     2, r"argument --schedule: invalid choice: 'cosinus'"),
    ("steps not a number", lambda p: ["train", "--steps", "many"],
     2, r"argument --steps: invalid int value: 'many'"),
    ("zero training steps", lambda p: ["train", "--steps", "0", "--limit", "8"],
     1, r"^minisd train: error: steps and batch_size must be >= 1, got 0"),
    ("training export into a missing folder", lambda p: ["train", "--steps", "1", "--export",
                                                         p["dir"] / "no" / "m.safetensors"],
     1, r"--export .*m.safetensors: the folder .*no does not exist"),
    ("NaN guidance", lambda p: ["generate", "a seven", "--checkpoint", p["ckpt"],
                                "--guidance", "nan", "--out", p["dir"] / "g.png"],
     1, r"^minisd generate: error: guidance scale must be finite and >= 0.*got nan"),
    ("a text prompt for an unconditional model", lambda p: ["sample", "--checkpoint", p["ckpt"],
                                                            "--prompt", "seven"],
     1, r"--prompt: .*m.safetensors is not text-conditioned; leave it out"),
    ("no images asked for", lambda p: ["sample", "--checkpoint", p["ckpt"], "--n", "0",
                                       "--out", p["dir"] / "s.png"],
     1, r"n is the number of images to draw, at least 1; got 0"),
    ("more DDIM steps than the model has", lambda p: ["sample", "--checkpoint", p["ckpt"],
                                                      "--steps", "50", "--out", p["dir"] / "s.png"],
     1, r"error: num_steps must be an int in \[1, 20\] .*got 50; pick fewer sampling steps"),
    ("an unknown device", lambda p: ["sample", "--checkpoint", p["ckpt"], "--device", "tpu",
                                     "--out", p["dir"] / "s.png"],
     1, r"^minisd sample: error: unknown device 'tpu'; use cpu, cuda, cuda:N or mps"),
    ("a damaged checkpoint", lambda p: ["sample", "--checkpoint", p["damaged"],
                                        "--out", p["dir"] / "s.png"],
     1, r"bad.safetensors is not a readable safetensors file"),
]  # fmt: skip


@pytest.fixture
def cli_paths(diffusion_file, tmp_path, unwritable_dir):
    damaged = tmp_path / "bad.safetensors"
    damaged.write_bytes(diffusion_file.read_bytes()[:100])
    return {"dir": tmp_path, "ckpt": diffusion_file, "locked": unwritable_dir, "damaged": damaged}


@pytest.mark.parametrize(("what", "argv", "status", "pattern"), CLI_CASES,
                         ids=[c[0] for c in CLI_CASES])  # fmt: skip
def test_command_line_bad_input(what, argv, status, pattern, cli_paths, capsys, monkeypatch):
    from minisd.cli import diffusion as cli_diffusion

    def no_dataset(*a, **k):
        raise AssertionError("the dataset was read before the arguments were checked")

    monkeypatch.setattr(cli_diffusion, "load_dataset", no_dataset)
    before = sorted(p.name for p in cli_paths["dir"].iterdir())
    with pytest.raises(SystemExit) if status == 2 else _nothing() as info:
        code = entry([str(a) for a in argv(cli_paths)])
    code = info.value.code if status == 2 else code
    err = capsys.readouterr().err
    assert code == status
    assert re.search(pattern, err, re.MULTILINE), err
    assert "Traceback" not in err
    assert err.count("\n") == 1  # one line, whatever went wrong
    if status == 1:
        assert err.rstrip().endswith("(--debug shows the traceback)")
    else:
        assert err.startswith(f"python -m minisd {argv(cli_paths)[0]}: error: argument ")
    assert sorted(p.name for p in cli_paths["dir"].iterdir()) == before  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it(cli_paths, capsys):
    code, err = run_cli(capsys, "sample", "--checkpoint", cli_paths["ckpt"], "--device", "cuda",
                        "--out", cli_paths["dir"] / "s.png")  # fmt: skip
    assert code == 1 and "asked for cuda but torch.cuda.is_available() is False; use 'cpu'" in err


def test_python_m_minisd_data_fails_in_one_line_too(tmp_path, capsys, monkeypatch):
    def offline(*args):
        raise OSError("no network")

    monkeypatch.setattr(data, "_download", offline)
    code = entry(["mnist", "--root", str(tmp_path)], main=data.main, name="python -m minisd.data")
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("python -m minisd.data: error: mnist not found: looked in ")
    assert "downloading failed (OSError: no network)" in err


def test_debug_shows_the_traceback(cli_paths, capsys):
    with pytest.raises(FileNotFoundError, match="no diffusion checkpoint"):
        entry(["sample", "--checkpoint", str(cli_paths["dir"] / "no.safetensors"), "--debug"])


def test_output_paths_are_checked_before_the_model_loads(cli_paths, capsys, monkeypatch):
    from minisd.cli import diffusion as cli_diffusion

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(cli_diffusion, "load_diffusion", no_loading)
    code, err = run_cli(capsys, "sample", "--checkpoint", cli_paths["ckpt"], "--out", "s.png",
                        "--save-tensor", cli_paths["dir"] / "gone" / "s.pt")  # fmt: skip
    assert code == 1 and "--save-tensor" in err and "does not exist" in err


def test_a_failure_while_writing_leaves_no_partial_image(cli_paths, capsys, monkeypatch):
    import matplotlib.pyplot as plt

    def half_then_fail(path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plt, "savefig", half_then_fail)
    out = cli_paths["dir"] / "s.png"
    code, err = run_cli(capsys, "sample", "--checkpoint", cli_paths["ckpt"], "--n", "1",
                        "--steps", "1", "--size", "8", "--out", out)  # fmt: skip
    assert code == 1 and "No space left on device" in err
    assert not out.exists() and not list(cli_paths["dir"].glob(".s.png*"))


def test_python_m_minisd_fails_in_one_line_without_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = [
        sys.executable,
        "-m",
        "minisd",
        "sample",
        "--checkpoint",
        str(tmp_path / "x.safetensors"),
    ]
    child = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert child.returncode == 1
    assert child.stderr.startswith("minisd sample: error: no diffusion checkpoint at ")
    assert child.stderr.count("\n") == 1 and "Traceback" not in child.stderr
    debug = subprocess.run(
        argv + ["--debug"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr


class _nothing:
    """A context manager that expects no exception (the counterpart of pytest.raises)."""

    value = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
