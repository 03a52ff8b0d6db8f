"""Data loading: real MNIST when $MINISD_DATA has it, else small fixtures in the real formats."""

import dataclasses
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from minisd import data


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_idx_split(folder: Path, split: str, n: int, gz: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    ext = ".gz" if gz else ""
    write_idx(folder / f"{split}-images-idx3-ubyte{ext}", images)
    write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", labels)
    return images


def write_cifar(root: Path, n_per_batch: int = 4) -> dict[str, np.ndarray]:
    """A miniature cifar-10-batches-py/ in CIFAR's pickle layout (N x 3072 uint8, RGB planes)."""
    folder = root / data.CIFAR_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in data.CIFAR_TRAIN + data.CIFAR_TEST:
        arr = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        batch = {"batch_label": name, "labels": list(rng.integers(0, 10, n_per_batch)), "data": arr,
                 "filenames": [f"{name}_{i}.png" for i in range(n_per_batch)]}  # fmt: skip
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = arr
    return written


needs_mnist = pytest.mark.skipif(
    not (data.data_root() / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists(),
    reason="real MNIST not in the data folder (set MINISD_DATA, as .ci/run does)",
)


@needs_mnist
def test_real_mnist_test_split():
    x, y = data.load_mnist(train=False, download=False)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # published first test labels
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_mnist
def test_real_mnist_train_limit_and_statistics():
    x, y = data.load_mnist(train=True, download=False, limit=1000)
    assert x.shape == (1000, 1, 28, 28) and y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    full, _ = data.load_mnist(train=True, download=False)
    pixels01 = (full + 1) / 2  # the published statistics are for pixels / 255
    assert pixels01.mean().item() == pytest.approx(0.1307, abs=1e-4)
    assert pixels01.std().item() == pytest.approx(0.3081, abs=1e-4)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_fixture_raw_and_gzipped(tmp_path, gz):
    images = write_idx_split(tmp_path / "MNIST" / "raw", "t10k", 7, gz)
    x, y = data.load_mnist(train=False, root=tmp_path, download=False)
    assert x.shape == (7, 1, 28, 28) and y.shape == (7,) and y.dtype == torch.long
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 127.5 - 1)


def test_fashion_mnist_from_debian_folder(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    write_idx_split(debian, "train", 5, gz=True)
    spec = dataclasses.replace(data._FASHION, extra_dirs=(debian,))
    monkeypatch.setattr(data, "_FASHION", spec)
    x, y = data.load_fashion_mnist(train=True, root=tmp_path / "empty", download=False, limit=3)
    assert x.shape == (3, 1, 28, 28) and len(y) == 3
    assert len(data.FASHION_MNIST_CLASSES) == 10


@pytest.mark.skipif(
    not data.DEBIAN_FASHION_MNIST.exists(), reason="apt-get install dataset-fashion-mnist"
)
def test_real_fashion_mnist_if_installed(tmp_path):
    x, y = data.load_fashion_mnist(train=False, root=tmp_path, download=False)
    assert x.shape == (10000, 1, 28, 28) and torch.bincount(y).tolist() == [1000] * 10


def test_cifar10_fixture_in_cifar_pickle_format(tmp_path):
    written = write_cifar(tmp_path)
    x, y = data.load_cifar10(train=True, root=tmp_path, download=False)
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    first = torch.from_numpy(written["data_batch_1"][0].reshape(3, 32, 32)).float() / 127.5 - 1
    torch.testing.assert_close(x[0], first)  # channel-first RGB planes, as CIFAR stores them
    xt, yt = data.load_dataset("cifar10", train=False, root=tmp_path, download=False)
    assert xt.shape == (4, 3, 32, 32) and yt.min() >= 0 and yt.max() < 10


def test_cifar10_bad_pickle_says_what_is_wrong(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / data.CIFAR_FOLDER / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        data.load_cifar10(train=False, root=tmp_path, download=False)


def test_missing_data_error_names_folder_variable_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_mnist(download=False)
    msg = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in msg
    assert "$MINISD_DATA" in msg and "MINISD_DATA" in msg
    assert f"python -m minisd.data mnist --root {tmp_path}" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_failed_download_is_reported_not_raised_raw(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(
        data.DatasetNotFoundError, match="downloading failed.*network is unreachable"
    ):
        data.load_cifar10(root=tmp_path, download=True)
    with pytest.raises(data.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(root=tmp_path, download=True)


def test_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    assert data.data_root() == data.REPO_DATA
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"


def test_corrupt_idx_files(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(bad)
    truncated = tmp_path / "short"
    truncated.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(truncated)
    folder = tmp_path / "MNIST" / "raw"
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        data.load_mnist(train=False, root=tmp_path, download=False)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="mnist, fashion_mnist, cifar10"):
        data.load_dataset("imagenet")
    write_idx_split(tmp_path / "MNIST" / "raw", "t10k", 3, gz=False)
    with pytest.raises(ValueError, match="limit"):
        data.load_mnist(train=False, root=tmp_path, download=False, limit=0)


def test_command_line_summary(tmp_path, capsys):
    write_cifar(tmp_path)
    data.main(["cifar10", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "cifar10 train: images (20, 3, 32, 32) in [-1, 1], 20 labels" in out
    assert os.fspath(tmp_path) not in out


class _RunsCode:
    """What an attacker's 'dataset' pickles: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_cifar10_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [_RunsCode(marker)]})
    pickle.loads(payload)  # the payload is live: a plain unpickler runs it
    assert marker.is_dir()
    marker.rmdir()
    (tmp_path / data.CIFAR_FOLDER / "test_batch").write_bytes(payload)
    with pytest.raises(ValueError, match=r"not a CIFAR batch and was not loaded.*posix\.mkdir"):
        data.load_cifar10(train=False, root=tmp_path, download=False)
    assert not marker.exists()


def test_cifar10_batches_written_by_numpy_1_load(tmp_path):
    """The real files name numpy.core (numpy 1); numpy 2 calls it numpy._core."""
    written = write_cifar(tmp_path)
    path = tmp_path / data.CIFAR_FOLDER / "test_batch"
    old = path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in old
    path.write_bytes(old)
    x, _ = data.load_cifar10(train=False, root=tmp_path, download=False)
    first = torch.from_numpy(written["test_batch"][0].reshape(3, 32, 32)).float() / 127.5 - 1
    torch.testing.assert_close(x[0], first)
