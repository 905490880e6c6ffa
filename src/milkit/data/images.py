"""Segmentation image sets from disk: image labels for training, masks for scoring only.

Every image becomes a segmentation Bag (see :mod:`milkit.data.seg_synthetic`):
``instances`` (1, 3, S, S) float32 in [0, 1] resized to ``image_size`` (bilinear),
``label`` the image label, ``meta["mask"]`` (S, S) uint8 0/1 (nearest-neighbour
resize; any non-zero pixel is foreground), ``meta["source"]`` the image path.
Negative images without a mask file get an all-zero mask (known from the label);
positive images without one carry no mask (pixel metrics skip them).

Formats (``format``):

* ``glas`` — GlaS 2015: ``train_<k>.bmp`` + ``train_<k>_anno.bmp``, ``testA_*``/``testB_*``
  likewise, and ``Grade.csv`` (``name``, ``grade (GlaS)`` = benign | malignant).
  Label 1 = malignant; mask = glands (Max-Min §5.1: every GlaS image has glands).
  Split (NOTES.md): the 85 training images → 67 train / 18 validation, stratified by
  grade (benign 29/8, malignant 38/10); testA + testB = the 80 test images.
* ``camelyon16_patches`` — a CSV (``csv``, paths relative to it) with columns
  ``image``, ``mask`` (may be empty for normal patches), ``label`` and optional ``split``;
  as the P512 protocol (Max-Min) or IKD's 1280-px patches are distributed as lists.
* ``digestpath`` — DigestPath 2019 tissue set: ``*pos*/<name>.jpg`` with ``<name>_mask.jpg``
  (label 1) and ``*neg*/<name>.jpg`` (label 0). IKD §4.1 crops the images at random
  into 1536×1536 patches (``crop_size``) before resizing; see "Crops" below.
* ``folder`` — generic: ``csv`` (default ``<root>/labels.csv``) with ``image_id,label,split``;
  image ``<root>/<image_id>.<ext>``; mask beside it as ``<image_id>_mask.<ext>`` or in
  ``<root>/masks/<image_id>.<ext>``.

Without a ``split`` column, images are split at random (stratified by label, seeded by
``build(seed)``) with ``val_fraction`` / ``test_fraction``.

Crops (``crop_size``, any format; the DigestPath configs set 1536 as IKD §4.1): after
the split (so every crop of a source image stays in its split), each image gives
``crops_per_image`` random ``crop_size`` squares (seeded by ``build(seed)``; an image
smaller than ``crop_size`` gives one crop of its shorter side). A crop is positive iff
its part of the mask has foreground ("pos-patches that contained cancerous tissues");
crops of negative images are negative. The crop is then resized to ``image_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from milkit.data.bag import Bag, BagDataset
from milkit.data.base import DataConfig, DataSplits

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


class SegImagesConfig(DataConfig):
    """Segmentation images from disk (GlaS, Camelyon16 patches, DigestPath 2019, folder + CSV)."""

    kind: Literal["seg_images"] = "seg_images"
    format: Literal["glas", "camelyon16_patches", "digestpath", "folder"]
    root: str = Field(..., description="dataset folder")
    csv: str | None = Field(None, description="list file (camelyon16_patches: required; folder: default labels.csv)")
    image_size: int = Field(256, ge=8, description="IKD §4.2: patches resized to 256×256 (Max-Min GlaS: 416)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="random split when the source has none")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="DigestPath: IKD §4.1 uses 225/25 ≈ 10%")
    max_images: int | None = Field(None, ge=3, description="cap per split (quick runs); None = all")
    lazy: bool = Field(False, description="read images on access instead of at build (large patch sets)")
    crop_size: int | None = Field(
        None, ge=8, description="random square crops (px) before resizing; IKD §4.1 DigestPath: 1536; None = whole image")
    crops_per_image: int = Field(
        120, ge=1, description="crops per image; IKD §4.1: 9,000 pos + 18,000 neg patches from 225 images ≈ 120")

    def build(self, seed: int) -> DataSplits:
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: dataset folder does not exist")
        readers = {"glas": _glas, "camelyon16_patches": _camelyon_patches, "digestpath": _digestpath, "folder": _folder}
        records = readers[self.format](self, root)
        if not records:
            raise ValueError(f"{root}: no images found for format {self.format!r}")
        assigned = _assign_splits(records, self.val_fraction, self.test_fraction, seed)
        if self.crop_size is not None:
            assigned = random_crops(assigned, self.crop_size, self.crops_per_image, seed)
        out = {}
        for split in SPLITS:
            recs = [r for r in assigned if r["split"] == split]
            if self.max_images is not None:
                recs = _cap(recs, self.max_images, seed)
            out[split] = LazyImages(recs, self.image_size) if self.lazy else BagDataset(
                [_load(r, self.image_size) for r in recs])
        return DataSplits(**out)


# ----------------------------------------------------------------------------- loading


class LazyImages(BagDataset):
    """A split whose images are read (and resized) when accessed; memory stays flat."""

    def __init__(self, records: list[dict], size: int):
        super().__init__([])
        self.records = list(records)
        self.size = size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Bag:
        return _load(self.records[i], self.size)

    @property
    def labels(self) -> list[int]:
        return [int(r["label"]) for r in self.records]


def _box(rec: dict) -> tuple[int, int, int, int] | None:
    if rec.get("box") is None:
        return None
    x, y, c = rec["box"]
    return (x, y, x + c, y + c)


def _load(rec: dict, size: int) -> Bag:
    path: Path = rec["image"]
    box = _box(rec)
    try:
        with Image.open(path) as im:
            im = im.crop(box) if box is not None else im
            img = im.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from None
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0).contiguous()
    meta: dict = {"source": str(path)}
    if rec.get("mask") is not None:
        mpath: Path = rec["mask"]
        try:
            with Image.open(mpath) as m:
                m = m.crop(box) if box is not None else m
                arr = np.asarray(m.convert("L").resize((size, size), Image.NEAREST))
        except (OSError, ValueError) as err:
            raise ValueError(f"{mpath}: cannot read mask ({err})") from None
        thr = 127 if mpath.suffix.lower() in (".jpg", ".jpeg") else 0  # JPEG masks carry compression noise
        meta["mask"] = torch.from_numpy((arr > thr).astype(np.uint8))
    elif rec["label"] == 0:
        meta["mask"] = torch.zeros(size, size, dtype=torch.uint8)
    return Bag(instances=x, label=int(rec["label"]), bag_id=rec["id"], meta=meta)


def _mask_array(path: Path) -> np.ndarray:
    """A full-resolution mask as bool (JPEG masks thresholded at 127, as in :func:`_load`)."""
    try:
        with Image.open(path) as m:
            arr = np.asarray(m.convert("L"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read mask ({err})") from None
    return arr > (127 if path.suffix.lower() in (".jpg", ".jpeg") else 0)


def random_crops(records: list[dict], crop: int, per_image: int, seed: int) -> list[dict]:
    """Replace every image record by ``per_image`` random square crops (IKD §4.1)."""
    out: list[dict] = []
    for idx, rec in enumerate(records):
        try:
            with Image.open(rec["image"]) as im:
                w, h = im.size
        except (OSError, ValueError) as err:
            raise ValueError(f"{rec['image']}: cannot read image ({err})") from None
        c = min(crop, w, h)
        mask = _mask_array(rec["mask"]) if rec.get("mask") is not None else None
        if mask is not None and mask.shape != (h, w):
            raise ValueError(f"{rec['mask']}: mask is {mask.shape[1]}×{mask.shape[0]} but its image is {w}×{h}")
        rng = np.random.default_rng([seed, idx])
        for _ in range(per_image):
            x, y = int(rng.integers(0, w - c + 1)), int(rng.integers(0, h - c + 1))
            label = int(rec["label"])
            if mask is not None:
                label = int(mask[y:y + c, x:x + c].any())
            out.append({**rec, "id": f"{rec['id']}@{x}_{y}", "box": (x, y, c), "label": label})
    return out


def _parse_label(value: str, where: str) -> int:
    v = str(value).strip().lower()
    mapping = {"1": 1, "0": 0, "pos": 1, "neg": 0, "positive": 1, "negative": 0, "tumor": 1, "tumour": 1,
               "normal": 0, "malignant": 1, "benign": 0, "true": 1, "false": 0}
    if v not in mapping:
        raise ValueError(f"{where}: label {value!r} is not one of 0/1 (or pos/neg, tumor/normal, malignant/benign)")
    return mapping[v]


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict]:
    from milkit.io import read_csv_rows

    rows = read_csv_rows(path, "list file")
    cols = list(rows[0]) if rows else []
    missing = [c for c in required if c not in cols]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(cols)})")
    return rows


def _find(base: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTS:
        for e in (ext, ext.upper()):
            p = base / f"{stem}{e}"
            if p.is_file():
                return p
    return None


def _split_value(row: dict, path: Path, line: int) -> str | None:
    s = row.get("split", "").lower()
    if not s:
        return None
    s = {"validation": "val", "valid": "val", "training": "train", "testing": "test"}.get(s, s)
    if s not in SPLITS:
        raise ValueError(f"{path}: line {line}: split {row.get('split')!r} is not train, val or test")
    return s


# ----------------------------------------------------------------------------- formats


def _glas(cfg: SegImagesConfig, root: Path) -> list[dict]:
    grade_csv = root / "Grade.csv"
    rows = _read_csv(grade_csv, ("name",))
    grade_col = next((c for c in rows[0] if c.lower().startswith("grade (glas")), None) if rows else None
    if grade_col is None:
        raise ValueError(f"{grade_csv}: no 'grade (GlaS)' column")
    recs = []
    for i, row in enumerate(rows, start=2):
        name = row["name"]
        img = _find(root, name)
        if img is None:
            raise FileNotFoundError(f"{root}: image {name}.bmp listed in Grade.csv (line {i}) does not exist")
        mask = _find(root, f"{name}_anno")
        split = "train" if name.startswith("train") else "test" if name.startswith("test") else None
        if split is None:
            raise ValueError(f"{grade_csv}: line {i}: name {name!r} is neither train_* nor test*")
        recs.append({"id": name, "image": img, "mask": mask, "label": _parse_label(row[grade_col], f"{grade_csv}: line {i}"),
                     "split": split})
    # 85 training images → 67 train / 18 val, stratified by grade (NOTES.md: benign 29/8, malignant 38/10)
    train = [r for r in recs if r["split"] == "train"]
    for lab in (0, 1):
        group = sorted((r for r in train if r["label"] == lab), key=lambda r: _glas_index(r["id"]))
        n_val = int(round(len(group) * 18 / 85))
        rng = np.random.default_rng([0, lab])  # the GlaS split is fixed, independent of the run seed
        for k in rng.permutation(len(group))[:n_val]:
            group[int(k)]["split"] = "val"
    return recs


def _glas_index(name: str) -> int:
    try:
        return int(name.rsplit("_", 1)[-1])
    except ValueError:
        return 0


def _camelyon_patches(cfg: SegImagesConfig, root: Path) -> list[dict]:
    if cfg.csv is None:
        raise ValueError(f"{root}: format camelyon16_patches needs 'csv' (columns image, mask, label[, split])")
    path = Path(cfg.csv) if Path(cfg.csv).is_absolute() else root / cfg.csv
    rows = _read_csv(path, ("image", "label"))
    recs = []
    for i, row in enumerate(rows, start=2):
        img = root / row["image"]
        if not img.is_file():
            raise FileNotFoundError(f"{path}: line {i}: image {img} does not exist")
        mask = root / row["mask"] if row.get("mask") else None
        if mask is not None and not mask.is_file():
            raise FileNotFoundError(f"{path}: line {i}: mask {mask} does not exist")
        recs.append({"id": Path(row["image"]).stem, "image": img, "mask": mask,
                     "label": _parse_label(row["label"], f"{path}: line {i}"), "split": _split_value(row, path, i)})
    return recs


def _digestpath(cfg: SegImagesConfig, root: Path) -> list[dict]:
    recs = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        low = sub.name.lower()
        label = 0 if "neg" in low else 1 if "pos" in low else None
        if label is None:
            continue
        for img in sorted(sub.iterdir()):
            if img.suffix.lower() not in IMAGE_EXTS or img.stem.endswith("_mask"):
                continue
            mask = _find(sub, f"{img.stem}_mask")
            recs.append({"id": f"{sub.name}/{img.stem}", "image": img, "mask": mask, "label": label, "split": None})
    if not recs:
        raise ValueError(f"{root}: no DigestPath images (expected folders like tissue-train-pos-v1/ and tissue-train-neg/)")
    return recs


def _folder(cfg: SegImagesConfig, root: Path) -> list[dict]:
    path = Path(cfg.csv) if cfg.csv and Path(cfg.csv).is_absolute() else root / (cfg.csv or "labels.csv")
    rows = _read_csv(path, ("image_id", "label"))
    recs = []
    for i, row in enumerate(rows, start=2):
        iid = row["image_id"]
        img = _find(root, iid)
        if img is None:
            raise FileNotFoundError(f"{path}: line {i}: no image {iid}.<png|jpg|bmp|tif> in {root}")
        mask = _find(root, f"{iid}_mask") or _find(root / "masks", iid)
        recs.append({"id": iid, "image": img, "mask": mask, "label": _parse_label(row["label"], f"{path}: line {i}"),
                     "split": _split_value(row, path, i)})
    return recs


# ----------------------------------------------------------------------------- splits


def _assign_splits(records: list[dict], val_fraction: float, test_fraction: float, seed: int) -> list[dict]:
    """Keep given splits; split the rest at random, stratified by label."""
    rng = np.random.default_rng(seed)
    todo = [r for r in records if r["split"] is None]
    for lab in (0, 1):
        group = [r for r in todo if r["label"] == lab]
        order = rng.permutation(len(group))
        n_test = int(round(len(group) * test_fraction))
        n_val = int(round(len(group) * val_fraction))
        for rank, k in enumerate(order):
            group[int(k)]["split"] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return records


def _cap(recs: list[dict], n: int, seed: int) -> list[dict]:
    if len(recs) <= n:
        return recs
    keep = sorted(np.random.default_rng(seed).permutation(len(recs))[:n].tolist())
    return [recs[k] for k in keep]
