"""Tiny synthetic stand-ins written in exactly the published layouts of the D2L histology sets.

The real data (CRCHistoPhenotypes, UCSB breast) cannot be bundled or downloaded
offline; tests and ``milkit benchmark d2l-histology --standin`` use these instead.
Images are smaller than the published ones (sizes are parameters) but folder
layout, file names, file formats (BMP + MATLAB ``detection`` arrays; ``*_ccd.tif``)
and coordinate conventions ((x, y), 1-based) are those of the distributions.

Colon: pink stroma with nuclei drawn as discs; epithelial nuclei are large and dark
blue-purple, the other classes small and reddish, so that the instance label is
learnable from a 27×27 patch. Breast: pink tissue with a white background region;
malignant images carry dark, large nuclei.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from milkit.data.histology import COLON_CLASSES

_STROMA = np.array([236, 190, 214], dtype=np.float64)
_EPI = np.array([70, 40, 130], dtype=np.float64)
_OTHER = np.array([200, 90, 120], dtype=np.float64)


def _disc(img: np.ndarray, x: int, y: int, r: int, colour: np.ndarray) -> None:
    h, w = img.shape[:2]
    yy, xx = np.ogrid[:h, :w]
    img[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = colour


def write_colon_standin(
    root: str | Path,
    n_images: int = 12,
    size: int = 120,
    nuclei: tuple[int, int] = (6, 12),
    positive_share: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write ``root/Classification/img<k>/img<k>.bmp`` + ``img<k>_<class>.mat`` (k = 1..n) and
    ``root/Detection/img<k>/img<k>_detection.mat``; returns ``root``.

    Images 1..round(positive_share·n) hold epithelial nuclei (positive bags); every image
    has nuclei of the other classes, one of them placed 2 px from the border.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    n_pos = int(round(positive_share * n_images))
    for k in range(1, n_images + 1):
        img = np.tile(_STROMA, (size, size, 1)) + rng.normal(0, 6, (size, size, 3))
        by_class: dict[str, list[tuple[float, float]]] = {c: [] for c in COLON_CLASSES}
        n = int(rng.integers(nuclei[0], nuclei[1] + 1))
        for j in range(n):
            epithelial = k <= n_pos and j % 2 == 0
            cls = "epithelial" if epithelial else COLON_CLASSES[1 + j % 3]
            if j == 1:  # one nucleus at the border: its patch must be shifted inside
                x, y = 2.0, float(rng.integers(3, size - 3))
            else:
                x, y = (float(v) for v in rng.integers(6, size - 6, 2))
            _disc(img, int(x), int(y), 6 if epithelial else 3, _EPI if epithelial else _OTHER)
            by_class[cls].append((x + 1.0, y + 1.0))  # MATLAB 1-based (x, y)
        folder = root / "Classification" / f"img{k}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img{k}.bmp")
        for cls, pts in by_class.items():
            det = np.array(pts, dtype=np.float64).reshape(-1, 2)
            scipy.io.savemat(folder / f"img{k}_{cls}.mat", {"detection": det})
        det_folder = root / "Detection" / f"img{k}"
        det_folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(det_folder / f"img{k}.bmp")
        all_pts = np.array([p for pts in by_class.values() for p in pts]).reshape(-1, 2)
        scipy.io.savemat(det_folder / f"img{k}_detection.mat", {"detection": all_pts})
    return root


def ucsb_name(i: int, malignant: bool) -> str:
    """A UCSB-style file name, e.g. ``ytma10_010704_malignant1_ccd.tif``."""
    return f"ytma{10 + i // 4}_0{10704 + i}_{'malignant' if malignant else 'benign'}{i % 4 + 1}_ccd.tif"


def write_breast_standin(
    root: str | Path,
    n_images: int = 10,
    width: int = 128,
    height: int = 96,
    patch: int = 32,
    white_cols: int = 1,
    seed: int = 0,
) -> Path:
    """Write ``n_images`` UCSB-style TIFFs into ``root`` (half malignant); the rightmost
    ``white_cols`` grid columns are pure white (dropped by the ≥75% white filter)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        malignant = i % 2 == 1
        img = np.tile(_STROMA, (height, width, 1)) + rng.normal(0, 6, (height, width, 3))
        for _ in range(int(rng.integers(4, 9))):
            x, y = (int(v) for v in rng.integers(4, min(width, height) - 4, 2))
            _disc(img, x, y, 5 if malignant else 2, _EPI if malignant else _OTHER)
        if white_cols:
            img[:, width - white_cols * patch :] = 255
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / ucsb_name(i, malignant))
    return root
