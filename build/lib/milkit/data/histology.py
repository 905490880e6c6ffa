"""Histology patch-bag datasets of Distill-to-Label §IV-A, read exactly as published.

Colon cancer — CRCHistoPhenotypes (Sirinukunwattana et al. 2016), as distributed::

    <root>/Classification/img<k>/img<k>.bmp                 500×500 H&E
    <root>/Classification/img<k>/img<k>_<class>.mat         'detection': N×2 (x, y) nucleus centres
         class ∈ epithelial, inflammatory, fibroblast, others (MATLAB, 1-based pixels)

(``<root>`` may also be the ``Classification`` folder itself; ``Detection/`` holds
unclassified nuclei and is not used.) Bag = image; instances = 27×27 patches centred
on every classified nucleus, windows shifted inside the image at the border; instance
label = epithelial; bag label = any epithelial nucleus (§IV-A-1).

Breast cancer — UCSB bio-segmentation benchmark (Gelasca et al. 2008): 58 H&E TIFFs
(896×768) named ``ytma<..>_<date>_{benign|malignant}<i>_ccd.tif``. Bag label from the
file name (malignant = 1); instances = 32×32 patches on a regular grid, patches with
≥ 75% white pixels dropped (§IV-A-2). No instance labels exist.

Splits: 70/10/20 train/validation/test, 5 folds (§IV-A), stratified by bag label
(milkit.data.splits), seeded by ``split_seed`` (independent of the training seed, so
every fold of one cross-validation shares one partition). Patches are float32 RGB in
[0, 1], (N, 3, P, P); ``Bag.coords`` holds each patch's top-left (x, y) pixel; ``Bag.meta['centres']`` the
patch centres. Optional training-time augmentation (90° rotations, flips, centre
jitter, H&E stain perturbation) is off by default.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.io
import torch
from PIL import Image
from pydantic import Field, model_validator
from torch import Tensor

from milkit.config import StrictModel
from milkit.data.bag import Bag, BagDataset
from milkit.data.base import DataConfig, DataSplits
from milkit.data.splits import kfold_splits

COLON_CLASSES: tuple[str, ...] = ("epithelial", "inflammatory", "fibroblast", "others")
_IMG_DIR = re.compile(r"^img(\d+)$")

# Ruifrok & Johnston (2001) H&E-DAB stain vectors (rows: haematoxylin, eosin, DAB), optical-density space.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


# --------------------------------------------------------------------------- configs
class AugmentConfig(StrictModel):
    """Training-split augmentation used in the colon/breast MIL literature (off by default)."""

    enabled: bool = Field(False, description="off for the D2L protocol; evaluation splits are never augmented")
    rot90: bool = Field(True, description="random multiple of 90° per patch")
    flips: bool = Field(True, description="random flip per patch (with rot90: all 8 dihedral orientations)")
    jitter: int = Field(2, ge=0, description="patch centre shifted by U{-j..j} px (re-cropped from the image)")
    stain_sigma: float = Field(
        0.05, ge=0, lt=1, description="H&E stain perturbation: HED ×U(1±σ) +U(±σ) (Tellez et al. 2018); 0 = off"
    )


class _HistologyConfig(DataConfig):
    root: Path = Field(..., description="dataset folder as downloaded")
    fold: int = Field(0, ge=0, description="cross-validation fold whose test part is held out (§IV-A)")
    n_folds: int = Field(5, ge=2, description="5-fold cross-validation (§IV-A)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="validation share of all bags: 70/10/20 (§IV-A)")
    split_seed: int = Field(0, description="seed of the fold partition (explicit; independent of training)")
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _check_fold(self):
        if self.fold >= self.n_folds:
            raise ValueError(f"fold {self.fold} does not exist with n_folds={self.n_folds} (folds are 0..{self.n_folds - 1})")
        if self.val_fraction + 1.0 / self.n_folds >= 1.0:
            raise ValueError("val_fraction plus the test share 1/n_folds leaves no training bags")
        return self


class ColonNucleiConfig(_HistologyConfig):
    """CRCHistoPhenotypes colon nuclei bags (D2L §IV-A-1)."""

    kind: Literal["colon_nuclei"] = "colon_nuclei"
    patch_size: int = Field(27, ge=3, description="27×27 patches centred on nuclei (§IV-A-1)")
    one_based: bool = Field(True, description="the .mat centres are MATLAB 1-based pixel coordinates")

    def load_bags(self) -> list[Bag]:
        return load_colon_bags(self.root, self.patch_size, self.one_based)

    def build(self, seed: int) -> DataSplits:
        return _split_bags(self.load_bags(), self, seed)


class BreastUCSBConfig(_HistologyConfig):
    """UCSB breast cancer bags (D2L §IV-A-2); bag labels only."""

    kind: Literal["breast_ucsb"] = "breast_ucsb"
    patch_size: int = Field(32, ge=2, description="32×32 patches (§IV-A-2)")
    stride: int | None = Field(None, ge=1, description="grid step; default patch_size (non-overlapping)")
    pattern: str = Field("*_ccd.tif", description="image file names (case-insensitive glob, searched recursively)")
    white_fraction: float = Field(0.75, gt=0, le=1, description="drop patches with ≥ this share of white (§IV-A-2)")
    white_threshold: int = Field(
        200, ge=0, le=255, description="a pixel is white when all of R, G, B ≥ this (paper silent)"
    )

    def load_bags(self) -> list[Bag]:
        return load_breast_bags(
            self.root, self.patch_size, self.stride or self.patch_size, self.pattern, self.white_fraction, self.white_threshold
        )

    def build(self, seed: int) -> DataSplits:
        return _split_bags(self.load_bags(), self, seed)


# --------------------------------------------------------------------------- reading
def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3); errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file does not exist")
    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - PIL raises many types
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = _read_tiff(path, err)
        else:
            raise ValueError(f"{path}: not a readable image ({err})") from None
    return np.ascontiguousarray(arr)


def _read_tiff(path: Path, first_err: Exception) -> np.ndarray:
    import tifffile

    try:
        arr = tifffile.imread(path)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable image ({first_err}; tifffile: {err})") from None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise ValueError(f"{path}: expected an RGB image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = (arr.astype(np.float64) / max(float(arr.max()), 1.0) * 255).round().astype(np.uint8)
    return arr


def read_detection(path: Path) -> np.ndarray:
    """The N×2 ``detection`` array of (x, y) centres in a CRCHistoPhenotypes ``.mat`` file.

    Empty files give (0, 2); rows with NaN are dropped (the paper counts annotated nuclei only).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nucleus annotation file does not exist")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable MATLAB .mat file ({err})") from None
    if "detection" not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
        raise ValueError(f"{path}: no 'detection' array (found: {found})")
    det = np.asarray(mat["detection"], dtype=np.float64)
    if det.size == 0:
        return np.zeros((0, 2))
    if det.ndim != 2 or det.shape[1] != 2:
        raise ValueError(f"{path}: 'detection' must be N×2 (x, y) centres, got shape {det.shape}")
    return det[np.isfinite(det).all(axis=1)]


