"""Tissue detection on a low-resolution image of the slide (FORMATS.md "Slide reading").

HSV saturation → median blur → threshold (Otsu by default, or a fixed value; CLAM's
fixed default is 8) → morphological closing → holes filled and small regions removed.
scipy.ndimage does the filtering and labelling; PIL does the HSV conversion.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image, ImageFilter
from pydantic import Field
from scipy import ndimage

from milkit.config import StrictModel


class TissueConfig(StrictModel):
    """How tissue is told from glass. Defaults follow CLAM's segmentation (Lu et al., the
    patching the Sm paper App. B uses) except the threshold, which is Otsu (issue #3)."""

    method: Literal["otsu", "fixed"] = "otsu"
    #: fixed saturation threshold (0–255), CLAM's ``sthresh`` default; with Otsu it is the
    #: floor (an empty slide's Otsu threshold would otherwise split the glass noise)
    threshold: int = Field(8, ge=0, le=255)
    #: median blur kernel (odd); CLAM's ``mthresh`` default
    median: int = Field(7, ge=1)
    #: closing iterations on the thresholded mask; CLAM's ``close`` default 4 (0 = off)
    close: int = Field(4, ge=0)
    fill_holes: bool = True
    #: regions smaller than this fraction of the image are dropped
    min_region_fraction: float = Field(0.0005, ge=0, lt=1)
    #: long side of the image the mask is computed on (about 1.25× for a 40× slide of ~80k px)
    thumbnail_size: int = Field(2048, ge=16)
    #: ... and never finer than this downsample of level 0 (CLAM segments at ≈64×)
    min_downsample: float = Field(8.0, ge=1)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold on uint8 values: maximise the between-class variance."""
    hist = np.bincount(values.ravel().astype(np.int64), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    p = hist / total
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    mu_t = mu[-1]
    denom = omega * (1.0 - omega)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = np.where(denom > 0, (mu_t * omega - mu) ** 2 / denom, 0.0)
    return float(np.argmax(sigma_b))


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation channel (uint8) of an RGB uint8 image."""
    return np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1]


def tissue_mask(rgb: np.ndarray, cfg: TissueConfig | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 (h, w, 3) image."""
    cfg = cfg or TissueConfig()
    sat = saturation(rgb)
    if cfg.median > 1:  # PIL's median filter: same result as scipy's, faster on uint8
        sat = np.asarray(Image.fromarray(sat).filter(ImageFilter.MedianFilter(cfg.median | 1)))
    thr = max(otsu_threshold(sat), float(cfg.threshold)) if cfg.method == "otsu" else float(cfg.threshold)
    mask = sat > thr
    if cfg.close > 0:
        mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool), iterations=cfg.close, border_value=0)
    if cfg.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if cfg.min_region_fraction > 0 and mask.any():
        labels, n = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())
        keep = sizes >= cfg.min_region_fraction * mask.size
        keep[0] = False
        mask = keep[labels]
    return mask.astype(bool)
