"""Train/validation/test splits: stratified by label, grouped by case (FORMATS.md "Slide labels
and splits": one patient's slides never straddle two splits).

Defaults: 70/10/20 and 5 folds (Distill-to-Label §IV, NOTES.md "Colon/breast: 70/10/20 split,
5 folds"). scikit-learn's ``StratifiedGroupKFold`` makes the k folds; fractions are met by
dealing whole cases, class by class, in a seeded random order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

Split = tuple[np.ndarray, np.ndarray, np.ndarray]


def _check(labels: Sequence, groups: Sequence | None) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"{len(y)} labels but {len(g)} groups")
    return y, g


def _group_strata(y: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique groups, each group's stratum (its largest label: a case with any positive slide is
    positive) and its size."""
    uniq, inv = np.unique(g, return_inverse=True)
    strat = np.full(len(uniq), -np.inf)
    np.maximum.at(strat, inv, y.astype(np.float64))
    size = np.bincount(inv, minlength=len(uniq))
    return uniq, strat, size


def stratified_group_split(labels: Sequence, groups: Sequence | None = None,
                           fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> list[np.ndarray]:
    """Indices of each part (as many parts as ``fractions``, which must sum to 1).

    Per class, cases are shuffled with ``seed`` and dealt so that each part's share of that
    class's cases is as close as possible to its fraction (largest remainder); a part with a
    positive fraction gets at least one case of every class that has enough cases.
    """
    y, g = _check(labels, groups)
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) < 1 or np.any(fr < 0) or abs(fr.sum() - 1) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    uniq, strat, size = _group_strata(y, g)
    part_of_group = np.zeros(len(uniq), np.int64)
    for s in np.unique(strat):
        idx = np.flatnonzero(strat == s)
        idx = idx[rng.permutation(len(idx))]
        # number of cases per part: largest remainder on case counts
        n = len(idx)
        want = fr * n
        cnt = np.floor(want).astype(np.int64)
        for k in np.argsort(-(want - cnt), kind="stable")[: n - cnt.sum()]:
            cnt[k] += 1
        # every part with a positive fraction gets a case when there are enough cases
        if n >= int((fr > 0).sum()):
            for k in np.flatnonzero((fr > 0) & (cnt == 0)):
                donor = int(np.argmax(cnt))
                cnt[donor] -= 1
                cnt[k] += 1
        part_of_group[idx] = np.repeat(np.arange(len(fr)), cnt)
    inv = np.unique(g, return_inverse=True)[1]
    part = part_of_group[inv]
    return [np.flatnonzero(part == k) for k in range(len(fr))]


def kfold_splits(labels: Sequence, groups: Sequence | None = None, k: int = 5, seed: int = 0,
                 val_fraction: float = 0.1) -> list[Split]:
    """``k`` (train, val, test) index triples: test folds from ``StratifiedGroupKFold``; the
    validation part is carved out of the rest by :func:`stratified_group_split`."""
    y, g = _check(labels, groups)
    if k < 2:
        raise ValueError(f"k-fold needs k ≥ 2, got {k}")
    n_groups = len(np.unique(g))
    if n_groups < k:
        raise ValueError(f"{k} folds need at least {k} cases, got {n_groups}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    out = []
    for fold, (rest, test) in enumerate(skf.split(np.zeros(len(y)), y, g)):
        tr, va = stratified_group_split(y[rest], g[rest], (1 - val_fraction, val_fraction), seed + fold)
        out.append((np.sort(rest[tr]), np.sort(rest[va]), np.sort(test)))
    return out
