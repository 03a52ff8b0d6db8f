"""Checkpoint files: round trip, atomic replacement, clear errors."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch

from minisd import checkpoint


def test_round_trip_with_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    w = torch.randn(3, 4)
    checkpoint.save_tensors(path, {"w": w, "w_t": w.t()}, {"step": 7, "config": {"a": [1, 2]}})
    tensors, meta = checkpoint.load_tensors(path)
    torch.testing.assert_close(tensors["w_t"], w.t())
    assert meta == {"step": 7, "config": {"a": [1, 2]}}


def test_crash_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoint.save_tensors(path, {"w": torch.ones(2)})
    with (
        mock.patch.object(checkpoint, "save_file", side_effect=KeyboardInterrupt),
        pytest.raises(KeyboardInterrupt),
    ):
        checkpoint.save_tensors(path, {"w": torch.zeros(2)})
    tensors, _ = checkpoint.load_tensors(path)
    torch.testing.assert_close(tensors["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp files left


def _write_both(folder, step):
    checkpoint.save_tensors(folder / "m.safetensors", {"w": torch.full((1000,), float(step))})
    checkpoint.save_json(folder / "m.json", {"step": step})


def _assert_still_step(folder, step):
    tensors, _ = checkpoint.load_tensors(folder / "m.safetensors")
    torch.testing.assert_close(tensors["w"], torch.full((1000,), float(step)))
    assert checkpoint.load_json(folder / "m.json") == {"step": step}


def test_a_failing_rename_after_the_bytes_were_written_keeps_the_old_files(tmp_path):
    _write_both(tmp_path, 1)
    written = []

    def full_disk(src, dst):  # the new bytes are all in the temporary file by now
        written.append(os.path.getsize(src))
        raise OSError(errno.ENOSPC, "No space left on device")

    with mock.patch.object(checkpoint.os, "replace", side_effect=full_disk):
        with pytest.raises(OSError, match="No space left"):
            checkpoint.save_tensors(tmp_path / "m.safetensors", {"w": torch.zeros(1000)})
        with pytest.raises(OSError, match="No space left"):
            checkpoint.save_json(tmp_path / "m.json", {"step": 2})
    assert len(written) == 2 and written[0] > 4000  # 1,000 float32 values reached the disk
    _assert_still_step(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


# The writer is killed (SIGKILL: no cleanup, no finally) after half of the new bytes are on disk.
KILLED_WRITER = textwrap.dedent(
    """
    import os, pathlib, signal, sys
    import torch
    from safetensors.torch import save
    from minisd import checkpoint

    def half_then_die(data, filename):
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_file = lambda t, filename, metadata=None: half_then_die(
        save(t, metadata=metadata), filename
    )
    pathlib.Path.write_text = lambda self, text, *a, **k: half_then_die(text.encode(), self)
    folder = pathlib.Path(sys.argv[1])
    if sys.argv[2] == "tensors":
        checkpoint.save_tensors(folder / "m.safetensors", {"w": torch.zeros(1000)})
    else:
        checkpoint.save_json(folder / "m.json", {"step": 2, "padding": "x" * 1000})
    """
)


@pytest.mark.parametrize("what", ["tensors", "json"])
def test_a_writer_killed_mid_save_leaves_the_previous_file_intact(tmp_path, what):
    _write_both(tmp_path, 1)
    child = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path), what], capture_output=True, text=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr  # it died in the middle of the save
    _assert_still_step(tmp_path, 1)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        checkpoint.save_tensors(tmp_path / "m.pt", {"w": torch.ones(1)})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_tensors(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        checkpoint.load_tensors(junk)


def test_json_sidecar(tmp_path):
    path = checkpoint.save_json(tmp_path / "a" / "m.json", {"b": 1, "a": 2})
    assert path.read_text().startswith('{\n  "a": 2')
    assert checkpoint.load_json(path) == {"a": 2, "b": 1}


def test_written_files_are_readable_by_others(tmp_path):
    path = checkpoint.save_tensors(tmp_path / "m.safetensors", {"w": torch.ones(1)})
    assert path.stat().st_mode & 0o777 == 0o644
    assert checkpoint.save_json(tmp_path / "m.json", {}).stat().st_mode & 0o777 == 0o644


def test_missing_folders_are_created_and_the_temp_file_sits_beside_the_target(tmp_path):
    target = tmp_path / "runs" / "a" / "m.safetensors"  # two folder levels that do not exist
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    with mock.patch.object(checkpoint.os, "replace", spy):
        checkpoint.save_tensors(target, {"w": torch.ones(2)})
        checkpoint.save_json(tmp_path / "x" / "y" / "m.json", {"a": 1})
    assert target.is_file() and (tmp_path / "x" / "y" / "m.json").is_file()
    # A rename is atomic only within one file system: the temporary file must be a sibling.
    for src, dst in renames:
        assert os.path.dirname(src) == os.path.dirname(dst)
        assert os.path.basename(src).startswith("." + os.path.basename(dst) + ".")
    assert len(renames) == 2
