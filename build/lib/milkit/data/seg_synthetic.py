"""Synthetic tissue images with exact lesion masks, for weakly supervised segmentation.

The segmentation convention of milkit (shared by :mod:`milkit.data.images`,
:mod:`milkit.methods.seg_base` and every segmentation method):

* an image is a :class:`~milkit.data.bag.Bag` whose ``instances`` is the image
  tensor with a leading dim of 1, i.e. ``(1, 3, H, W)`` float32 in ``[0, 1]``
  (models normalise it themselves);
* ``label`` is the image label (1 = the image holds at least one lesion);
* the truth mask is ``meta["mask"]``, a ``(H, W)`` ``torch.uint8`` tensor of 0/1 —
  used for scoring (and validation-split model selection) only, never in training:
  :func:`milkit.methods.seg_base.seg_loader` drops it from training batches.
* ``meta`` may also hold ``"source"`` (the file the image came from).

The generator paints a textured, eosin-like background with sparse nuclei and adds
``min_lesions..max_lesions`` irregular lesions (darker, haematoxylin-like, densely
nucleated) to positive images, then applies a per-image stain-like colour jitter.
Everything is drawn from ``numpy.random.default_rng`` seeded by ``build(seed)``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from scipy import ndimage

from milkit.data.bag import Bag, BagDataset
from milkit.data.base import DataConfig, DataSplits

#: RGB colours in [0, 1] (H&E-like): stroma/background, lesion base, nuclei
_BACKGROUND = np.array([0.93, 0.72, 0.82])
_LESION = np.array([0.62, 0.42, 0.72])
_NUCLEUS = np.array([0.30, 0.16, 0.48])


class SyntheticTissueConfig(DataConfig):
    """Synthetic tissue set (issue 6 "Data"): image label = any lesion; masks exact."""

    kind: Literal["seg_synthetic"] = "seg_synthetic"
    image_size: int = Field(64, ge=16, description="square image side in pixels (small: CPU runs)")
    n_train: int = Field(96, ge=2)
    n_val: int = Field(32, ge=2)
    n_test: int = Field(48, ge=2)
    pos_fraction: float = Field(0.5, gt=0, lt=1, description="fraction of images holding lesions")
    min_lesions: int = Field(1, ge=1)
    max_lesions: int = Field(3, ge=1)
    min_radius: float = Field(0.08, gt=0, le=0.5, description="lesion radius as a fraction of the side")
    max_radius: float = Field(0.2, gt=0, le=0.5)
    contrast: float = Field(0.8, ge=0, le=1, description="how far lesion colour departs from background")
    background_nuclei: float = Field(0.02, ge=0, le=1, description="nucleus seed density outside lesions")
    lesion_nuclei: float = Field(0.12, ge=0, le=1, description="nucleus seed density inside lesions")
    stain_jitter: float = Field(0.08, ge=0, le=0.5, description="per-image, per-channel scale jitter")
    noise: float = Field(0.03, ge=0, le=0.5, description="pixel noise standard deviation")

    @model_validator(mode="after")
    def _check_ranges(self) -> "SyntheticTissueConfig":
        if self.max_lesions < self.min_lesions:
            raise ValueError("max_lesions must be >= min_lesions")
        if self.max_radius < self.min_radius:
            raise ValueError("max_radius must be >= min_radius")
        return self

    def build(self, seed: int) -> DataSplits:
        """Three disjoint splits; split ``k`` uses the generator seeded ``(seed, k)``."""
        sizes = {"train": self.n_train, "val": self.n_val, "test": self.n_test}
        out = {}
        for k, (split, n) in enumerate(sizes.items()):
            rng = np.random.default_rng([seed, k])
            n_pos = int(round(n * self.pos_fraction))
            labels = np.array([1] * n_pos + [0] * (n - n_pos))
            rng.shuffle(labels)
            bags = []
            for i, y in enumerate(labels):
                img, mask = synth_tissue(rng, self, positive=bool(y))
                bags.append(
                    Bag(
                        instances=torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).contiguous(),
                        label=int(y),
                        bag_id=f"{split}_{i:04d}",
                        meta={"mask": torch.from_numpy(mask)},
                    )
                )
            out[split] = BagDataset(bags)
        return DataSplits(**out)


def _lesion_mask(rng: np.random.Generator, size: int, radius: float) -> np.ndarray:
    """One irregular blob: a rotated ellipse whose boundary is perturbed by smooth noise."""
    cy, cx = rng.uniform(radius, size - radius, size=2)
    a = radius * rng.uniform(0.75, 1.25)
    b = radius * rng.uniform(0.6, 1.0)
    th = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(th) + dy * np.sin(th)
    v = -dx * np.sin(th) + dy * np.cos(th)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    wobble = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=max(size / 12, 1.0))
    wobble = wobble / (np.abs(wobble).max() + 1e-8)
    return r + 0.25 * wobble < 1.0


def synth_tissue(
    rng: np.random.Generator, cfg: SyntheticTissueConfig, positive: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One image ``(H, W, 3)`` float32 in [0, 1] and its mask ``(H, W)`` uint8."""
    s = cfg.image_size
    mask = np.zeros((s, s), dtype=bool)
    if positive:
        n = int(rng.integers(cfg.min_lesions, cfg.max_lesions + 1))
        for _ in range(n):
            mask |= _lesion_mask(rng, s, rng.uniform(cfg.min_radius, cfg.max_radius) * s)
        if not mask.any():  # a lesion can never vanish: keep at least one pixel
            mask[s // 2, s // 2] = True
    # textured background: smooth low-frequency variation of the stroma colour
    texture = ndimage.gaussian_filter(rng.standard_normal((s, s)), sigma=max(s / 16, 1.0))
    texture = texture / (np.abs(texture).max() + 1e-8)
    base = _BACKGROUND[None, None, :] * (1.0 + 0.06 * texture[..., None])
    soft = ndimage.gaussian_filter(mask.astype(np.float64), sigma=0.7)[..., None]
    base = base * (1 - cfg.contrast * soft) + _LESION[None, None, :] * (cfg.contrast * soft)
    # nuclei: seeds at a density that is higher inside lesions, blurred into small dots
    density = np.where(mask, cfg.lesion_nuclei, cfg.background_nuclei)
    seeds = (rng.random((s, s)) < density).astype(np.float64)
    nuclei = np.clip(ndimage.gaussian_filter(seeds, sigma=0.8) * 4.0, 0.0, 1.0)[..., None]
    img = base * (1 - nuclei) + _NUCLEUS[None, None, :] * nuclei
    # stain-like colour jitter and pixel noise
    img = img * (1.0 + rng.uniform(-cfg.stain_jitter, cfg.stain_jitter, size=3))[None, None, :]
    img = img + rng.uniform(-cfg.stain_jitter, cfg.stain_jitter) * 0.5
    img = img + rng.normal(0.0, cfg.noise, size=img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32), mask.astype(np.uint8)
