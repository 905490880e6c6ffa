"""Bag- and instance-level classification metrics, and threshold selection on validation.

NOTES.md "Common ground": instance AUROC on raw scores; F1/accuracy at a
threshold chosen on the validation split, as the argmax of F1 (``criterion="f1"``, what
training uses by default, issue 11 §4), of tpr·(1−fpr) (``"youden_product"``, the earlier
default: it picks low thresholds when positives are rare) or of Youden's J = tpr − fpr
(``"youden"``). Never on test. :func:`bootstrap_auroc` gives a percentile bootstrap
interval, resampling whole groups (slides) when ``groups`` is given.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score, roc_curve, precision_recall_curve

Criterion = Literal["f1", "youden_product", "youden"]
#: the criteria :func:`choose_threshold` knows, in the order the docs list them
CRITERIA: tuple[str, ...] = ("f1", "youden_product", "youden")


def _arrays(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.shape[0]} labels but {s.shape[0]} scores")
    return y, s


def auroc(y_true, scores) -> float:
    """Area under the ROC curve; NaN when only one class is present (undefined)."""
    y, s = _arrays(y_true, scores)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def choose_threshold(y_true, scores, criterion: Criterion = "youden_product") -> float:
    """Threshold on ``scores`` maximising tpr·(1−fpr), tpr − fpr or F1 over the given (validation) labels."""
    y, s = _arrays(y_true, scores)
    if len(np.unique(y)) < 2:
        raise ValueError("threshold selection needs both classes in the validation labels")
    if criterion in ("youden_product", "youden"):
        fpr, tpr, thr = roc_curve(y, s)
        obj = tpr * (1.0 - fpr) if criterion == "youden_product" else tpr - fpr
        thr = np.where(np.isinf(thr), s.max() + 1.0, thr)
        return float(thr[int(np.argmax(obj))])
    if criterion == "f1":
        prec, rec, thr = precision_recall_curve(y, s)
        f1 = 2 * prec[:-1] * rec[:-1] / np.clip(prec[:-1] + rec[:-1], 1e-12, None)
        return float(thr[int(np.argmax(f1))])
    raise ValueError(f"unknown threshold criterion {criterion!r}")


def binary_metrics(y_true, scores, threshold: float) -> dict[str, float]:
    """AUROC on raw scores; F1 and accuracy of ``scores >= threshold``."""
    y, s = _arrays(y_true, scores)
    pred = (s >= threshold).astype(int)
    return {
        "auroc": auroc(y, s),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "accuracy": float(accuracy_score(y, pred)),
        "n": int(y.size),
        "n_pos": int(y.sum()),
    }


def _grouped_auroc(pos_w: np.ndarray, neg_w: np.ndarray) -> np.ndarray:
    """AUROC of weighted instances from per-unique-score weight sums (rows: resamples;
    columns: unique scores in increasing order); ties count one half (Mann–Whitney)."""
    below = np.cumsum(neg_w, axis=1) - neg_w  # negative weight strictly below each score
    num = (pos_w * (below + 0.5 * neg_w)).sum(axis=1)
    den = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_auroc(y_true, scores, groups=None, n_boot: int = 1000, level: float = 0.95,
                    seed: int = 0) -> dict[str, float]:
    """AUROC and its percentile bootstrap interval (Efron & Tibshirani 1993, §13.3).

    With ``groups`` (e.g. the slide of each patch) whole groups are resampled, so that
    correlated patches of one slide do not narrow the interval. Resamples holding one class
    only are dropped (``n_boot_used`` says how many remained). NaN when undefined.
    """
    y, s = _arrays(y_true, scores)
    point = auroc(y, s)
    out = {"auroc": point, "low": float("nan"), "high": float("nan"), "level": level, "n_boot_used": 0}
    if math.isnan(point):
        return out
    _, u = np.unique(s, return_inverse=True)
    n_u = int(u.max()) + 1
    if groups is None:
        g = np.arange(len(y))
    else:
        _, g = np.unique(np.asarray(groups).ravel(), return_inverse=True)
    n_g = int(g.max()) + 1
    # per group: weight sums per unique score, for positives and negatives (sparse → dense per chunk)
    rng = np.random.default_rng(seed)
    aucs = []
    chunk = max(1, min(n_boot, 2_000_000 // max(n_u, 1)))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        counts = np.stack([np.bincount(rng.integers(0, n_g, n_g), minlength=n_g) for _ in range(m)])  # (m, n_g)
        w = counts[:, g]  # (m, n) weight of each instance
        pos = np.zeros((m, n_u))
        neg = np.zeros((m, n_u))
        for r in range(m):
            pos[r] = np.bincount(u, weights=w[r] * (y == 1), minlength=n_u)
            neg[r] = np.bincount(u, weights=w[r] * (y == 0), minlength=n_u)
        aucs.append(_grouped_auroc(pos, neg))
    a = np.concatenate(aucs)
    a = a[np.isfinite(a)]
    if a.size:
        alpha = (1 - level) / 2
        out.update(low=float(np.quantile(a, alpha)), high=float(np.quantile(a, 1 - alpha)), n_boot_used=int(a.size))
    return out


def nan_to_none(d: dict) -> dict:
    """JSON-friendly copy: NaN → None (recursively, through dicts and lists)."""

    def conv(v):
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, float) and math.isnan(v):
            return None
        return v

    return conv(d)
