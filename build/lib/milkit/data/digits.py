"""Digit images for bag construction: scikit-learn's bundled 8×8 digits or a local MNIST.

- ``load_digit_images(None)``: scikit-learn ``load_digits`` (1,797 images, bundled, no
  network), values 0..16 rescaled to [0, 1] and resized to 28×28 (bilinear) so that
  the LeNet-5 of D2L §III-B applies unchanged.
- ``load_digit_images(path)``: an ``.npz`` with ``images`` (N, 28, 28) uint8 and
  ``labels`` (N,), or a folder holding the four original MNIST IDX files
  (``train-images-idx3-ubyte`` … , optionally ``.gz``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from milkit.io import load_npz


def _resize(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: IDX data type {dtype_code:#x} is not unsigned byte")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX file is truncated ({arr.size} values, header says {int(np.prod(dims))})")
    return arr.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: MNIST IDX file {stem}[.gz] not found")


def _check_mnist(images: np.ndarray, labels: np.ndarray, source: Path) -> None:
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{source}: MNIST images must have shape (N, 28, 28), got {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{source}: MNIST labels must have shape (N,) with N = {images.shape[0]}, got {tuple(labels.shape)}"
        )


def load_digit_images(mnist_path: str | Path | None = None, size: int = 28) -> tuple[torch.Tensor, np.ndarray]:
    """Images (N, 1, size, size) float in [0, 1] and integer labels (N,)."""
    if mnist_path is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        return _resize(d.images / 16.0, size), d.target.astype(np.int64)
    path = Path(mnist_path)
    if path.is_dir():
        parts = []
        for prefix in ("train", "t10k"):
            imgs = _read_idx(_find(path, f"{prefix}-images-idx3-ubyte"))
            labs = _read_idx(_find(path, f"{prefix}-labels-idx1-ubyte"))
            _check_mnist(imgs, labs, path)
            parts.append((imgs, labs))
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    elif path.is_file():
        images, labels = load_npz(path, ("images", "labels"), "MNIST")
        _check_mnist(images, labels, path)
    else:
        raise FileNotFoundError(f"{path}: MNIST file or folder does not exist")
    return _resize(images / 255.0, size), labels.astype(np.int64)
