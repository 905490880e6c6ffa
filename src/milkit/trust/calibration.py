"""Calibrated probabilities from a method's raw instance scores, fitted on validation.

Platt scaling (Platt 1999): ``p = σ(a·z + b)`` with ``z = (t − centre) / scale`` and
``t`` the raw score (an attention logit, …) or, for scores that already are
probabilities, their logit. The slope is constrained to ``a ≥ 0``, so the map is
monotone non-decreasing; strictly increasing whenever ``a > 0``, so instance AUROC and
the ranking of patches are those of the raw score. A model whose scores run the wrong
way on validation gets ``a = 0``: one constant probability (the validation base rate),
never a flipped map. Platt's smoothed targets ``(N₊+1)/(N₊+2)`` and ``1/(N₋+2)`` keep
``a`` finite on separable data.

What the probability is fitted to (``source`` in ``calibration.json``, metrics.json and
the report):

- ``validation patch labels``: every labelled validation instance with its label
  (unweighted, so the probability is a frequency at the validation prevalence);
- ``validation slide labels``: instances of negative validation slides as 0 (MIL: all
  negative) and the top-scored instance of each positive validation slide as 1 (MIL: at
  least one positive), the two classes weighted equally. The probability then reads "how
  much this patch looks like the most suspicious patch of a positive slide rather than
  like negative tissue"; it is not a patch-level frequency.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

SOURCE_PATCH = "validation patch labels"
SOURCE_SLIDE = "validation slide labels (negative-slide patches = 0, top patch of each positive slide = 1)"
_EPS = 1e-6


@dataclass
class Calibrator:
    """A fitted monotone map raw score → probability (see module docstring)."""

    slope: float
    intercept: float
    centre: float = 0.0
    scale: float = 1.0
    logit_input: bool = False
    source: str = "none"
    n_pos: int = 0
    n_neg: int = 0

    def transform(self, raw) -> np.ndarray:
        """The standardised input z of the raw scores."""
        t = np.asarray(raw, np.float64)
        if self.logit_input:
            c = np.clip(t, _EPS, 1 - _EPS)
            t = np.log(c) - np.log1p(-c)
        return (t - self.centre) / self.scale

    def __call__(self, raw) -> np.ndarray:
        """Calibrated probabilities, same shape as ``raw``."""
        return _sigmoid(self.slope * self.transform(raw) + self.intercept)

    def to_dict(self) -> dict:
        return {"method": "platt (slope >= 0)", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def fit_platt(z: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """(a ≥ 0, b) minimising the weighted cross-entropy of σ(a z + b) against Platt's smoothed
    targets. ``weights`` default to 1; each class's targets use its effective count."""
    z = np.asarray(z, np.float64).ravel()
    y = np.asarray(y).astype(int).ravel()
    w = np.ones_like(z) if weights is None else np.asarray(weights, np.float64).ravel()
    n_pos, n_neg = float(w[y == 1].sum()), float(w[y == 0].sum())
    # effective class counts (Kish) for the smoothed targets
    k_pos = n_pos**2 / max(float((w[y == 1] ** 2).sum()), 1e-12) if n_pos > 0 else 0.0
    k_neg = n_neg**2 / max(float((w[y == 0] ** 2).sum()), 1e-12) if n_neg > 0 else 0.0
    t = np.where(y == 1, (k_pos + 1) / (k_pos + 2), 1 / (k_neg + 2))
    w = w / w.sum()

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = theta
        f = a * z + b
        # -[t log σ(f) + (1-t) log(1-σ(f))] = softplus(f) - t f
        sp = np.logaddexp(0.0, f)
        val = float((w * (sp - t * f)).sum())
        r = w * (_sigmoid(f) - t)
        return val, np.array([float((r * z).sum()), float(r.sum())])

    prior = (n_pos + 1) / (n_pos + n_neg + 2)
    b0 = math.log(prior / (1 - prior))
    res = minimize(loss, np.array([1.0, b0]), jac=True, method="L-BFGS-B", bounds=[(0.0, None), (None, None)])
    a, b = (float(v) for v in res.x)
    return max(a, 0.0), b


def fit_calibrator(raw: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, *,
                   logit_input: bool = False, source: str = SOURCE_PATCH) -> Calibrator:
    """Fit a :class:`Calibrator` on validation ``raw`` scores with 0/1 targets ``y``."""
    raw = np.asarray(raw, np.float64).ravel()
    y = np.asarray(y).astype(int).ravel()
    if raw.size == 0 or len(np.unique(y)) < 2:
        raise ValueError("calibration needs both classes among the validation targets")
    base = Calibrator(0.0, 0.0, logit_input=logit_input)
    t = base.transform(raw)
    centre = float(np.median(t))
    scale = float(np.std(t)) or 1.0
    cal = Calibrator(0.0, 0.0, centre, scale, logit_input, source, int((y == 1).sum()), int((y == 0).sum()))
    a, b = fit_platt(cal.transform(raw), y, weights)
    cal.slope, cal.intercept = a, b
    return cal


def _cal_key(rows: list[dict]) -> str:
    return "calibration_input" if rows and rows[0].get("calibration_input") is not None else "raw"


