"""``report_annotations.html``: the per-slide page a pathologist can use.

Sections: metrics per split (never train+val+test pooled), FROC where lesion annotations
exist, a sortable per-slide table (id, split, true label, slide probability, patch
AUROC/F1, a ``milkit view`` link at that slide), and thumbnails with the heatmap and
ground-truth outline side by side for the worst false negatives and false positives.
Self-contained (images embedded as base64), like ``report.html``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from milkit import io
from milkit.metrics.classification import auroc, binary_metrics
from milkit.slide.outputs import SlideScores
from milkit.view import figures
from milkit.view.colors import display_values
from milkit.view.figures import DEFAULT_PORT, N_WORST, THUMB, fmt as _fmt, img_tag, view_link


@dataclass
class SlideResult:
    """One slide's labels next to its ground truth."""

    slide_id: str
    split: str
    true_label: int
    scores: SlideScores
    patch_true: np.ndarray  # (N,) 0/1 from the annotation; −1 throughout on a not-annotated positive slide
    prob: np.ndarray | None  # calibrated probability per patch, when written
    annotation: Path | None
    lesions: list = field(default_factory=list)  # shapely polygons, level 0

    @property
    def annotated(self) -> bool:
        """False for a positive slide without annotation: its patch labels are all unknown (−1)."""
        return not (len(self.patch_true) and bool((np.asarray(self.patch_true) < 0).all()))

    def metrics(self) -> dict:
        """Patch metrics over the patches with a known label (outside reviewed regions: unknown)."""
        s, known = self.scores, np.asarray(self.patch_true) >= 0
        y = np.asarray(self.patch_true)[known]
        m = {"split": self.split, "true_label": self.true_label, "n_patches": int(len(self.patch_true)),
             "n_positive_patches": int(np.asarray(s.labels).sum()), "n_annotated_patches": int(known.sum()),
             "annotation": str(self.annotation) if self.annotation else None, "bag_prob": s.bag_prob,
             "annotated": self.annotated, "n_lesions": len(self.lesions)}
        if not self.annotated:
            return {**m, "n_tumour_patches": None, "instance_auroc": float("nan")}
        score, lab = np.asarray(s.scores)[known], np.asarray(s.labels)[known]
        m.update(n_tumour_patches=int(y.sum()), instance_auroc=auroc(y, score) if len(y) else float("nan"))
        if len(y):
            m.update({f"instance_{k}": v for k, v in binary_metrics(y, lab, 0.5).items() if k != "auroc"})
            if not (y.any() or lab.any()):  # no tumour and none called: F1 is 0/0, not 0
                m["instance_f1"] = None
        return m


def _thumb(r: SlideResult) -> Image.Image:
    """The slide at ≤ THUMB px (from the slide file recorded in instances.h5 when readable,
    else a white canvas)."""
    size = figures.thumb_size(r.scores.level0_size, THUMB)
    path = r.scores.meta.get("slide")
    if path and Path(path).is_file():
        try:
            from milkit.slide.reader import open_slide

            with open_slide(Path(path), mpp=None) as sl:
                arr, _ = sl.read_level_image(THUMB)
            return Image.fromarray(arr).convert("RGB").resize(size)
        except (OSError, ValueError):
            pass
    return Image.new("RGB", size, (245, 245, 245))


def _heat(base: Image.Image, r: SlideResult) -> Image.Image:
    """Patch values coloured on the fixed [0, 1] scale over ``base``."""
    values, _ = display_values(r.scores.scores, r.scores.score_kind, r.prob)
    return figures.heat_overlay(base, r.scores.coords, values, r.scores.size_level0, r.scores.level0_size[0])


def _outline(img: Image.Image, r: SlideResult) -> Image.Image:
    img = img.copy()
    d = ImageDraw.Draw(img)
    k = img.width / r.scores.level0_size[0]
    for g in r.lesions:
        for ring in [g.exterior, *g.interiors]:
            d.line([(x * k, y * k) for x, y in ring.coords], fill=(0, 170, 0), width=2)
    return img


