"""Dataset configs and the train/validation/test splits every Method receives."""

from __future__ import annotations

from dataclasses import dataclass

from milkit.config import StrictModel
from milkit.data.bag import BagDataset


@dataclass
class DataSplits:
    """Bags for training (bag labels only are used), validation (model and threshold
    selection) and test (reported numbers)."""

    train: BagDataset
    val: BagDataset
    test: BagDataset

    def get(self, split: str) -> BagDataset:
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; use train, val or test")
        return getattr(self, split)


class DataConfig(StrictModel):
    """Base of every dataset config: ``kind`` names it in registry.DATASETS."""

    kind: str

    def build(self, seed: int) -> DataSplits:  # pragma: no cover - abstract
        """Build the three splits deterministically from ``seed``."""
        raise NotImplementedError
