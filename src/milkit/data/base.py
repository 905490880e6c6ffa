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

    def check(self, source: str = "data") -> None:
        """Refuse what cannot train or be scored: an empty split (named), a training split of one
        class; a dataset's own ``validate(source)`` (e.g. feature files) runs too."""
        for name in ("train", "val", "test"):
            if len(self.get(name)) == 0:
                raise ValueError(f"{source}: the {name} split is empty (0 bags)")
        classes = sorted(set(int(v) for v in self.train.labels))
        if len(classes) < 2:
            raise ValueError(f"{source}: the train split has only bags of label {classes[0]} "
                             f"({len(self.train)} bags); MIL training needs positive and negative bags")
        for name in ("train", "val", "test"):
            validate = getattr(self.get(name), "validate", None)
            if callable(validate):
                validate()

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