def render(result: dict, results: list[SlideResult], labels_dir: Path, thumbnails: bool = True,
           port: int = DEFAULT_PORT) -> str:
    """The HTML page as a string; slide links point at ``milkit view`` on ``port``."""
    what = {display_values(r.scores.scores, r.scores.score_kind, r.prob)[1] for r in results}
    cmd = f"milkit view {labels_dir} --annotations {result.get('annotations_dir')} --port {port}"
    p = [f"<!doctype html><html><head><meta charset='utf-8'><title>milkit — slides vs annotations</title>"
         f"<style>{STYLE}{figures.STYLE}</style></head><body><h1>Slides vs annotations</h1>",
         f"<p class='note'>labels: <code>{html.escape(str(labels_dir))}</code>; annotations: "
         f"<code>{html.escape(str(result.get('annotations_dir')))}</code>. A patch is tumour when "
         f"{html.escape(result['patch_positive_rule'])} ({result['tumour_fraction_threshold']:g}). Splits: "
         f"{html.escape(result['split_source'])}. Start the viewer with <code>{html.escape(cmd)}</code>; "
         f"the <i>open</i> links then show that slide.</p>"]
    p.append("<h2>Metrics per split</h2><table id='splits'><tr><th>split</th><th>slides (positive)</th>"
             "<th>slide AUROC</th><th>patches (tumour)</th><th>patch AUROC</th><th>patch F1</th>"
             "<th>mean per-slide patch AUROC</th><th>FROC (lesions)</th></tr>")
    for split, m in result["splits"].items():
        p.append(f"<tr><td>{split}</td><td>{m['n_slides']} ({m['n_positive_slides']})</td><td>{_fmt(m['slide_auroc'])}</td>"
                 f"<td>{m['n_instances']} ({m['n_tumour_instances']})</td><td>{_fmt(m['instance_auroc'])}</td>"
                 f"<td>{_fmt(m['instance_f1'])}</td><td>{_fmt(m['mean_slide_instance_auroc'])}</td>"
                 f"<td>{_fmt(m['froc'])} ({m['n_lesions']})</td></tr>")
    p.append("</table><p class='note'>FROC: Camelyon16's lesion-level metric, mean sensitivity at 1/4–8 "
             "false positives per slide; detections by non-maximum suppression of patch scores (radius two "
             "patches); read as a step function, no 75 µm dilation, isolated tumour cells not set apart. "
             "Patch F1 at the written labels (the run's validation threshold).</p>")
    rows = []
    for r in results:
        m = r.metrics()
        rows.append([html.escape(r.slide_id), html.escape(r.split), str(r.true_label), _fmt(m["bag_prob"]),
                     str(m["n_patches"]),
                     "not annotated" if m["n_tumour_patches"] is None else str(m["n_tumour_patches"]), str(m["n_positive_patches"]),
                     _fmt(m["instance_auroc"]), _fmt(m.get("instance_f1")),
                     f"<a href='{html.escape(view_link(r.slide_id, port))}'>open</a>"])
    p.append("<h2>Slides</h2>" + figures.sortable_table(
        "slides", ["slide", "split", "true label", "slide probability", "patches", "tumour patches",
                   "positive patches", "patch AUROC", "patch F1", "view"], rows, [r.slide_id for r in results]))
    if thumbnails:
        p.append(_worst(results, what, port))
    p.append(f"<script>{figures.SORT_JS}</script></body></html>")
    return "\n".join(p)


def _worst(results: list[SlideResult], what: set[str], port: int) -> str:
    fn = sorted((r for r in results if r.true_label == 1), key=lambda r: r.scores.bag_prob)[:N_WORST]
    fp = sorted((r for r in results if r.true_label == 0), key=lambda r: -r.scores.bag_prob)[:N_WORST]
    out = [f"<h2>Worst false negatives and false positives</h2><p class='note'>left: slide with the ground-truth "
           f"outline (green); right: patch heatmap on the fixed scale {figures.colour_bar()} "
           f"({html.escape('; '.join(what))}).</p>"]
    for title, rs in (("positive slides with the lowest probability", fn), ("negative slides with the highest probability", fp)):
        out.append(f"<h3>{title}</h3>")
        for r in rs:
            base = _thumb(r)
            out.append(f"<div class='pair' id='thumb-{html.escape(r.slide_id)}'><div><b>{html.escape(r.slide_id)}</b> "
                       f"({r.split}) p = {_fmt(r.scores.bag_prob)} · "
                       f"<a href='{html.escape(view_link(r.slide_id, port))}'>view</a></div>"
                       f"{img_tag(_outline(base, r), 'slide')}{img_tag(_outline(_heat(base, r), r), 'heatmap')}</div>")
    return "\n".join(out)


def write_slide_report(where: Path, result: dict, results: list[SlideResult], labels_dir: Path) -> Path:
    """Write ``where/report_annotations.html``; returns its path."""
    out = Path(where) / "report_annotations.html"
    io.write_text(out, render(result, results, Path(labels_dir)))
    return out


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}
td:first-child{text-align:left}.note{color:#555;font-size:90%}"""
