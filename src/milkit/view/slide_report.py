"""``report_annotations.html``: the per-slide page a pathologist can use.

Sections: metrics per split (never train+val+test pooled), FROC where lesion annotations
exist, a sortable per-slide table (id, split, true label, slide probability, patch
AUROC/F1, a ``milkit view`` link at that slide), and thumbnails with the heatmap and
ground-truth outline side by side for the worst false negatives and false positives.
Self-contained (images embedded as base64), like ``report.html``.
"""

from __future__ import annotations

import base64
import html
import io as _bytes
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from milkit import io
from milkit.metrics.classification import auroc, binary_metrics
from milkit.slide.outputs import SlideScores
from milkit.view.colors import css_gradient, display_values, lut

DEFAULT_PORT = 8765
THUMB = 320
N_WORST = 3


@dataclass
class SlideResult:
    """One slide's labels next to its ground truth."""

    slide_id: str
    split: str
    true_label: int
    scores: SlideScores
    patch_true: np.ndarray  # (N,) 0/1 from the annotation
    prob: np.ndarray | None  # calibrated probability per patch, when written
    annotation: Path | None
    lesions: list = field(default_factory=list)  # shapely polygons, level 0

    def metrics(self) -> dict:
        y, s = self.patch_true, self.scores
        m = {"split": self.split, "true_label": self.true_label, "n_patches": int(len(y)),
             "n_tumour_patches": int(y.sum()), "n_positive_patches": int(np.asarray(s.labels).sum()),
             "annotation": str(self.annotation) if self.annotation else None, "bag_prob": s.bag_prob,
             "n_lesions": len(self.lesions),
             "instance_auroc": auroc(y, s.scores) if len(y) else float("nan")}
        if len(y):
            m.update({f"instance_{k}": v for k, v in binary_metrics(y, s.labels, 0.5).items() if k != "auroc"})
        return m


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def _png(img: Image.Image) -> str:
    buf = _bytes.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb(r: SlideResult) -> Image.Image:
    """The slide at ≤ THUMB px (from the slide file recorded in instances.h5 when readable,
    else a white canvas)."""
    w0, h0 = r.scores.level0_size
    ds = max(w0, h0) / THUMB
    size = (max(1, int(round(w0 / ds))), max(1, int(round(h0 / ds))))
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
    """Patch values coloured on the fixed [0, 1] scale, alpha 0.6, over ``base``."""
    values, _ = display_values(r.scores.scores, r.scores.score_kind, r.prob)
    w0, _ = r.scores.level0_size
    k = base.width / w0
    over = Image.new("RGBA", base.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(over)
    t = lut()
    ps = r.scores.size_level0 * k
    for (x, y), v in zip(r.scores.coords, values):
        c = t[int(round(float(v) * 255))]
        d.rectangle([x * k, y * k, x * k + ps, y * k + ps], fill=(int(c[0]), int(c[1]), int(c[2]), 155))
    return Image.alpha_composite(base.convert("RGBA"), over).convert("RGB")


def _outline(img: Image.Image, r: SlideResult) -> Image.Image:
    img = img.copy()
    d = ImageDraw.Draw(img)
    k = img.width / r.scores.level0_size[0]
    for g in r.lesions:
        for ring in [g.exterior, *g.interiors]:
            d.line([(x * k, y * k) for x, y in ring.coords], fill=(0, 170, 0), width=2)
    return img


def view_link(sid: str, port: int = DEFAULT_PORT) -> str:
    return f"http://127.0.0.1:{port}/?slide={sid}"


def render(result: dict, results: list[SlideResult], labels_dir: Path, thumbnails: bool = True) -> str:
    """The HTML page as a string."""
    what = {display_values(r.scores.scores, r.scores.score_kind, r.prob)[1] for r in results}
    cmd = f"milkit view {labels_dir} --annotations {result.get('annotations_dir')}"
    p = [f"<!doctype html><html><head><meta charset='utf-8'><title>milkit — slides vs annotations</title>"
         f"<style>{STYLE}</style></head><body><h1>Slides vs annotations</h1>",
         f"<p class='note'>labels: <code>{html.escape(str(labels_dir))}</code>; annotations: "
         f"<code>{html.escape(str(result.get('annotations_dir')))}</code>. A patch is tumour when "
         f"{html.escape(result['patch_positive_rule'])} ({result['tumour_fraction_threshold']:g}). Splits: "
         f"{html.escape(result['split_source'])}. Open a slide with <code>{html.escape(cmd)}</code>.</p>"]
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
    p.append("<h2>Slides</h2><p class='note'>click a column to sort</p><table id='slides' class='sortable'><thead><tr>"
             + "".join(f"<th>{h}</th>" for h in ("slide", "split", "true label", "slide probability", "patches",
                                                   "tumour patches", "positive patches", "patch AUROC", "patch F1",
                                                   "view"))
             + "</tr></thead><tbody>")
    for r in results:
        m = r.metrics()
        p.append(f"<tr><td>{html.escape(r.slide_id)}</td><td>{r.split}</td><td>{r.true_label}</td>"
                 f"<td>{_fmt(m['bag_prob'])}</td><td>{m['n_patches']}</td><td>{m['n_tumour_patches']}</td>"
                 f"<td>{m['n_positive_patches']}</td><td>{_fmt(m['instance_auroc'])}</td>"
                 f"<td>{_fmt(m.get('instance_f1'))}</td>"
                 f"<td><a href='{view_link(r.slide_id)}'>open</a></td></tr>")
    p.append("</tbody></table>")
    if thumbnails:
        p.append(_worst(results, what))
    p.append(f"<script>{SORT_JS}</script></body></html>")
    return "\n".join(p)


def _worst(results: list[SlideResult], what: set[str]) -> str:
    fn = sorted((r for r in results if r.true_label == 1), key=lambda r: r.scores.bag_prob)[:N_WORST]
    fp = sorted((r for r in results if r.true_label == 0), key=lambda r: -r.scores.bag_prob)[:N_WORST]
    out = [f"<h2>Worst false negatives and false positives</h2><p class='note'>left: slide with the ground-truth "
           f"outline (green); right: patch heatmap on the fixed scale <span class='bar' style='background:"
           f"{css_gradient()}'></span> 0 … 1 ({html.escape('; '.join(what))}).</p>"]
    for title, rs in (("positive slides with the lowest probability", fn), ("negative slides with the highest probability", fp)):
        out.append(f"<h3>{title}</h3>")
        for r in rs:
            base = _thumb(r)
            out.append(f"<div class='pair' id='thumb-{html.escape(r.slide_id)}'><div><b>{html.escape(r.slide_id)}</b> "
                       f"({r.split}) p = {_fmt(r.scores.bag_prob)} · <a href='{view_link(r.slide_id)}'>view</a></div>"
                       f"<img src='data:image/png;base64,{_png(_outline(base, r))}' alt='slide'>"
                       f"<img src='data:image/png;base64,{_png(_outline(_heat(base, r), r))}' alt='heatmap'></div>")
    return "\n".join(out)


def write_slide_report(where: Path, result: dict, results: list[SlideResult], labels_dir: Path) -> Path:
    """Write ``where/report_annotations.html``; returns its path."""
    out = Path(where) / "report_annotations.html"
    io.write_text(out, render(result, results, Path(labels_dir)))
    return out


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0;cursor:pointer}
td:first-child{text-align:left}.note{color:#555;font-size:90%}.pair img{margin:4px;border:1px solid #ccc}
.bar{display:inline-block;width:140px;height:12px;vertical-align:middle;border:1px solid #999}"""

SORT_JS = """document.querySelectorAll('table.sortable th').forEach(function(th, col){
 th.addEventListener('click', function(){
  var tb = th.closest('table').tBodies[0], rows = Array.from(tb.rows);
  var asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
  function key(r){ var t = r.cells[col].textContent, n = parseFloat(t); return isNaN(n) ? t : n; }
  rows.sort(function(a, b){ var x = key(a), y = key(b);
    if (typeof x !== typeof y) { x = String(x); y = String(y); }
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); });
  rows.forEach(function(r){ tb.appendChild(r); });
 });
});"""