def centres_to_pixels(det: np.ndarray, width: int, height: int, one_based: bool, source: Path) -> np.ndarray:
    """Round (x, y) centres to 0-based pixels; a centre up to 1 px outside (sub-pixel annotation
    at the edge) is clamped, anything further is an error naming ``source``."""
    c = np.rint(det).astype(np.int64) - (1 if one_based else 0)
    bad = (c[:, 0] < -1) | (c[:, 0] > width) | (c[:, 1] < -1) | (c[:, 1] > height)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{source}: {int(bad.sum())} nucleus centre(s) lie outside the {width}×{height} image "
            f"(first: row {i}, (x, y) = ({det[i, 0]:g}, {det[i, 1]:g}))"
        )
    c[:, 0] = np.clip(c[:, 0], 0, width - 1)
    c[:, 1] = np.clip(c[:, 1], 0, height - 1)
    return c


def patch_origins(centres: np.ndarray, patch: int, width: int, height: int) -> np.ndarray:
    """Top-left (x, y) of ``patch``-sized windows centred on ``centres``, shifted to stay inside the image."""
    half = patch // 2
    x0 = np.clip(centres[:, 0] - half, 0, width - patch)
    y0 = np.clip(centres[:, 1] - half, 0, height - patch)
    return np.stack([x0, y0], axis=1).astype(np.int64)


