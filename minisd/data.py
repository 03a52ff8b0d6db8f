"""Datasets as in-memory tensors scaled to [-1, 1]: MNIST, Fashion-MNIST, CIFAR-10.

The data folder is the `root` argument, else $MINISD_DATA, else the repo's `data/`, laid out as
torchvision lays it out (`MNIST/raw/`, `FashionMNIST/raw/`, `cifar-10-batches-py/`). Files are
read directly (IDX, raw or gzipped; CIFAR's pickles); torchvision is used only to download.

    python -m minisd.data mnist --root data     # fetch (needs a network) and summarise
"""

from __future__ import annotations

import argparse
import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_ENV = "MINISD_DATA"
REPO_DATA = Path(__file__).resolve().parent.parent / "data"
# Debian's package dataset-fashion-mnist installs the gzipped IDX files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_MAGIC = {1: 2049, 3: 2051}  # labels, images (LeCun's IDX format, unsigned bytes)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)

MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not in the data folder and could not be downloaded."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: `root`, else $MINISD_DATA, else the repo's data/."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else REPO_DATA


def _root_source(root: str | os.PathLike | None) -> str:
    if root is not None:
        return "the root argument"
    return f"${DATA_ENV}" if os.environ.get(DATA_ENV) else f"the default (${DATA_ENV} is unset)"


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1], the range diffusion models train on."""
    return images.float().div(127.5).sub(1.0)


@dataclass(frozen=True)
class _IdxSpec:
    key: str  # the name used on the command line and in load_dataset
    folder: str  # torchvision's folder name under root
    tv_class: str  # torchvision.datasets class used to download
    extra_dirs: tuple[Path, ...] = ()
    hint: str = ""


_MNIST = _IdxSpec("mnist", "MNIST", "MNIST")
_FASHION = _IdxSpec(
    "fashion_mnist",
    "FashionMNIST",
    "FashionMNIST",
    extra_dirs=(DEBIAN_FASHION_MNIST,),
    hint="On Debian/Ubuntu: apt-get install dataset-fashion-mnist (found automatically). ",
)


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (raw or .gz) into a uint8 tensor."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad header {data[:4]!r})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = memoryview(data)[4 + 4 * ndim :]
    if len(payload) != int(np.prod(dims)):
        raise ValueError(
            f"{path} is truncated: header says {dims}, found {len(payload)} bytes of data"
        )
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).reshape(dims)


def _find_idx(spec: _IdxSpec, root: Path, split: str) -> tuple[Path, Path] | None:
    for folder in (root / spec.folder / "raw", *spec.extra_dirs):
        found = []
        for kind in ("images-idx3", "labels-idx1"):
            base = folder / f"{split}-{kind}-ubyte"
            path = next((p for p in (base, base.with_name(base.name + ".gz")) if p.is_file()), None)
            found.append(path)
        if all(found):
            return found[0], found[1]
    return None


def _not_found(spec_key: str, searched: list[Path], root: Path, source: str, hint: str, why: str):
    places = ", ".join(str(p) for p in searched)
    return DatasetNotFoundError(
        f"{spec_key} not found: looked in {places} (data folder {root}, from {source}){why}. "
        f"Set {DATA_ENV} to a folder that holds the dataset in torchvision's layout, or fetch it "
        f"(needs a network) with: python -m minisd.data {spec_key} --root {root}. {hint}"
    )


def _download(spec_key: str, tv_class: str, root: Path, train: bool) -> None:
    import torchvision

    getattr(torchvision.datasets, tv_class)(str(root), train=train, download=True)


def _load_idx(
    spec: _IdxSpec, train: bool, root: str | os.PathLike | None, download: bool, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    base = data_root(root)
    split = "train" if train else "t10k"
    paths = _find_idx(spec, base, split)
    if paths is None:
        searched = [base / spec.folder / "raw", *spec.extra_dirs]
        why = ""
        if download:
            try:
                _download(spec.key, spec.tv_class, base, train)
            except Exception as err:  # offline: URLError, RuntimeError, ... all mean "no data"
                why = f"; downloading failed ({type(err).__name__}: {err})"
            paths = _find_idx(spec, base, split)
        else:
            why = "; download=False"
        if paths is None:
            raise _not_found(spec.key, searched, base, _root_source(root), spec.hint, why)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{paths[0]} and {paths[1]} do not match: images {tuple(images.shape)}, "
            f"labels {tuple(labels.shape)}; expected (N, H, W) and (N,)"
        )
    images, labels = _limit(images, labels, limit)
    return to_unit_range(images.unsqueeze(1)), labels.long()


def _limit(images: torch.Tensor, labels: torch.Tensor, limit: int | None):
    if limit is None:
        return images, labels
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    return images[:limit], labels[:limit]


def load_mnist(
    train: bool = True,
    root: str | os.PathLike | None = None,
    download: bool = True,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST digits: images (N, 1, 28, 28) in [-1, 1] and labels (N,) in 0..9."""
    return _load_idx(_MNIST, train, root, download, limit)


