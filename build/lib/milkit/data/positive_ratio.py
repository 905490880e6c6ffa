"""Positive-ratio bags: the synthetic-WSI protocol of WENO §4.1 (CIFAR-10-MIL, CRC-MIL).

Every bag holds exactly ``bag_size`` instances drawn from a labelled image set in
which one class is "positive". Half of the bags are positive; a positive bag holds
``round(positive_ratio · bag_size)`` positive instances (≥ 1) and negatives for
the rest, shuffled; a negative bag holds negatives only. The images are split into
disjoint train/validation/test pools first, so no image appears in two splits.
Within one split an image is used at most once until its pool is exhausted
(released WENO code: every image once); with ``reuse_images`` the pool is then
reshuffled and reused (needed for the small scikit-learn digits set).

Sources (no downloads anywhere):

- ``digits``: scikit-learn's bundled 8×8 digits resized to 28×28 (or a local MNIST),
  through :func:`milkit.data.digits.load_digit_images`; positive digit 9 by default.
- ``cifar10``: a local copy of CIFAR-10's python batches (``data_batch_1..5``,
  ``test_batch``); class ``truck`` positive (WENO §4.1, NOTES.md). Validation images
  come from the training batches, test images from ``test_batch``.
- ``nct_crc``: a local NCT-CRC-HE-100K folder with one sub-folder per tissue class
  (ADI, BACK, …, TUM); class ``TUM`` positive. Only the images that end up in a bag
  are read, resized to ``image_size``.
- ``features``: an ``.npz`` with ``features`` (N, D) and ``labels`` (N,) — feature bags
  for a ``linear``/``linear_bn`` encoder. :func:`positive_ratio_splits` takes such
  arrays directly from Python.

``representation: flat`` turns image instances into vectors (e.g. the 64 raw pixels
of a digit) for quick feature-bag experiments.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from milkit.io import load_npz
from milkit.data.bag import Bag, BagDataset
from milkit.data.base import DataConfig, DataSplits

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NCT_CRC_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
_IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg"}
_DEFAULT_POSITIVE = {"digits": 9, "cifar10": "truck", "nct_crc": "TUM", "features": 1}


class PositiveRatioBagsConfig(DataConfig):
    """WENO §4.1 positive-ratio bags (CIFAR-10-MIL / CRC-MIL protocol; digits by default)."""

    kind: Literal["positive_ratio_bags"] = "positive_ratio_bags"
    source: Literal["digits", "cifar10", "nct_crc", "features"] = Field(
        "digits", description="image set the bags are drawn from (WENO §4.1: CIFAR-10, NCT-CRC-HE)"
    )
    path: Path | None = Field(
        None, description="cifar10: folder of python batches; nct_crc: class folders; features: .npz; digits: MNIST (optional)"
    )
    positive_class: int | str | None = Field(
        None, description="positive class (default: digit 9, CIFAR 'truck' §4.1/NOTES, NCT 'TUM' NOTES, features 1)"
    )
    positive_ratio: float = Field(
        0.2, gt=0, le=1, description="r, positive instances per positive bag; Table 1 r ∈ {1,5,10,20,50,70}%, Fig. 3 r=0.2"
    )
    bag_size: int = Field(100, ge=1, description="instances per bag: 100 (NOTES.md, released code bag_length)")
    positive_bag_fraction: float = Field(0.5, gt=0, lt=1, description="half the bags positive (released code pos_slide_ratio)")
    n_train_bags: int = Field(40, ge=2)
    n_val_bags: int = Field(20, ge=2)
    n_test_bags: int = Field(40, ge=2)
    image_fractions: tuple[float, float, float] = Field(
        (0.6, 0.2, 0.2), description="train/val/test split of the images (cifar10: test = test_batch, val share of train)"
    )
    reuse_images: bool = Field(True, description="reuse images within a split once its pool is exhausted")
    image_size: int | None = Field(
        None, ge=8, description="resize images to this side (digits default 28 like digit-bags; nct_crc default 64)"
    )
    representation: Literal["image", "flat"] = Field("image", description="flat: instances as vectors")

    @model_validator(mode="after")
    def _check(self) -> "PositiveRatioBagsConfig":
        if int(round(self.positive_ratio * self.bag_size)) < 1:
            raise ValueError(
                f"positive_ratio={self.positive_ratio} × bag_size={self.bag_size} gives no positive instance; "
                "use a larger ratio or bag size"
            )
        if any(f <= 0 for f in self.image_fractions):
            raise ValueError("image_fractions must all be > 0")
        if self.source in ("cifar10", "nct_crc", "features") and self.path is None:
            raise ValueError(f"source {self.source!r} needs 'path' (no downloads)")
        return self

    def resolved_positive_class(self) -> int | str:
        return _DEFAULT_POSITIVE[self.source] if self.positive_class is None else self.positive_class

    def build(self, seed: int) -> DataSplits:
        rng = np.random.default_rng(seed)
        source = load_source(self)
        pools = source.split_pools(self.image_fractions, rng)
        return _make_splits(source, pools, self, rng)


# --------------------------------------------------------------------------------------
# image sources: labels of every image + a loader for the images actually used


@dataclass
class ImageSource:
    """Binary labels of every available image and a function loading a subset of them.

    ``fixed_test``: indices of a predefined test pool (CIFAR-10's ``test_batch``).
    """

    is_positive: np.ndarray  # (N,) bool
    classes: np.ndarray  # (N,) original class ids (for meta)
    fetch: Callable[[np.ndarray], torch.Tensor]
    name: str
    fixed_test: np.ndarray | None = None

    def split_pools(self, fractions: tuple[float, float, float], rng: np.random.Generator) -> list[np.ndarray]:
        """Disjoint train/val/test index pools, stratified by the binary label."""
        f = np.asarray(fractions, dtype=float)
        all_idx = np.arange(len(self.is_positive))
        if self.fixed_test is not None:
            rest = np.setdiff1d(all_idx, self.fixed_test)
            tr, va = _stratified_split(rest, self.is_positive, f[:2] / f[:2].sum(), rng)
            return [tr, va, rng.permutation(self.fixed_test)]
        return _stratified_split(all_idx, self.is_positive, f / f.sum(), rng)


def _stratified_split(idx: np.ndarray, is_pos: np.ndarray, fr: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in fr]
    for cls in (True, False):
        sub = rng.permutation(idx[is_pos[idx] == cls])
        cuts = (np.cumsum(fr)[:-1] * len(sub)).astype(int)
        for i, chunk in enumerate(np.split(sub, cuts)):
            parts[i].append(chunk)
    return [rng.permutation(np.concatenate(p)) for p in parts]


def _resolve_class(positive: int | str, names: tuple[str, ...] | list[str], source: str) -> int:
    if isinstance(positive, int):
        if not 0 <= positive < len(names):
            raise ValueError(f"{source}: positive_class {positive} out of range (0..{len(names) - 1})")
        return positive
    lowered = [n.lower() for n in names]
    if positive.lower() not in lowered:
        raise ValueError(f"{source}: unknown positive_class {positive!r}; classes: {', '.join(names)}")
    return lowered.index(positive.lower())


def _tensor_fetch(images: torch.Tensor) -> Callable[[np.ndarray], torch.Tensor]:
    return lambda idx: images[torch.as_tensor(idx, dtype=torch.long)]


def digits_source(cfg: PositiveRatioBagsConfig) -> ImageSource:
    """scikit-learn digits (or local MNIST), via the digit-bags loader."""
    from milkit.data.digits import load_digit_images

    images, labels = load_digit_images(cfg.path, size=cfg.image_size or 28)
    pos = cfg.resolved_positive_class()
    if not isinstance(pos, int) and not str(pos).isdigit():
        raise ValueError(f"digits: positive_class must be a digit 0..9, got {pos!r}")
    pos = int(pos)
    if not 0 <= pos <= 9:
        raise ValueError(f"digits: positive_class must be a digit 0..9, got {pos}")
    return ImageSource(labels == pos, labels, _tensor_fetch(images), "digits")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 python batches hold dicts, lists, bytes and numpy arrays only; refuse anything else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CIFAR-10 python batch not found (expected data_batch_1..5 and test_batch)")
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, EOFError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({err})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: CIFAR-10 batch must hold data (N, 3072) and N labels, got {data.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def cifar10_source(cfg: PositiveRatioBagsConfig) -> ImageSource:
    """CIFAR-10 python batches; test pool = ``test_batch`` (WENO §4.1)."""
    root = Path(cfg.path)  # type: ignore[arg-type]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: CIFAR-10 folder does not exist")
    parts = [_load_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test = _load_cifar_batch(root / "test_batch")
    data = np.concatenate([p[0] for p in parts] + [test[0]])
    labels = np.concatenate([p[1] for p in parts] + [test[1]])
    pos = _resolve_class(cfg.resolved_positive_class(), CIFAR10_CLASSES, str(root))
    n_train = sum(len(p[1]) for p in parts)
    size = cfg.image_size

    def fetch(idx: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(data[idx]).float() / 255.0
        return _resize(x, size)

    return ImageSource(labels == pos, labels, fetch, "cifar10", fixed_test=np.arange(n_train, len(labels)))


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def nct_crc_source(cfg: PositiveRatioBagsConfig) -> ImageSource:
    """NCT-CRC-HE-100K: ``<path>/<CLASS>/*.tif``; only the images used in bags are read."""
    from PIL import Image

    root = Path(cfg.path)  # type: ignore[arg-type]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: NCT-CRC-HE folder does not exist")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not class_dirs:
        raise ValueError(f"{root}: no class sub-folders (expected {', '.join(NCT_CRC_CLASSES)})")
    names = [d.name for d in class_dirs]
    pos = _resolve_class(cfg.resolved_positive_class(), names, str(root))
    files: list[Path] = []
    labels: list[int] = []
    for ci, d in enumerate(class_dirs):
        for p in sorted(d.iterdir()):
            if p.suffix.lower() in _IMAGE_SUFFIXES:
                files.append(p)
                labels.append(ci)
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in the class folders")
    lab = np.asarray(labels, dtype=np.int64)
    size = cfg.image_size or 64

    def fetch(idx: np.ndarray) -> torch.Tensor:
        out = torch.empty(len(idx), 3, size, size)
        for k, i in enumerate(idx):
            try:
                with Image.open(files[int(i)]) as im:
                    im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except OSError as err:
                raise ValueError(f"{files[int(i)]}: unreadable image ({err})") from None
            out[k] = torch.from_numpy(arr).permute(2, 0, 1)
        return out

    return ImageSource(lab == pos, lab, fetch, "nct_crc")


def features_source(cfg: PositiveRatioBagsConfig) -> ImageSource:
    """``.npz`` with ``features`` (N, D) and integer ``labels`` (N,)."""
    path = Path(cfg.path)  # type: ignore[arg-type]
    feats, labels = load_npz(path, ("features", "labels"), "feature")
    pos = cfg.resolved_positive_class()
    if isinstance(pos, str):
        if not pos.lstrip("-").isdigit():
            raise ValueError(f"{path}: positive_class must be an integer label for feature sources, got {pos!r}")
        pos = int(pos)
    return array_source(feats, labels, pos, str(path))


def array_source(features: np.ndarray | torch.Tensor, labels: np.ndarray, positive_label: int, name: str = "arrays") -> ImageSource:
    """Precomputed (N, D) features (or (N, C, H, W) images) with integer labels."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = np.asarray(labels).astype(np.int64).ravel()
    if x.ndim < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: features must be (N, D) with N = len(labels) = {y.shape[0]}, got {tuple(x.shape)}")
    is_pos = y == positive_label
    if not is_pos.any():
        raise ValueError(f"{name}: no instance has the positive label {positive_label}")
    return ImageSource(is_pos, y, _tensor_fetch(x), name)


def load_source(cfg: PositiveRatioBagsConfig) -> ImageSource:
    loaders = {"digits": digits_source, "cifar10": cifar10_source, "nct_crc": nct_crc_source, "features": features_source}
    return loaders[cfg.source](cfg)


# --------------------------------------------------------------------------------------
# bag construction


class _Cycler:
    """Draws indices from a pool without replacement; reshuffles when exhausted (if allowed)."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator, reuse: bool, what: str):
        self.pool, self.rng, self.reuse, self.what = pool, rng, reuse, what
        self.order = rng.permutation(pool)
        self.pos = 0

    def take(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            if self.pos >= len(self.order):
                if not self.reuse or len(self.pool) == 0:
                    raise ValueError(
                        f"not enough {self.what} images ({len(self.pool)}) for the requested bags; "
                        "lower the bag counts/size or set reuse_images: true"
                    )
                self.order, self.pos = self.rng.permutation(self.pool), 0
            n = min(k, len(self.order) - self.pos)
            out.append(self.order[self.pos : self.pos + n])
            self.pos += n
            k -= n
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def bag_indices(
    pool: np.ndarray, is_positive: np.ndarray, n_bags: int, cfg: PositiveRatioBagsConfig, rng: np.random.Generator, split: str
) -> list[tuple[np.ndarray, int]]:
    """(image indices, bag label) of ``n_bags`` bags from ``pool`` (WENO §4.1)."""
    pos_pool, neg_pool = pool[is_positive[pool]], pool[~is_positive[pool]]
    if len(pos_pool) == 0 or len(neg_pool) == 0:
        raise ValueError(f"the {split} image pool needs both positive and negative images")
    pos = _Cycler(pos_pool, rng, cfg.reuse_images, f"{split} positive")
    neg = _Cycler(neg_pool, rng, cfg.reuse_images, f"{split} negative")
    n_pos_bags = int(round(n_bags * cfg.positive_bag_fraction))
    n_pos_bags = min(max(n_pos_bags, 1), n_bags - 1)
    k_pos = int(round(cfg.positive_ratio * cfg.bag_size))
    out = []
    for i in range(n_bags):
        if i < n_pos_bags:
            idx = np.concatenate([pos.take(k_pos), neg.take(cfg.bag_size - k_pos)])
            out.append((rng.permutation(idx), 1))
        else:
            out.append((neg.take(cfg.bag_size), 0))
    order = rng.permutation(n_bags)
    return [out[j] for j in order]


def _make_splits(source: ImageSource, pools: list[np.ndarray], cfg: PositiveRatioBagsConfig, rng: np.random.Generator) -> DataSplits:
    counts = {"train": cfg.n_train_bags, "val": cfg.n_val_bags, "test": cfg.n_test_bags}
    out = {}
    for (split, n), pool in zip(counts.items(), pools):
        specs = bag_indices(pool, source.is_positive, n, cfg, rng, split)
        used = np.unique(np.concatenate([s[0] for s in specs]))
        images = source.fetch(used)
        if cfg.representation == "flat":
            images = images.reshape(len(used), -1)
        where = {int(i): k for k, i in enumerate(used)}
        bags = []
        for b, (idx, label) in enumerate(specs):
            rows = torch.as_tensor([where[int(i)] for i in idx], dtype=torch.long)
            bags.append(
                Bag(
                    instances=images[rows],
                    label=label,
                    bag_id=f"{split}_{b:04d}",
                    instance_labels=torch.from_numpy(source.is_positive[idx].astype(np.int64)),
                    meta={"image_index": idx.tolist(), "source": source.name},
                )
            )
        out[split] = BagDataset(bags)
    return DataSplits(**out)


def positive_ratio_splits(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    positive_label: int,
    cfg: PositiveRatioBagsConfig | None = None,
    seed: int = 0,
) -> DataSplits:
    """Positive-ratio bags from precomputed arrays (feature bags), e.g. (N, D) encoder features."""
    cfg = cfg or PositiveRatioBagsConfig()
    rng = np.random.default_rng(seed)
    source = array_source(features, labels, positive_label)
    pools = source.split_pools(cfg.image_fractions, rng)
    return _make_splits(source, pools, cfg, rng)
