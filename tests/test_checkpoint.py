"""Checkpoint files: round trip, atomic replacement, clear errors."""

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
