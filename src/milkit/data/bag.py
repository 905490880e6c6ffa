"""The Bag: one weakly labelled sample (a slide, an image, a scan) and its instances.

Instances are whatever the model's encoder takes: image patches ``(N, C, H, W)``
or pre-extracted features ``(N, D)``. Instance labels are carried for scoring
only and are never used in training (the MIL assumption, NOTES.md "Common ground").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass
class Bag:
    """One bag. ``coords`` are level-0 top-left (x, y) pixels when the bag comes from a slide."""

    instances: Tensor
    label: int
    bag_id: str
    instance_labels: Tensor | None = None
    coords: Tensor | None = None
    meta: dict = field(default_factory=dict)
    #: optional bag graph (see milkit.data.graph); collated into a per-bag list
    adj: Any = None

    def __post_init__(self) -> None:
        n = self.instances.shape[0]
        if self.instance_labels is not None and self.instance_labels.shape[0] != n:
            raise ValueError(
                f"bag {self.bag_id!r}: {n} instances but {self.instance_labels.shape[0]} instance labels"
            )
        if self.coords is not None and self.coords.shape[0] != n:
            raise ValueError(f"bag {self.bag_id!r}: {n} instances but {self.coords.shape[0]} coords")

    def __len__(self) -> int:
        return int(self.instances.shape[0])


@dataclass
class BagBatch:
    """A padded batch of bags. ``mask[b, k]`` is True where instance k of bag b is real."""

    instances: Tensor  # (B, N_max, ...)
    mask: Tensor  # (B, N_max) bool
    labels: Tensor  # (B,) float
    bag_ids: list[str]
    instance_labels: Tensor | None  # (B, N_max) long, -1 where unknown or padded
    coords: Tensor | None  # (B, N_max, 2), 0 where padded
    sizes: Tensor  # (B,) long
    adj: list | None = None  # per-bag graphs (milkit.data.graph) when the bags carry them

    def to(self, device: torch.device | str) -> "BagBatch":
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return BagBatch(
            instances=self.instances.to(device),
            mask=self.mask.to(device),
            labels=self.labels.to(device),
            bag_ids=self.bag_ids,
            instance_labels=mv(self.instance_labels),
            coords=mv(self.coords),
            sizes=self.sizes.to(device),
            adj=None if self.adj is None else [a.to(device) if hasattr(a, "to") else a for a in self.adj],
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def collate_bags(bags: Sequence[Bag]) -> BagBatch:
    """Pad bags to the longest one; padded instances are zeros and ``mask`` is False there."""
    if len(bags) == 0:
        raise ValueError("collate_bags needs at least one bag")
    sizes = [len(b) for b in bags]
    n_max = max(sizes)
    inst_shape = tuple(bags[0].instances.shape[1:])
    for b in bags:
        if tuple(b.instances.shape[1:]) != inst_shape:
            raise ValueError(
                f"bag {b.bag_id!r} has instances of shape {tuple(b.instances.shape[1:])}, expected {inst_shape}"
            )
    if len(bags) == 1:  # nothing to pad (batch size 1): views of the bag's tensors, no copy
        return _collate_one(bags[0])
    x = bags[0].instances.new_zeros((len(bags), n_max, *inst_shape))
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    any_inst = any(b.instance_labels is not None for b in bags)
    any_coords = any(b.coords is not None for b in bags)
    inst = torch.full((len(bags), n_max), -1, dtype=torch.long) if any_inst else None
    coords = torch.zeros(len(bags), n_max, 2, dtype=torch.long) if any_coords else None
    for i, b in enumerate(bags):
        n = sizes[i]
        x[i, :n] = b.instances
        mask[i, :n] = True
        if inst is not None and b.instance_labels is not None:
            inst[i, :n] = b.instance_labels.long()
        if coords is not None and b.coords is not None:
            coords[i, :n] = b.coords.long()
    return BagBatch(
        instances=x,
        mask=mask,
        labels=torch.tensor([float(b.label) for b in bags]),
        bag_ids=[b.bag_id for b in bags],
        instance_labels=inst,
        coords=coords,
        sizes=torch.tensor(sizes, dtype=torch.long),
        adj=[b.adj for b in bags] if any(b.adj is not None for b in bags) else None,
    )


def _collate_one(b: Bag) -> BagBatch:
    """The batch of one bag: what :func:`collate_bags` pads to, without copying the instances
    (the batch's tensors are views of the bag's; nothing in milkit writes into a batch)."""
    n = len(b)
    return BagBatch(
        instances=b.instances.unsqueeze(0),
        mask=torch.ones(1, n, dtype=torch.bool),
        labels=torch.tensor([float(b.label)]),
        bag_ids=[b.bag_id],
        instance_labels=None if b.instance_labels is None else b.instance_labels.long().unsqueeze(0),
        coords=None if b.coords is None else b.coords.long().unsqueeze(0),
        sizes=torch.tensor([n], dtype=torch.long),
        adj=None if b.adj is None else [b.adj],
    )


class BagDataset(torch.utils.data.Dataset):
    """A list of bags as a map-style dataset."""

    def __init__(self, bags: Sequence[Bag]):
        self.bags = list(bags)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> Bag:
        return self.bags[i]

    @property
    def labels(self) -> list[int]:
        return [b.label for b in self.bags]
