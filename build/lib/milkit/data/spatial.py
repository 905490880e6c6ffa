"""Spatial bags: instances on a 2-D patch grid whose positive instances form contiguous blobs.

The synthetic behind ``milkit benchmark spatial`` (Sm paper's premise, §4: neighbouring
instances tend to share a label). Each bag is a ``h × w`` grid (sides drawn in
[min_side, max_side]) with a fraction of cells missing (background). Every cell holds a
feature vector: the prototype of its background "tissue type" (a Voronoi partition of
the grid into ``n_tissue_types`` regions, so the background is spatially coherent too)
plus Gaussian noise; positive cells — one to ``max_blobs`` discs of radius in
``blob_radius`` placed in positive bags — add ``signal`` along a fixed direction. A
single instance is thus only moderately separable (d′ = signal / noise), while its
neighbourhood is informative. Coordinates are level-0 top-left pixels of
``patch_size`` patches, and ``Bag.adj`` is the 8-neighbour graph
(:func:`milkit.data.graph.grid_adjacency`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from milkit.data.bag import Bag, BagDataset
from milkit.data.base import DataConfig, DataSplits
from milkit.data.graph import grid_adjacency


class SpatialBagsConfig(DataConfig):
    """Bags of feature vectors on a grid with blobs of positive instances."""

    kind: Literal["spatial_bags"] = "spatial_bags"
    n_train: int = Field(200, ge=2)
    n_val: int = Field(60, ge=2)
    n_test: int = Field(100, ge=2)
    min_side: int = Field(8, ge=2, description="grid side range (cells)")
    max_side: int = Field(14, ge=2)
    feature_dim: int = Field(32, ge=2)
    n_tissue_types: int = Field(4, ge=1, description="background regions (Voronoi cells) per bag")
    signal: float = Field(2.0, gt=0, description="shift of positive instances along a fixed direction")
    noise: float = Field(1.0, gt=0, description="per-feature Gaussian noise")
    prototype_scale: float = Field(1.0, ge=0, description="spread of the background prototypes")
    max_blobs: int = Field(2, ge=1)
    blob_radius: tuple[float, float] = Field((1.0, 2.5), description="disc radius range (cells)")
    missing_rate: float = Field(0.1, ge=0, lt=1, description="fraction of grid cells without an instance")
    patch_size: int = Field(224, ge=1, description="patch side in level-0 pixels (coords = cell × patch_size)")

    @model_validator(mode="after")
    def _check(self) -> "SpatialBagsConfig":
        if self.max_side < self.min_side:
            raise ValueError("data.max_side must be >= data.min_side")
        if not 0 < self.blob_radius[0] <= self.blob_radius[1]:
            raise ValueError("data.blob_radius must be (low, high) with 0 < low <= high")
        return self

    def build(self, seed: int) -> DataSplits:
        rng = np.random.default_rng(seed)
        protos = rng.normal(0, self.prototype_scale, (self.n_tissue_types, self.feature_dim))
        direction = rng.normal(size=self.feature_dim)
        direction /= np.linalg.norm(direction)
        out = {}
        for name, n in (("train", self.n_train), ("val", self.n_val), ("test", self.n_test)):
            bags = [make_spatial_bag(self, rng, protos, direction, positive=i % 2 == 0, bag_id=f"{name}_{i:04d}")
                    for i in range(n)]
            out[name] = BagDataset([bags[j] for j in rng.permutation(n)])
        return DataSplits(**out)


def make_spatial_bag(cfg: SpatialBagsConfig, rng: np.random.Generator, protos: np.ndarray,
                     direction: np.ndarray, positive: bool, bag_id: str) -> Bag:
    """One grid bag; a positive bag holds at least one positive instance."""
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
        rows, cols = np.mgrid[0:h, 0:w]
        rows, cols = rows.ravel(), cols.ravel()
        keep = rng.random(rows.size) >= cfg.missing_rate
        rows, cols = rows[keep], cols[keep]
        if rows.size == 0:
            continue
        label = np.zeros(rows.size, dtype=np.int64)
        if positive:
            for _ in range(int(rng.integers(1, cfg.max_blobs + 1))):
                cy, cx = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
                r = rng.uniform(*cfg.blob_radius)
                label[(rows - cy) ** 2 + (cols - cx) ** 2 <= r * r] = 1
            if label.sum() == 0:
                continue
        break
    else:  # pragma: no cover - would need absurd settings
        raise ValueError(f"could not place a blob in bag {bag_id}; check blob_radius and missing_rate")
    seeds = np.stack([rng.uniform(0, h, cfg.n_tissue_types), rng.uniform(0, w, cfg.n_tissue_types)], 1)
    d2 = (rows[:, None] - seeds[None, :, 0]) ** 2 + (cols[:, None] - seeds[None, :, 1]) ** 2
    tissue = d2.argmin(1)
    x = protos[tissue] + cfg.noise * rng.normal(size=(rows.size, cfg.feature_dim))
    x += cfg.signal * label[:, None] * direction[None, :]
    coords = torch.from_numpy(np.stack([cols, rows], 1) * cfg.patch_size).long()
    return Bag(
        instances=torch.from_numpy(x).float(),
        label=int(positive),
        bag_id=bag_id,
        instance_labels=torch.from_numpy(label),
        coords=coords,
        meta={"grid": (h, w), "patch_size": cfg.patch_size},
        adj=grid_adjacency(coords, cfg.patch_size),
    )
