"""Bag- and instance-level classification metrics, and threshold selection on validation.

NOTES.md "Common ground": instance AUROC on raw scores; F1/accuracy at a
threshold chosen on the validation split, here the argmax of tpr·(1−fpr)
(``criterion="youden_product"``) or of F1 (``criterion="f1"``). Never on test.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score, roc_curve, precision_recall_curve

Criterion = Literal["youden_product", "f1"]


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
    """Threshold on ``scores`` maximising tpr·(1−fpr) or F1 over the given (validation) labels."""
    y, s = _arrays(y_true, scores)
    if len(np.unique(y)) < 2:
        raise ValueError("threshold selection needs both classes in the validation labels")
    if criterion == "youden_product":
        fpr, tpr, thr = roc_curve(y, s)
        obj = tpr * (1.0 - fpr)
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


def nan_to_none(d: dict) -> dict:
    """JSON-friendly copy: NaN → None (recursively)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = nan_to_none(v)
        elif isinstance(v, float) and math.isnan(v):
            out[k] = None
        else:
            out[k] = v
    return out
