"""Digit-bags: the MNIST-bags protocol of Ilse et al. (2018) used in Distill-to-Label §III-B.

A bag is positive iff it holds at least one ``target_digit`` (9). Bag size is
round(N(K, σ)) with K ∈ {10, 20} and variance 5 (σ = √5, D2L §III-B), at least 1.
Positive and negative bags are balanced. The digit images are split first into
disjoint train/validation/test pools, so test bags never reuse a training image.
Instance labels (digit == target) are kept for scoring only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from milkit.data.bag import Bag, BagDataset
from milkit.data.base import DataConfig, DataSplits
from milkit.data.digits import load_digit_images


class DigitBagsConfig(DataConfig):
    """D2L §III-B / Ilse et al. MNIST-bags."""

    kind: Literal["digit_bags"] = "digit_bags"
    mean_bag_size: int = Field(10, ge=1, description="K ∈ {10, 20}, D2L §III-B")
    bag_size_std: float = Field(math.sqrt(5.0), ge=0, description="variance 5, D2L §III-B")
    n_train: int = Field(100, ge=2, description="N ∈ {50, 75, 100, 200, 500}, D2L §III-B")
    n_val: int = Field(1000, ge=2, description="a fixed set of 1000 validation bags, D2L §III-B")
    n_test: int = Field(1000, ge=2)
    target_digit: int = Field(9, ge=0, le=9, description="positive iff the bag holds a 9")
    mnist_path: Path | None = Field(None, description=".npz (images, labels) or folder of MNIST IDX files")
    image_fractions: tuple[float, float, float] = Field(
        (0.6, 0.2, 0.2), description="split of the digit images into train/val/test pools"
    )

    def build(self, seed: int) -> DataSplits:
        images, labels = load_digit_images(self.mnist_path)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(labels))
        f = np.asarray(self.image_fractions, dtype=float)
        if np.any(f <= 0):
            raise ValueError("data.image_fractions must all be > 0")
        cuts = np.cumsum(f / f.sum())[:2] * len(order)
        pools = np.split(order, cuts.astype(int))
        sizes = {"train": self.n_train, "val": self.n_val, "test": self.n_test}
        out = {}
        for (name, n), pool in zip(sizes.items(), pools):
            out[name] = BagDataset(make_digit_bags(images, labels, pool, n, self, rng, prefix=name))
        return DataSplits(**out)


def make_digit_bags(
    images: torch.Tensor,
    labels: np.ndarray,
    pool: np.ndarray,
    n_bags: int,
    cfg: DigitBagsConfig,
    rng: np.random.Generator,
    prefix: str = "bag",
) -> list[Bag]:
    """``n_bags`` balanced bags from the image indices in ``pool``.

    Negative bags are drawn from the non-target images (the distribution of random bags
    conditioned on holding no target); positive bags are random bags redrawn until they
    hold a target (conditioned on at least one).
    """
    is_target = labels[pool] == cfg.target_digit
    pos_pool, neg_pool = pool[is_target], pool[~is_target]
    if len(pos_pool) == 0 or len(neg_pool) == 0:
        raise ValueError(f"the {prefix} image pool needs both target and non-target digits")
    bags = []
    for i in range(n_bags):
        positive = i % 2 == 0
        size = max(1, int(round(rng.normal(cfg.mean_bag_size, cfg.bag_size_std))))
        if positive:
            for _ in range(10_000):
                idx = rng.choice(pool, size=size, replace=True)
                if (labels[idx] == cfg.target_digit).any():
                    break
            else:  # pragma: no cover - vanishingly unlikely
                idx = np.concatenate([rng.choice(pos_pool, 1), rng.choice(pool, size - 1)])
        else:
            idx = rng.choice(neg_pool, size=size, replace=True)
        inst = torch.from_numpy((labels[idx] == cfg.target_digit).astype(np.int64))
        bags.append(
            Bag(
                instances=images[idx],
                label=int(positive),
                bag_id=f"{prefix}_{i:04d}",
                instance_labels=inst,
                meta={"digits": labels[idx].tolist()},
            )
        )
    order = rng.permutation(n_bags)
    return [bags[j] for j in order]
