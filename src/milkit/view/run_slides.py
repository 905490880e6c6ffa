"""The per-slide section of ``report.html`` for slide runs (bags of patch features with
level-0 coordinates: ``feature_bags``, ``hard_bags``, …).

``Method.evaluate`` keeps, per split, one :class:`SlideBag` per slide (its patch
coordinates, raw scores, calibrated probabilities, the labels at the validation threshold
and the patch labels where they exist); :func:`slide_section` renders, for one stage:
metrics per split (never pooled across splits), a sortable per-slide table (id, split,
true label, slide probability, patch AUROC/F1 where patch labels exist, a ``milkit view``
link at that slide) and, per split, thumbnails of the worst false negatives and false
positives (ground-truth patch labels beside the heatmap on the fixed colour scale).
No model runs here.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from milkit.metrics.classification import auroc

#: patch side used when neither the bag nor its coordinates give one
FALLBACK_PATCH = 1.0
#: the longer side of a thumbnail here (two per slide, up to 12 slides per split)
THUMB = 200


@dataclass
class SlideBag:
    """One slide of one split, as scored by a stage."""

    slide_id: str
    label: int
    bag_prob: float
    coords: np.ndarray  # (N, 2) level-0 top-left (x, y)
    size_level0: float
    score: np.ndarray  # (N,) what patch AUROC ranks (the raw score; the ensemble's probability)
    labels: np.ndarray  # (N,) 0/1 at the stage's validation threshold
    probability: np.ndarray | None  # (N,) calibrated on validation, when the stage has it
    score_kind: str  # "probability" or "logit"-like: how to show ``score`` without a probability
    patch_true: np.ndarray | None = None  # (N,) 0/1, −1 unknown
    _metrics: dict | None = field(default=None, repr=False, compare=False)

    @property
    def labelled(self) -> np.ndarray:
        return np.zeros(len(self.score), bool) if self.patch_true is None else np.asarray(self.patch_true) >= 0

    def metrics(self) -> dict:
        """Patch counts, and patch AUROC/F1 on the labelled patches (None without two classes /
        labels; F1 is undefined on a slide without positive patches). Computed once."""
        if self._metrics is not None:
            return self._metrics
        keep = self.labelled
        y = np.asarray(self.patch_true)[keep] if keep.any() else np.zeros(0, int)
        out = {"n_patches": int(len(self.score)), "n_positive": int(np.asarray(self.labels).sum()),
               "n_truth_positive": int(y.sum()) if len(y) else None, "patch_auroc": None, "patch_f1": None}
        if y.any():
            out["patch_f1"] = f1(y, np.asarray(self.labels)[keep])
            if not y.all():
                out["patch_auroc"] = auroc(y, np.asarray(self.score)[keep])
        self._metrics = out
        return out


def f1(y: np.ndarray, pred: np.ndarray) -> float:
    """F1 of 0/1 predictions (0 when there is nothing to count, as sklearn's ``zero_division=0``)."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    tp = int((y & pred).sum())
    den = 2 * tp + int((~y & pred).sum()) + int((y & ~pred).sum())
    return 2 * tp / den if den else 0.0


def slide_geometry(bag) -> dict | None:
    """A bag's patch coordinates and level-0 patch side, when it is a slide of patch features
    (2-D instances with coords); None otherwise (image patches, CT slices, no coords)."""
    if getattr(bag, "coords", None) is None or bag.instances.ndim != 2:
        return None
    c = bag.coords.detach().cpu().numpy().reshape(-1, 2)
    size = bag.meta.get("patch_size_level0") or bag.meta.get("patch_size")
    if not size:
        gaps = [np.diff(np.unique(c[:, a])) for a in (0, 1)]
        gaps = [g[g > 0].min() for g in gaps if (g > 0).any()]
        size = float(min(gaps)) if gaps else FALLBACK_PATCH
    return {"coords": c, "size_level0": float(size)}


def slide_bags(rows: list[dict], labeler, threshold: float | None) -> list[SlideBag] | None:
    """:class:`SlideBag` per row of ``labeler.predict_dataset`` when every row carries a
    slide geometry (``row['slide']``, :func:`slide_geometry`); else None."""
    if not rows or any(r.get("slide") is None for r in rows):
        return None
    thr = 0.5 if threshold is None else float(threshold)
    out = []
    for r in rows:
        g = r["slide"]
        vals = np.asarray(labeler.label_values(r), np.float64)
        prob = r.get("probability")
        out.append(SlideBag(
            slide_id=str(r["bag_id"]), label=int(r["label"]), bag_prob=float(r["bag_prob"]), coords=g["coords"],
            size_level0=g["size_level0"], score=np.asarray(r["scores"], np.float64), labels=(vals >= thr).astype(np.int8),
            probability=None if prob is None else np.asarray(prob, np.float64), score_kind=labeler.score_kind,
            patch_true=None if r.get("instance_labels") is None else np.asarray(r["instance_labels"]).astype(np.int64)))
    return out


# ----------------------------------------------------------------------------- html
def split_metrics(bags: list[SlideBag]) -> dict:
    """Slide and patch metrics of the slides of ONE split (patches pooled within it only)."""
    y = np.array([b.label for b in bags])
    p = np.array([b.bag_prob for b in bags], float)
    per = [b.metrics() for b in bags]
    lab = [b for b in bags if b.labelled.any()]
    out = {"n_slides": len(bags), "n_positive_slides": int(y.sum()), "slide_auroc": auroc(y, p),
           "n_patches": int(sum(m["n_patches"] for m in per)), "n_labelled_slides": len(lab),
           "patch_auroc": None, "patch_f1": None, "mean_slide_patch_auroc": None, "n_truth_positive": None}
    if lab:
        yt = np.concatenate([np.asarray(b.patch_true)[b.labelled] for b in lab])
        out["n_truth_positive"] = int(yt.sum())
        out["patch_auroc"] = auroc(yt, np.concatenate([b.score[b.labelled] for b in lab]))
        out["patch_f1"] = f1(yt, np.concatenate([b.labels[b.labelled] for b in lab]))
        per_auc = [m["patch_auroc"] for m in per if m["patch_auroc"] is not None]
        out["mean_slide_patch_auroc"] = float(np.mean(per_auc)) if per_auc else None
    return out


def _display(b: SlideBag) -> tuple[np.ndarray, str]:
    """Heatmap values on [0, 1] and what they are."""
    from milkit.view.colors import display_values

    if b.probability is not None:
        return np.clip(b.probability, 0, 1), "probability calibrated on validation"
    return display_values(b.score, b.score_kind, None)


def _pair(b: SlideBag, split: str, port: int) -> str:
    from PIL import Image

    from milkit.view import figures

    w0, h0 = figures.extent(b.coords, b.size_level0)
    canvas = Image.new("RGB", figures.thumb_size((w0, h0), THUMB), (250, 250, 250))
    values, _ = _display(b)
    imgs = []
    if b.labelled.any():
        imgs.append(figures.img_tag(figures.label_overlay(canvas, b.coords, b.patch_true, b.size_level0, w0),
                                    f"{b.slide_id} patch labels"))
    imgs.append(figures.img_tag(figures.heat_overlay(canvas, b.coords, values, b.size_level0, w0, alpha=255),
                                f"{b.slide_id} heatmap"))
    sid = html.escape(b.slide_id)
    return (f"<div class='pair' id='slide-{html.escape(split)}-{sid}'><div><b>{sid}</b> (true label {b.label}) "
            f"p = {figures.fmt(b.bag_prob)} · <a class='view' href='{html.escape(figures.view_link(b.slide_id, port))}'>"
            f"view</a></div>{''.join(imgs)}</div>")


def _worst(bags: list[SlideBag], split: str, port: int) -> tuple[str, set[str]]:
    """Thumbnail pairs of the worst false negatives and false positives of one split, and their ids."""
    from milkit.view.figures import N_WORST

    fn = sorted((b for b in bags if b.label == 1), key=lambda b: b.bag_prob)[:N_WORST]
    fp = sorted((b for b in bags if b.label == 0), key=lambda b: -b.bag_prob)[:N_WORST]
    out = []
    for title, bs in ((f"{split}: positive slides with the lowest slide probability (worst false negatives)", fn),
                      (f"{split}: negative slides with the highest slide probability (worst false positives)", fp)):
        if bs:
            out.append(f"<h4>{html.escape(title)}</h4><div>" + "".join(_pair(b, split, port) for b in bs) + "</div>")
    return "\n".join(out), {b.slide_id for b in fn + fp}


def _commands(run_path: Path, port: int) -> tuple[str, str]:
    """(label command, view command) that make the table's links work for this run."""
    features = "FEATURES/"
    try:
        from milkit.run_dir import RunDir

        features = str((RunDir(run_path).read_raw_config().get("data") or {}).get("features_dir") or features)
    except (OSError, ValueError, AttributeError):
        pass
    return (f"milkit label {run_path} --slides SLIDES/ --features {features}",
            f"milkit view {run_path / 'labels'} --port {port}")


def slide_section(run_path: Path, stage: str, per_split: dict[str, list[SlideBag]], port: int) -> str:
    """The per-slide HTML section of one stage (metrics per split, sortable table, thumbnails)."""
    from milkit.view import figures

    fmt = figures.fmt
    per_split = {s: bs for s, bs in per_split.items() if bs}
    if not per_split:
        return ""
    label_cmd, view_cmd = _commands(Path(run_path), port)
    labels_dir = Path(run_path) / "labels"
    any_true = any(b.labelled.any() for bs in per_split.values() for b in bs)
    ids = {b.slide_id for bs in per_split.values() for b in bs}
    n_labelled = sum((labels_dir / sid / "instances.h5").is_file() for sid in ids)
    what = sorted({_display(b)[1] for bs in per_split.values() for b in bs})
    p = [f"<h2 id='slides-section'>slides — stage {html.escape(stage)}</h2>",
         f"<p class='note'>The stage <code>milkit label</code> uses by default. To open a slide in the viewer: "
         f"<code>{html.escape(label_cmd)}</code> (writes <code>{html.escape(str(labels_dir))}/&lt;slide&gt;/</code>), "
         f"then <code>{html.escape(view_cmd)}</code>; the <i>open</i> links go to that slide "
         f"({n_labelled} of these {len(ids)} slides are labelled there now)"
         + ("" if any_true else "; no patch labels in these splits, so no patch AUROC/F1") + ".</p>"]
    # metrics per split
    head = ("<tr><th>split</th><th>slides (positive)</th><th>slide AUROC</th><th>patches</th>"
            "<th>slides with patch labels</th><th>ground-truth positive patches</th><th>patch AUROC</th>"
            "<th>patch F1</th><th>mean per-slide patch AUROC</th></tr>")
    body = ""
    for split, bs in per_split.items():
        m = split_metrics(bs)
        body += (f"<tr><td>{html.escape(split)}</td><td>{m['n_slides']} ({m['n_positive_slides']})</td>"
                 f"<td>{fmt(m['slide_auroc'])}</td><td>{m['n_patches']}</td><td>{m['n_labelled_slides']}</td>"
                 f"<td>{fmt(m['n_truth_positive'])}</td><td>{fmt(m['patch_auroc'])}</td>"
                 f"<td>{fmt(m['patch_f1'])}</td><td>{fmt(m['mean_slide_patch_auroc'])}</td></tr>")
    p.append(f"<h3>metrics per split</h3><table id='slide-splits'>{head}{body}</table>"
             "<p class='note'>each split on its own (never pooled); patch F1 at the stage's validation threshold "
             "(per slide: undefined on a slide without positive patches).</p>")
    # the per-slide table
    thumbs = {split: _worst(bs, split, port) for split, bs in per_split.items()}
    rows, row_ids = [], []
    for split, bs in per_split.items():
        for b in bs:
            m = b.metrics()
            sid = html.escape(b.slide_id)
            name = f"<a href='#slide-{html.escape(split)}-{sid}'>{sid}</a>" if b.slide_id in thumbs[split][1] else sid
            rows.append([name, html.escape(split), str(b.label), fmt(b.bag_prob), str(m["n_patches"]),
                         str(m["n_positive"]), fmt(m["n_truth_positive"]), fmt(m["patch_auroc"]),
                         fmt(m["patch_f1"]),
                         f"<a class='view' href='{html.escape(figures.view_link(b.slide_id, port))}'>open</a>"])
            row_ids.append(f"{split}:{b.slide_id}")
    p.append("<h3>per slide</h3>" + figures.sortable_table(
        "run-slides", ["slide", "split", "true label", "slide probability", "patches", "patches labelled positive",
                       "ground-truth positive patches", "patch AUROC", "patch F1", "milkit view"], rows, row_ids))
    p.append(f"<h3>worst false negatives and false positives</h3><p class='note'>"
             + ("left: ground-truth patch labels (red positive, grey negative); right: " if any_true else "")
             + f"patches on the fixed scale {figures.colour_bar()} ({html.escape('; '.join(what))}).</p>")
    p += [t for t, _ in thumbs.values() if t]
    return "\n".join(p)