def crop_patches(image: Tensor, origins: np.ndarray | Tensor, patch: int) -> Tensor:
    """Crop (N, C, patch, patch) windows at top-left ``origins`` (x, y) from a (C, H, W) image."""
    o = torch.as_tensor(np.asarray(origins), dtype=torch.long)
    if o.numel() == 0:
        return image.new_zeros((0, image.shape[0], patch, patch))
    ar = torch.arange(patch)
    rows = (o[:, 1, None] + ar)[:, :, None]  # (N, P, 1)
    cols = (o[:, 0, None] + ar)[:, None, :]  # (N, 1, P)
    return image[:, rows, cols].permute(1, 0, 2, 3).contiguous()  # (C, N, P, P) -> (N, C, P, P)


def _to_chw(arr: np.ndarray) -> Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def resolve_colon_root(root: Path) -> Path:
    """The folder holding ``img<k>/`` (``root/Classification`` or ``root`` itself)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: colon dataset folder does not exist")
    for cand in (root / "Classification", root):
        if cand.is_dir() and any(_IMG_DIR.match(p.name) and p.is_dir() for p in cand.iterdir()):
            return cand
    raise FileNotFoundError(
        f"{root}: not a CRCHistoPhenotypes folder (expected Classification/img<k>/img<k>.bmp "
        "with img<k>_epithelial.mat, _inflammatory.mat, _fibroblast.mat, _others.mat)"
    )


def load_colon_image(folder: Path, patch: int = 27, one_based: bool = True) -> Bag | None:
    """One colon bag from ``img<k>/``; None (with a warning) when it holds no classified nucleus."""
    k = _IMG_DIR.match(folder.name)
    if k is None:
        raise ValueError(f"{folder}: expected a folder named img<k>")
    name = folder.name
    bmp = folder / f"{name}.bmp"
    image = read_rgb(bmp)
    h, w = image.shape[:2]
    if h < patch or w < patch:
        raise ValueError(f"{bmp}: image {w}×{h} is smaller than the {patch}×{patch} patch")
    centres, classes = [], []
    for ci, cls in enumerate(COLON_CLASSES):
        mat = folder / f"{name}_{cls}.mat"
        c = centres_to_pixels(read_detection(mat), w, h, one_based, mat)
        centres.append(c)
        classes.append(np.full(len(c), ci, dtype=np.int64))
    cen = np.concatenate(centres)
    cls_idx = np.concatenate(classes)
    if len(cen) == 0:
        warnings.warn(f"{folder}: no classified nucleus; image skipped", stacklevel=2)
        return None
    origins = patch_origins(cen, patch, w, h)
    img_t = _to_chw(image)
    x = crop_patches(img_t, origins, patch).float().div_(255.0)
    inst = torch.from_numpy((cls_idx == 0).astype(np.int64))
    return Bag(
        instances=x,
        label=int(inst.any()),
        bag_id=name,
        instance_labels=inst,
        coords=torch.from_numpy(origins),
        meta={"image": str(bmp), "centres": cen, "nucleus_class": cls_idx, "classes": COLON_CLASSES},
    )


def load_colon_bags(root: Path, patch: int = 27, one_based: bool = True) -> list[Bag]:
    """All colon bags under ``root``, ordered by image number."""
    base = resolve_colon_root(Path(root))
    folders = sorted(
        (p for p in base.iterdir() if p.is_dir() and _IMG_DIR.match(p.name)),
        key=lambda p: int(_IMG_DIR.match(p.name).group(1)),  # type: ignore[union-attr]
    )
    bags = [b for b in (load_colon_image(f, patch, one_based) for f in folders) if b is not None]
    if not bags:
        raise ValueError(f"{base}: no image holds a classified nucleus")
    return bags


def ucsb_label(path: Path) -> int:
    """Bag label from a UCSB file name: malignant = 1, benign = 0."""
    name = path.name.lower()
    mal, ben = "malignant" in name, "benign" in name
    if mal == ben:
        raise ValueError(f"{path}: file name must contain exactly one of 'benign' or 'malignant'")
    return int(mal)


def white_fractions(patches: Tensor, threshold: int) -> Tensor:
    """Share of pixels whose R, G and B are all ≥ ``threshold`` (uint8 patches (N, 3, P, P))."""
    white = (patches >= threshold).all(dim=1)
    return white.flatten(1).float().mean(dim=1)


def grid_origins(width: int, height: int, patch: int, stride: int) -> np.ndarray:
    """Top-left (x, y) of a regular grid of windows fully inside the image (row-major)."""
    ys = np.arange(0, height - patch + 1, stride)
    xs = np.arange(0, width - patch + 1, stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.int64)


def load_breast_image(
    path: Path, patch: int = 32, stride: int = 32, white_fraction: float = 0.75, white_threshold: int = 200
) -> Bag:
    """One UCSB bag: grid patches minus the white ones (§IV-A-2)."""
    label = ucsb_label(path)
    image = read_rgb(path)
    h, w = image.shape[:2]
    if h < patch or w < patch:
        raise ValueError(f"{path}: image {w}×{h} is smaller than the {patch}×{patch} patch")
    img_t = _to_chw(image)
    origins = grid_origins(w, h, patch, stride)
    patches = crop_patches(img_t, origins, patch)
    frac = white_fractions(patches, white_threshold)
    keep = (frac < white_fraction).numpy()
    if not keep.any():
        raise ValueError(f"{path}: every patch is ≥ {white_fraction:.0%} white; no tissue to form a bag")
    origins = origins[keep]
    return Bag(
        instances=patches[torch.from_numpy(keep)].float().div_(255.0),
        label=label,
        bag_id=path.stem,
        instance_labels=None,
        coords=torch.from_numpy(origins),
        meta={"image": str(path), "centres": origins + patch // 2, "n_grid": int(len(keep)), "n_white": int((~keep).sum())},
    )


def find_ucsb_images(root: Path, pattern: str = "*_ccd.tif") -> list[Path]:
    """UCSB images under ``root`` (recursive, case-insensitive ``pattern``), sorted by name."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: breast dataset folder does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: expected the folder holding the UCSB *_ccd.tif images, got a file")
    pat = pattern.lower()
    files = sorted((p for p in root.rglob("*") if p.is_file() and fnmatch.fnmatch(p.name.lower(), pat)), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(
            f"{root}: no UCSB breast images matching {pattern!r} "
            "(expected names like ytma10_010704_benign1_ccd.tif / ..._malignant1_ccd.tif)"
        )
    return files


def load_breast_bags(
    root: Path, patch: int = 32, stride: int = 32, pattern: str = "*_ccd.tif", white_fraction: float = 0.75, white_threshold: int = 200
) -> list[Bag]:
    """All UCSB bags under ``root``."""
    return [load_breast_image(p, patch, stride, white_fraction, white_threshold) for p in find_ucsb_images(root, pattern)]


# --------------------------------------------------------------------------- splits
def fold_indices(labels, fold: int, n_folds: int = 5, val_fraction: float = 0.1, seed: int = 0):
    """(train, val, test) indices of one fold: stratified ``n_folds``-fold test parts
    (disjoint, covering every bag) and a stratified validation part of ``val_fraction`` of
    all bags carved from the rest — 70/10/20 with 5 folds (D2L §IV-A). Uses
    :func:`milkit.data.splits.kfold_splits`, whose validation share is of the non-test bags."""
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold {fold} does not exist with n_folds={n_folds}")
    return kfold_splits(labels, None, n_folds, seed, val_fraction * n_folds / (n_folds - 1))[fold]


def _split_bags(bags: list[Bag], cfg: _HistologyConfig, seed: int) -> DataSplits:
    try:
        tr, va, te = fold_indices([b.label for b in bags], cfg.fold, cfg.n_folds, cfg.val_fraction, cfg.split_seed)
    except ValueError as err:
        raise ValueError(f"{cfg.root}: cannot split {len(bags)} bags into {cfg.n_folds} folds ({err})") from None
    train_bags = [bags[i] for i in tr]
    train: BagDataset
    if cfg.augment.enabled:
        train = AugmentedHistologyBags(train_bags, cfg.augment, cfg.patch_size, seed)
    else:
        train = BagDataset(train_bags)
    return DataSplits(train=train, val=BagDataset([bags[i] for i in va]), test=BagDataset([bags[i] for i in te]))


# --------------------------------------------------------------------------- augmentation
def stain_perturb(x: Tensor, sigma: float, gen: torch.Generator) -> Tensor:
    """H&E stain augmentation (Tellez et al. 2018): per patch, HED = OD·M⁻¹ (Ruifrok &
    Johnston), HED ← HED·α + β with α ~ U(1−σ, 1+σ), β ~ U(−σ, σ) per stain; back to RGB.
    ``x`` is (N, 3, P, P) in [0, 1]."""
    if sigma <= 0 or x.numel() == 0:
        return x
    n = x.shape[0]
    od = -torch.log(x.double().clamp_min(1e-6))  # (N, 3, P, P)
    hed = torch.einsum("ncij,cd->ndij", od, _HED_FROM_RGB)
    alpha = 1 + (torch.rand(n, 3, 1, 1, generator=gen, dtype=torch.float64) * 2 - 1) * sigma
    beta = (torch.rand(n, 3, 1, 1, generator=gen, dtype=torch.float64) * 2 - 1) * sigma
    od2 = torch.einsum("ndij,dc->ncij", hed * alpha + beta, _RGB_FROM_HED)
    return torch.exp(-od2).clamp(0, 1).to(x.dtype)


def rotate_flip(x: Tensor, rot90: bool, flips: bool, gen: torch.Generator) -> Tensor:
    """Random multiple of 90° and random flip, independently per patch (N, C, P, P)."""
    if x.numel() == 0 or not (rot90 or flips):
        return x
    out = x.clone()
    n = x.shape[0]
    ks = torch.randint(0, 4, (n,), generator=gen) if rot90 else torch.zeros(n, dtype=torch.long)
    fl = torch.randint(0, 2, (n,), generator=gen) if flips else torch.zeros(n, dtype=torch.long)
    for k in range(4):
        for f in range(2):
            sel = (ks == k) & (fl == f)
            if sel.any():
                y = torch.rot90(x[sel], k, dims=(-2, -1))
                out[sel] = torch.flip(y, dims=(-1,)) if f else y
    return out


class AugmentedHistologyBags(BagDataset):
    """Training bags re-cropped and perturbed on every access (seeded generator; no global state)."""

    def __init__(self, bags: list[Bag], cfg: AugmentConfig, patch: int, seed: int):
        super().__init__(bags)
        self.cfg = cfg
        self.patch = patch
        self.gen = torch.Generator().manual_seed(int(seed))
        self._images: dict[str, Tensor] = {}

    def _image(self, bag: Bag) -> Tensor:
        key = bag.meta["image"]
        if key not in self._images:
            self._images[key] = _to_chw(read_rgb(Path(key)))
        return self._images[key]

    def __getitem__(self, i: int) -> Bag:
        bag = self.bags[i]
        x = bag.instances
        origins = bag.coords
        if self.cfg.jitter > 0:
            img = self._image(bag)
            _, h, w = img.shape
            centres = torch.as_tensor(np.asarray(bag.meta["centres"]), dtype=torch.long)
            shift = torch.randint(-self.cfg.jitter, self.cfg.jitter + 1, centres.shape, generator=self.gen)
            origins = torch.from_numpy(patch_origins((centres + shift).numpy(), self.patch, w, h))
            x = crop_patches(img, origins, self.patch).float().div_(255.0)
        x = rotate_flip(x, self.cfg.rot90, self.cfg.flips, self.gen)
        x = stain_perturb(x, self.cfg.stain_sigma, self.gen)
        return Bag(
            instances=x,
            label=bag.label,
            bag_id=bag.bag_id,
            instance_labels=bag.instance_labels,
            coords=origins,
            meta=bag.meta,
            adj=bag.adj,
        )
