"""Offline image data for the CNN experiments: CIFAR-10 (python-version batches from a directory),
Fashion-MNIST (Debian's ``dataset-fashion-mnist``, padded to 32×32), and a tiny synthetic set for
tests. Nothing here downloads anything; a missing dataset raises an error saying how to get it.

All loaders return a dict with ``x_train``/``x_test`` float32 images in [0, 1], shape
(N, C, 32, 32), ``y_train``/``y_test`` int64 labels, ``mean``/``std`` per channel (for
normalization after augmentation) and ``name``.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from typing import Optional

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# The authors' CIFAR-10 normalization (cnn/train.py).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

CIFAR_HOWTO = ("CIFAR-10 is read from the 'python version' batches (data_batch_1..5, test_batch). Get "
               "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html on a machine with "
               "internet access, extract it and pass the cifar-10-batches-py directory as --data-dir.")
FASHION_HOWTO = ("Fashion-MNIST is read from Debian's package: `apt-get install dataset-fashion-mnist` "
                 f"(files in {FASHION_MNIST_DIR}); or pass a CIFAR-10 directory with --data-dir.")


def _subset(x, y, n, generator):
    if n is None or n >= x.shape[0]:
        return x, y
    idx = torch.randperm(x.shape[0], generator=generator)[:n]
    return x[idx], y[idx]


def load_cifar10(data_dir: str, *, n_train: Optional[int] = None, n_test: Optional[int] = None,
                 seed: int = 0) -> dict:
    """CIFAR-10 from the python-version pickles in ``data_dir``; random subsets of ``n_train``/``n_test``."""
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} is not a directory. {CIFAR_HOWTO}")
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [f for f in names + ["test_batch"] if not os.path.isfile(os.path.join(data_dir, f))]
    if missing:
        raise FileNotFoundError(f"data_dir {data_dir!r} lacks {', '.join(missing)}. {CIFAR_HOWTO}")

    def read(name):
        with open(os.path.join(data_dir, name), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        try:
            data, labels = d[b"data"], d[b"labels"]
        except (KeyError, TypeError):
            raise ValueError(f"{os.path.join(data_dir, name)} is not a CIFAR-10 python batch "
                             f"(expected a dict with b'data' and b'labels')") from None
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != len(labels):
            raise ValueError(f"{os.path.join(data_dir, name)}: data must be (N, 3072) uint8 with N labels, "
                             f"got {data.shape} and {len(labels)} labels")
        return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(list(labels), dtype=torch.int64)

    parts = [read(n) for n in names]
    x_tr = torch.cat([p[0] for p in parts])
    y_tr = torch.cat([p[1] for p in parts])
    x_te, y_te = read("test_batch")
    g = torch.Generator().manual_seed(int(seed))
    x_tr, y_tr = _subset(x_tr, y_tr, n_train, g)
    x_te, y_te = _subset(x_te, y_te, n_test, g)
    return {"name": "CIFAR-10", "x_train": x_tr.float() / 255, "y_train": y_tr, "x_test": x_te.float() / 255,
            "y_test": y_te, "mean": CIFAR_MEAN, "std": CIFAR_STD}


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    if (magic >> 8) != 0x08 or ndim < 1:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    arr = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for dims {dims}, found {arr.size}")
    return torch.from_numpy(arr.reshape(dims).copy())


def load_fashion_mnist(root: str = FASHION_MNIST_DIR, *, n_train: Optional[int] = None,
                       n_test: Optional[int] = None, seed: int = 0) -> dict:
    """Fashion-MNIST from IDX .gz files, zero-padded from 28×28 to 32×32 (one channel)."""
    files = {k: os.path.join(root, f"{k}-ubyte.gz") for k in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found ({', '.join(missing)}). {FASHION_HOWTO}")
    x_tr = _read_idx(files["train-images-idx3"])
    y_tr = _read_idx(files["train-labels-idx1"]).long()
    x_te = _read_idx(files["t10k-images-idx3"])
    y_te = _read_idx(files["t10k-labels-idx1"]).long()
    g = torch.Generator().manual_seed(int(seed))
    x_tr, y_tr = _subset(x_tr, y_tr, n_train, g)
    x_te, y_te = _subset(x_te, y_te, n_test, g)
    pad = lambda x: torch.nn.functional.pad(x.float().unsqueeze(1) / 255, (2, 2, 2, 2))
    x_tr, x_te = pad(x_tr), pad(x_te)
    # Normalization statistics of the padded training images (Fashion-MNIST has no standard pair).
    return {"name": "Fashion-MNIST", "x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te,
            "mean": (float(x_tr.mean()),), "std": (float(x_tr.std()),)}


def synthetic_images(n_train: int = 64, n_test: int = 64, *, channels: int = 3, num_classes: int = 10,
                     seed: int = 0) -> dict:
    """A tiny learnable image set for tests: each class a smooth random template plus noise, in [0, 1]."""
    g = torch.Generator().manual_seed(int(seed))
    templates = torch.nn.functional.interpolate(torch.rand(num_classes, channels, 4, 4, generator=g), size=32,
                                                mode="bilinear", align_corners=False)

    def draw(n):
        y = torch.randint(num_classes, (n,), generator=g)
        x = (0.7 * templates[y] + 0.3 * torch.rand(n, channels, 32, 32, generator=g)).clamp(0, 1)
        return x, y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return {"name": "synthetic", "x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te,
            "mean": tuple([0.5] * channels), "std": tuple([0.25] * channels)}


def load_images(source: str = "auto", data_dir: Optional[str] = None, **kw) -> dict:
    """``source``: ``"cifar10"`` (needs ``data_dir``), ``"fashion-mnist"``, ``"synthetic"``, or
    ``"auto"`` = CIFAR-10 when ``data_dir`` is given, else Fashion-MNIST."""
    if source == "auto":
        source = "cifar10" if data_dir else "fashion-mnist"
    if source == "cifar10":
        if not data_dir:
            raise FileNotFoundError(f"data='cifar10' needs data_dir. {CIFAR_HOWTO}")
        return load_cifar10(data_dir, **kw)
    if source == "fashion-mnist":
        return load_fashion_mnist(data_dir or FASHION_MNIST_DIR, **kw)
    if source == "synthetic":
        return synthetic_images(kw.get("n_train") or 64, kw.get("n_test") or 64, seed=kw.get("seed", 0))
    raise ValueError(f"data must be 'auto', 'cifar10', 'fashion-mnist' or 'synthetic', got {source!r}")


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The authors' schedule b: random 32×32 crop of the zero-padded image and a random horizontal
    flip, per image. x: (n, C, H, W) in [0, 1] (padding is black, as torchvision's RandomCrop)."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h)).to(x.device)  # (n, h)
    cols = (ox[:, None] + torch.arange(w)).to(x.device)  # (n, w)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]
