"""Safetensors checkpoints and JSON sidecars, written atomically so a crash never loses a file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, then rename over `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save tensors to a .safetensors file atomically; metadata is stored as JSON strings."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint files end in .safetensors, got {path.name!r}")
    # safetensors refuses shared or non-contiguous storage: store independent contiguous copies.
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))
    return path


def load_tensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load (tensors, metadata) from a .safetensors file written by `save_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; check the path or train one first")
    try:
        tensors = load_file(str(path), device=str(device))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); re-download or retrain it"
        ) from err
    return tensors, {k: json.loads(v) for k, v in raw_meta.items()}


def save_json(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write a JSON sidecar atomically (sorted keys, indented, so diffs stay readable)."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSON file at {path}")
    return json.loads(path.read_text())


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, streamed: ties a sidecar to the exact bytes it describes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_sidecar(weights: str | os.PathLike, sidecar: dict[str, Any]) -> Path:
    """Write the JSON sidecar beside a weights file, tied to its bytes by their SHA-256."""
    weights = Path(weights)
    return save_json(
        weights.with_suffix(".json"), {**sidecar, "weights_sha256": file_sha256(weights)}
    )
