"""Pixel-level segmentation metrics, computed per image and then averaged.

Conventions (Max-Min §5.1 "Evaluation", IKD-MIL §4.2 "Evaluation metrics"; issue 12):

* ``f1_pos`` (F1+) = Dice of the foreground masks averaged over *tumour* images (truth
  has foreground) — on a normal image F1+ is 0 for any non-empty prediction and says
  nothing about localisation; ``f1_pos_all`` averages it over every image (GlaS: the
  same, every image has glands). ``f1_neg`` (F1−) = Dice of the background masks over
  every image. When both masks of a region are empty the score is 1.
* ``f1`` is IKD-MIL's F1: F1+ on tumour images and F1− on normal images, averaged
  over all images; ``iou`` likewise: IoU+ (foreground IoU) on tumour images and IoU−
  (background IoU) on normal ones. ``iou_pos`` / ``iou_neg`` are IoU+ on tumour images
  and IoU− on normal images; ``iou_fg`` is foreground IoU over every image.
* ``hd_pos`` (HD^Pos) = symmetric Hausdorff distance (pixels) between the *borders*
  of the predicted and true foreground (a pixel of a region with a 4-neighbour outside
  it or on the image edge), on tumour images only (scipy ``directed_hausdorff``); an
  empty prediction on a tumour image scores the image diagonal.
* ``confusion`` = pixel confusion matrix summed over all pixels of all images.
* Image level: ``classification_error`` at 0.5 and ``image_auroc``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import directed_hausdorff

from milkit.metrics.classification import auroc, nan_to_none


def _binary(mask, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{name} mask must be 2-D (H, W), got shape {m.shape}")
    return m.astype(bool)


def dice(pred, truth) -> float:
    """2|P∩T| / (|P| + |T|); 1.0 when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = p.sum() + t.sum()
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, t).sum() / denom)


def iou(pred, truth) -> float:
    """|P∩T| / |P∪T|; 1.0 when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    union = np.logical_or(p, t).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(p, t).sum() / union)


def border(mask) -> np.ndarray:
    """Border pixels of a binary mask: in the mask, with a 4-neighbour outside it
    (pixels on the image edge count as border)."""
    m = np.asarray(mask, bool)
    return m & ~binary_erosion(m, structure=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool), border_value=0)


def hausdorff(pred, truth, borders: bool = True) -> float:
    """Symmetric Hausdorff distance (pixels) between the borders of the foregrounds
    (``borders=False``: between the filled pixel sets).

    NaN when the truth is empty (undefined, HD is reported on positive images only);
    the image diagonal when the prediction is empty but the truth is not.
    """
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if not t.any():
        return float("nan")
    if not p.any():
        return float(math.hypot(*t.shape))
    if borders:
        p, t = border(p), border(t)
    a, b = np.argwhere(p), np.argwhere(t)
    return float(max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]))


def image_metrics(pred, truth) -> dict[str, float]:
    """All per-image scores of one binary prediction against its truth mask."""
    p, t = _binary(pred, "predicted"), _binary(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"predicted mask has shape {p.shape} but truth mask has shape {t.shape}")
    positive = bool(t.any())
    f1p, f1n = dice(p, t), dice(~p, ~t)
    iou_fg, iou_bg = iou(p, t), iou(~p, ~t)
    return {
        "positive": positive,
        "f1_pos": f1p,
        "f1_neg": f1n,
        "f1": f1p if positive else f1n,
        "iou_fg": iou_fg,
        "iou_bg": iou_bg,
        "iou": iou_fg if positive else iou_bg,
        "hd": hausdorff(p, t),
        "tp": int(np.logical_and(p, t).sum()),
        "fp": int(np.logical_and(p, ~t).sum()),
        "fn": int(np.logical_and(~p, t).sum()),
        "tn": int(np.logical_and(~p, ~t).sum()),
    }


@dataclass
class PixelMetricAccumulator:
    """Streams images one at a time (no dataset-sized arrays kept) and summarises."""

    rows: list[dict] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)

    def add(self, pred_mask, truth_mask, image_label: int | None = None, image_prob: float | None = None) -> dict:
        """Score one image; returns its per-image row."""
        row = image_metrics(pred_mask, truth_mask)
        self.rows.append(row)
        if image_label is not None and image_prob is not None:
            self.labels.append(int(image_label))
            self.probs.append(float(image_prob))
        return row

    def add_image(self, image_label: int, image_prob: float) -> None:
        """Image-level score of an image without a truth mask."""
        self.labels.append(int(image_label))
        self.probs.append(float(image_prob))

    def summary(self) -> dict:
        return summarize(self.rows, self.labels, self.probs)


def summarize(rows: list[dict], labels=None, probs=None) -> dict:
    """Average per-image rows; add the pixel confusion matrix and image-level scores."""
    out: dict = {"n_images": len(rows)}
    if rows:
        pos = [r for r in rows if r["positive"]]
        neg = [r for r in rows if not r["positive"]]
        out["n_positive"] = len(pos)

        def mean(k: str, rs: list[dict]) -> float:
            return float(np.mean([r[k] for r in rs])) if rs else float("nan")

        for k in ("f1_neg", "f1", "iou", "iou_fg"):
            out[k] = mean(k, rows)
        out["f1_pos"] = mean("f1_pos", pos)  # F1+ on tumour images (issue 12)
        out["f1_pos_on_pos"] = out["f1_pos"]  # older name, same value
        out["f1_pos_all"] = mean("f1_pos", rows)
        out["iou_pos"] = mean("iou_fg", pos)
        out["iou_neg"] = mean("iou_bg", neg)
        out["hd_pos"] = mean("hd", pos)
        conf = {k: int(sum(r[k] for r in rows)) for k in ("tp", "fp", "fn", "tn")}
        out["confusion"] = {**conf, "matrix_rows_truth_cols_pred": [[conf["tn"], conf["fp"]], [conf["fn"], conf["tp"]]]}
    if labels is not None and len(labels):
        y = np.asarray(labels, int)
        p = np.asarray(probs, float)
        out.update(image_level(y, p))
    return nan_to_none(out)


def image_level(labels, probs, threshold: float = 0.5) -> dict[str, float]:
    """Image classification error at ``threshold`` and AUROC (Max-Min Tables 1–2)."""
    y = np.asarray(labels, int).ravel()
    p = np.asarray(probs, float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} image labels but {p.size} image probabilities")
    err = float(np.mean((p >= threshold).astype(int) != y)) if y.size else float("nan")
    return {"classification_error": err, "image_auroc": auroc(y, p)}
