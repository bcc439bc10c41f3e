"""Datasets: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (IDX files, gzipped or not) and
scikit-learn's 8x8 digits (tiny, for tests and smoke runs). Images are returned normalised, ``[N, 1, H, W]`` float32.

A missing or corrupt file is a clear error saying which file and what to do; no data is ever downloaded.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

# where `apt-get install dataset-fashion-mnist` puts the files (`dpkg -L dataset-fashion-mnist`)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DATASETS = ("fashion_mnist", "digits")


class DataError(RuntimeError):
    """A data file is missing or unreadable."""


@dataclass
class ImageDataset:
    name: str
    train_x: torch.Tensor  # [N, C, H, W] float32, normalised
    train_y: torch.Tensor  # [N] int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: float
    std: float
    class_names: tuple[str, ...]

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]


def _find(root: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root!r}. Install Debian's package with "
        f"`apt-get install dataset-fashion-mnist` (`make system-data`; files in {FASHION_MNIST_DIR}) or set data.root "
        f"to a folder holding the four IDX files."
    )


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw): magic ``0x0000 08 <ndim>`` (unsigned bytes), big-endian dims, data."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path} is corrupt or unreadable ({type(err).__name__}: {err}); reinstall it with "
            f"`apt-get install --reinstall dataset-fashion-mnist`"
        ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes (header {raw[:4].hex() or 'empty'}; expected "
            f"00 00 08 01..04); the file is corrupt"
        )
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than its header")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(
            f"{path} has {len(raw)} bytes but its header {dims} needs {expected}; the file is corrupt or truncated"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(root: str | None = None) -> ImageDataset:
    root = root or FASHION_MNIST_DIR
    arrays = {key: read_idx(_find(root, stem)) for key, stem in FASHION_MNIST_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"Fashion-MNIST {split} files disagree: images {x.shape}, labels {y.shape}; expected "
                f"[N, 28, 28] and [N]"
            )
        if y.max() >= 10:
            raise DataError(f"Fashion-MNIST {split} labels contain {int(y.max())}; expected classes 0..9")
    mean, std = 0.2860, 0.3530  # training-set statistics of Fashion-MNIST in [0, 1]

    def images(a):
        return ((torch.from_numpy(a.astype(np.float32)) / 255.0 - mean) / std).unsqueeze(1)

    def labels(a):
        return torch.from_numpy(a.astype(np.int64))

    return ImageDataset(
        "fashion_mnist",
        images(arrays["train_images"]),
        labels(arrays["train_labels"]),
        images(arrays["test_images"]),
        labels(arrays["test_labels"]),
        10,
        mean,
        std,
        FASHION_MNIST_CLASSES,
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """scikit-learn's 1797 8x8 digits (bundled with scikit-learn, no download), split per class at random."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)
    y = torch.from_numpy(d.target.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    mean, std = float(x[~test].mean()), float(x[~test].std())
    x = ((x - mean) / std).unsqueeze(1)
    return ImageDataset("digits", x[~test], y[~test], x[test], y[test], 10, mean, std, tuple(str(i) for i in range(10)))


def load_dataset(name: str, root: str | None = None, train_subset: int | None = None, seed: int = 0) -> ImageDataset:
    if name == "fashion_mnist":
        ds = load_fashion_mnist(root)
    elif name == "digits":
        ds = load_digits(seed=seed)
    else:
        raise ValueError(f"data.name={name!r} is not supported; expected one of {DATASETS}")
    if train_subset is not None and train_subset < len(ds.train_y):
        idx = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(seed))[:train_subset]
        ds.train_x, ds.train_y = ds.train_x[idx], ds.train_y[idx]
    return ds