def slide_label_targets(rows: list[dict], key: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw, target, weight) from slide labels: every instance of a negative slide → 0, the top
    instance of each positive slide → 1; classes weighted equally (module docstring)."""
    key = key or _cal_key(rows)
    neg = [np.asarray(r[key], np.float64) for r in rows if r["label"] == 0 and len(r[key])]
    pos = [float(np.max(r[key])) for r in rows if r["label"] == 1 and len(r[key])]
    if not neg or not pos:
        raise ValueError("calibration from slide labels needs negative and positive validation slides")
    n = np.concatenate(neg)
    raw = np.concatenate([n, np.asarray(pos)])
    y = np.concatenate([np.zeros(len(n), int), np.ones(len(pos), int)])
    w = np.where(y == 1, 1.0 / len(pos), 1.0 / len(n))
    return raw, y, w


def sure_positive_targets(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, target, weight) for :func:`label_free_threshold`'s ``sure_positives``: every instance of a
    negative slide → 0; every instance of a positive slide above the highest negative-slide instance → 1
    (at least the slide's top instance, as :func:`slide_label_targets`); classes weighted equally."""
    neg = [np.asarray(r[key], np.float64) for r in rows if r["label"] == 0 and len(r[key])]
    if not neg or not any(r["label"] == 1 and len(r[key]) for r in rows):
        raise ValueError("a threshold from slide labels needs negative and positive validation slides")
    n = np.concatenate(neg)
    top = float(n.max())
    pos = []
    for r in rows:
        v = np.asarray(r[key], np.float64)
        if r["label"] == 1 and len(v):
            sure = v[v > top]
            pos.append(sure if len(sure) else v[[int(np.argmax(v))]])
    p = np.concatenate(pos)
    raw = np.concatenate([n, p])
    y = np.concatenate([np.zeros(len(n), int), np.ones(len(p), int)])
    return raw, y, np.where(y == 1, 1.0 / len(p), 1.0 / len(n))


#: ``trainer.label_free_threshold``: the instance threshold when validation has no instance labels
LABEL_FREE_RULES = ("top_patch", "sure_positives")


def label_free_threshold(rows: list[dict], values, rule: str) -> float | None:
    """The instance threshold, on the calibrated probability, from validation *slide* labels alone
    (docs/benchmarks.md, "Patch labels without patch annotations"):

    - ``top_patch``: 0.5, i.e. where the probability calibrated from slide labels
      (:func:`slide_label_targets`) crosses one half;
    - ``sure_positives``: 0.5 of a Platt map fitted on :func:`sure_positive_targets` (the
      probabilities' logits), i.e. the positives are every positive-slide patch above the highest
      negative-slide patch. More recall where lesions are large (measured: hard-bags 10 of 12 cells,
      the demo slides); fooled where look-alikes are more common in positive slides.

    None when ``sure_positives`` has no negative or no positive validation slide to fit on.
    """
    if rule not in LABEL_FREE_RULES:
        raise ValueError(f"trainer.label_free_threshold must be one of {', '.join(LABEL_FREE_RULES)}, got {rule!r}")
    if rule == "top_patch":
        return 0.5
    vals = [{"label": r["label"], "v": np.asarray(values(r), np.float64)} for r in rows]
    try:
        raw, y, w = sure_positive_targets(vals, "v")
    except ValueError:
        return None
    cal = fit_calibrator(raw, y, w, logit_input=True, source="sure positives")
    grid = np.unique(np.concatenate([v["v"] for v in vals]))
    above = grid[cal(grid) >= 0.5]
    return float(above.min()) if above.size else float(np.nextafter(grid.max(), np.inf))


def calibrate_rows(rows: list[dict], logit_input: bool = False) -> Calibrator:
    """Calibrator for one labeler from its validation rows (``Labeler.predict_dataset``), on their
    ``calibration_input`` (instance logits for probability scores) when present, else ``raw``
    (``logit_input``: raw scores are probabilities, take their logit):
    on validation patch labels when any validation instance is labelled with both classes,
    otherwise from the slide labels."""
    ys, ss = [], []
    key = _cal_key(rows)
    for r in rows:
        lab = r.get("instance_labels")
        if lab is None:
            continue
        keep = np.asarray(lab) >= 0
        ys.append(np.asarray(lab)[keep])
        ss.append(np.asarray(r[key])[keep])
    if ys and len(np.unique(np.concatenate(ys))) == 2:
        return fit_calibrator(np.concatenate(ss), np.concatenate(ys), logit_input=logit_input, source=SOURCE_PATCH)
    raw, y, w = slide_label_targets(rows)
    return fit_calibrator(raw, y, w, logit_input=logit_input, source=SOURCE_SLIDE)


def reliability(y_true, prob, n_bins: int = 10) -> dict:
    """Reliability diagram data on equal-width bins of ``prob``: per bin the mean predicted
    probability, the observed positive fraction and the count; plus the expected
    calibration error ECE = Σ_b (n_b / n)·|observed_b − predicted_b| (Guo et al. 2017, Eq. 3)."""
    y = np.asarray(y_true, np.float64).ravel()
    p = np.clip(np.asarray(prob, np.float64).ravel(), 0, 1)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.minimum(np.digitize(p, edges[1:-1]), n_bins - 1)
    cnt = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        pred = np.bincount(idx, weights=p, minlength=n_bins) / cnt
        obs = np.bincount(idx, weights=y, minlength=n_bins) / cnt
    have = cnt > 0
    ece = float((cnt[have] / max(cnt.sum(), 1) * np.abs(obs[have] - pred[have])).sum()) if have.any() else float("nan")
    return {"bin_edges": edges.tolist(), "predicted": [float(v) if h else None for v, h in zip(pred, have)],
            "observed": [float(v) if h else None for v, h in zip(obs, have)], "count": cnt.astype(int).tolist(),
            "ece": ece}