def load_fashion_mnist(
    train: bool = True,
    root: str | os.PathLike | None = None,
    download: bool = True,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST: images (N, 1, 28, 28) in [-1, 1] and labels (N,) (FASHION_MNIST_CLASSES)."""
    return _load_idx(_FASHION, train, root, download, limit)


# Everything a CIFAR python batch holds besides dicts, lists, bytes, str and numbers: numpy
# arrays, pickled through these (numpy 1 wrote numpy.core, numpy 2 writes numpy._core), and
# bytes as protocol 2 writes them from Python 3 (_codecs.encode(text, "latin1")).
_CIFAR_PICKLE_CLASSES = {
    (module, name)
    for core in ("numpy.core", "numpy._core")
    for module, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # protocol 2's bytes


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: a pickle can call any importable function, so
    a downloaded one naming anything else (os.system, ...) is refused before it runs."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_PICKLE_CLASSES:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        if module.startswith("numpy.core") and hasattr(np, "_core"):  # numpy 2's name for it
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is not a CIFAR batch and was not loaded: its pickle asks for more than "
            f"dicts, lists, strings, numbers and numpy arrays ({err}); delete it and download "
            "CIFAR-10 again (python -m minisd.data cifar10)"
        ) from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR batch: expected a dict, got {type(batch)}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or not ("labels" in batch or "fine_labels" in batch):
        raise ValueError(
            f"{path} is not a CIFAR batch: expected keys 'data' and 'labels', got {sorted(batch)}"
        )
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(
            f"{path}: 'data' must be (N, 3072) uint8 with N labels, "
            f"got {data.shape} and {labels.shape}"
        )
    return data, labels


def load_cifar10(
    train: bool = True,
    root: str | os.PathLike | None = None,
    download: bool = True,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10: images (N, 3, 32, 32) in [-1, 1] and labels (N,); see CIFAR10_CLASSES."""
    base = data_root(root)
    folder = base / CIFAR_FOLDER
    names = CIFAR_TRAIN if train else CIFAR_TEST
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        why = "; download=False"
        if download:
            try:
                _download("cifar10", "CIFAR10", base, train)
                why = ""
            except Exception as err:
                why = f"; downloading failed ({type(err).__name__}: {err})"
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            why = f" (missing {', '.join(missing)}){why}"
            raise _not_found("cifar10", [folder], base, _root_source(root), "", why)
    parts = [_read_cifar_batch(folder / n) for n in names]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    images, labels = _limit(torch.from_numpy(data), torch.from_numpy(labels), limit)
    return to_unit_range(images), labels


LOADERS = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10}
CLASS_NAMES = {
    "mnist": MNIST_CLASSES,
    "fashion_mnist": FASHION_MNIST_CLASSES,
    "cifar10": CIFAR10_CLASSES,
}


def load_dataset(name: str, train: bool = True, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset by name: one of LOADERS ("mnist", "fashion_mnist", "cifar10")."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(LOADERS)}")
    return LOADERS[name](train=train, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m minisd.data", description="Fetch and check a dataset."
    )
    parser.add_argument("name", choices=sorted(LOADERS))
    parser.add_argument(
        "--root", default=None, help=f"data folder (default: ${DATA_ENV} or the repo's data/)"
    )
    args = parser.parse_args(argv)
    for train in (True, False):
        x, y = load_dataset(args.name, train=train, root=args.root, download=True)
        split = "train" if train else "test"
        lo, hi = x.min().item(), x.max().item()
        print(
            f"{args.name} {split}: images {tuple(x.shape)} in [{lo:.0f}, {hi:.0f}], {len(y)} labels"
        )


if __name__ == "__main__":
    import sys

    from minisd.cli import entry

    sys.exit(entry(main=main, name="python -m minisd.data"))
