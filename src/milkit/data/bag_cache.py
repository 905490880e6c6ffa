"""Bags kept in memory after their first read, up to a byte budget (``data.cache_gb``).

The one mechanism that keeps feature bags in memory: ``data.preload: true`` is this cache
warmed before training (every bag read once, ``features.preload_bags``), not a second copy.

Reading a bag's feature file again every epoch is most of what a training epoch over
pre-extracted features costs besides the model (docs/benchmarks.md, issue 15). A
:class:`BagCache` keeps each bag once it has been read, while the bytes kept stay within
the budget; a bag that no longer fits is read from disk on every access, as before.
Every access compares the (size, mtime) of the bag's source files with what they were
when the bag was cached, so a feature file rewritten during a run (``milkit extract``
again) is read afresh. Callers get a shallow copy of the cached bag (own ``meta`` dict),
so that setting an attribute on it never changes the cache; the tensors are shared and
must not be changed in place.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch

from milkit.data.bag import Bag

Signature = tuple[tuple[str, int, int], ...]


def file_signature(paths: Sequence[Path]) -> Signature | None:
    """(path, size, mtime_ns) of every source file; None when one of them is gone."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(out)


def nbytes(obj, _depth: int = 0) -> int:
    """Bytes held by the tensors in ``obj``: a tensor (sparse: indices + values), a list or
    tuple of them, or a dataclass holding them (a :class:`~milkit.data.graph.BagGraph`)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse:
            return nbytes(obj._indices()) + nbytes(obj._values())
        return obj.element_size() * obj.nelement()
    if _depth > 3:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(x, _depth + 1) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(nbytes(getattr(obj, f.name), _depth + 1) for f in dataclasses.fields(obj))
    return 0


def bag_bytes(bag: Bag) -> int:
    """Memory held by a bag's tensors (instances, instance labels, coords, graph)."""
    return sum(nbytes(t) for t in (bag.instances, bag.instance_labels, bag.coords, bag.adj))


def _copy(bag: Bag) -> Bag:
    return dataclasses.replace(bag, meta=dict(bag.meta))


class BagCache:
    """``get(key, sources, load)``: the cached bag when its sources are unchanged, else
    ``load()`` (kept when it fits within ``budget_bytes``; 0 keeps nothing, None has no limit)."""

    def __init__(self, budget_bytes: int | None):
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"cache budget must be ≥ 0 bytes, got {budget_bytes}")
        self.budget_bytes = None if budget_bytes is None else int(budget_bytes)
        self.used_bytes = 0
        self._items: dict[Hashable, tuple[Signature, Bag, int]] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable, sources: Sequence[Path], load: Callable[[], Bag]) -> Bag:
        """The bag ``key`` (from memory when its ``sources`` are unchanged, else ``load()``)."""
        if self.budget_bytes == 0:
            return load()
        sig = file_signature(sources)
        hit = self._items.get(key)
        if hit is not None:
            if sig is not None and hit[0] == sig:
                self.hits += 1
                return _copy(hit[1])
            self._drop(key)  # the file changed (or is gone): read it again
        self.misses += 1
        bag = load()
        after = file_signature(sources)  # a file written while it was read is not cached
        if sig is not None and after == sig:
            size = bag_bytes(bag)
            if self.budget_bytes is None or self.used_bytes + size <= self.budget_bytes:
                self._items[key] = (sig, bag, size)
                self.used_bytes += size
                return _copy(bag)
        return bag

    def _drop(self, key: Hashable) -> None:
        _, _, size = self._items.pop(key)
        self.used_bytes -= size

    def clear(self) -> None:
        """Forget every bag."""
        self._items.clear()
        self.used_bytes = 0
