"""Pieces shared by the two per-slide pages, ``report_annotations.html``
(:mod:`milkit.view.slide_report`) and the per-slide section of ``report.html``
(:mod:`milkit.report`): patch overlays on the fixed colour scale, the colour bar, the
``milkit view`` link, a click-to-sort table and the number format.

Coordinates are level-0 top-left (x, y) pixels; an overlay is drawn at the scale of the
image it lies on (``image width / level-0 width``).
"""

from __future__ import annotations

import base64
import html
import io as _bytes
from urllib.parse import quote

import numpy as np
from PIL import Image

from milkit.view.colors import css_gradient, lut

#: the port of ``milkit view`` (its ``--port`` default); report links point there
DEFAULT_PORT = 8765
#: the longer side of a report thumbnail, in pixels
THUMB = 320
#: worst false negatives (and false positives) shown per page or split
N_WORST = 3
#: patch-label colours of the ground-truth thumbnail (positive, negative)
TRUE_COLOURS = ((200, 0, 0), (190, 190, 190))


def fmt(v: object) -> str:
    """A table cell: 3 decimals for floats, an en dash for missing or non-finite values."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def png_b64(img: Image.Image) -> str:
    """A PIL image as base64 PNG (for ``data:`` URIs)."""
    buf = _bytes.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(img: Image.Image, alt: str) -> str:
    return f"<img src='data:image/png;base64,{png_b64(img)}' alt='{html.escape(alt)}'>"


def thumb_size(level0_size: tuple[int, int], longest: int = THUMB) -> tuple[int, int]:
    """(w, h) of a thumbnail whose longer side is ``longest``."""
    w0, h0 = (max(1, int(v)) for v in level0_size)
    ds = max(w0, h0) / longest
    return max(1, int(round(w0 / ds))), max(1, int(round(h0 / ds)))


def extent(coords: np.ndarray, size_level0: float) -> tuple[int, int]:
    """Level-0 (w, h) covered by the patches (when the slide's own size is not known)."""
    c = np.asarray(coords).reshape(-1, 2)
    if not len(c):
        return int(size_level0), int(size_level0)
    return int(c[:, 0].max() + size_level0), int(c[:, 1].max() + size_level0)


def _squares(base: Image.Image, coords: np.ndarray, colours: np.ndarray, size_level0: float, level0_width: int,
             alpha: int) -> Image.Image:
    """``base`` with one square per patch in its colour, blended with ``alpha`` (0–255).

    Squares snap to whole pixels so neighbours tile without gaps; painted with numpy (per
    patch when patches are few, else per pixel offset of the footprint), so a thumbnail of
    100k patches costs milliseconds, not a Python call per patch."""
    arr = np.asarray(base.convert("RGB"), np.float32).copy()
    h, w = arr.shape[:2]
    c = np.asarray(coords, np.float64).reshape(-1, 2)
    cols = np.asarray(colours, np.float32).reshape(-1, 3)
    if not len(c):
        return base.convert("RGB")
    k = w / float(level0_width)
    x0, y0 = np.rint(c[:, 0] * k).astype(np.int64), np.rint(c[:, 1] * k).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.rint((c[:, 0] + size_level0) * k).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.rint((c[:, 1] + size_level0) * k).astype(np.int64))
    x0, y0, x1, y1 = np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)
    paint = np.zeros((h, w), bool)
    colour = np.zeros((h, w, 3), np.float32)
    fw, fh = int((x1 - x0).max()), int((y1 - y0).max())
    if len(c) <= fw * fh:  # few large squares: one slice per patch
        for i in range(len(c)):
            colour[y0[i]:y1[i], x0[i]:x1[i]] = cols[i]
            paint[y0[i]:y1[i], x0[i]:x1[i]] = True
    else:  # many small squares: one vectorised pass per pixel of the footprint
        for dy in range(fh):
            for dx in range(fw):
                m = (y0 + dy < y1) & (x0 + dx < x1)
                colour[y0[m] + dy, x0[m] + dx] = cols[m]
                paint[y0[m] + dy, x0[m] + dx] = True
    a = alpha / 255.0
    arr[paint] = (1 - a) * arr[paint] + a * colour[paint]
    return Image.fromarray(np.rint(arr).astype(np.uint8), "RGB")


def heat_overlay(base: Image.Image, coords: np.ndarray, values: np.ndarray, size_level0: float,
                 level0_width: int, alpha: int = 155) -> Image.Image:
    """Patch ``values`` (on [0, 1]) coloured on the fixed scale over ``base``."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float64), nan=0.0), 0, 1)
    return _squares(base, coords, lut()[np.rint(v * 255).astype(np.int64)], size_level0, level0_width, alpha)


def label_overlay(base: Image.Image, coords: np.ndarray, labels: np.ndarray, size_level0: float,
                  level0_width: int, alpha: int = 200) -> Image.Image:
    """Ground-truth patch labels over ``base``: positive red, negative grey, unknown (−1) not drawn."""
    y = np.asarray(labels).reshape(-1)
    keep = y >= 0
    cols = np.array([TRUE_COLOURS[0] if v == 1 else TRUE_COLOURS[1] for v in y[keep]], np.int64).reshape(-1, 3)
    return _squares(base, np.asarray(coords).reshape(-1, 2)[keep], cols, size_level0, level0_width, alpha)


def colour_bar() -> str:
    """The fixed [0, 1] scale as an inline colour bar (needs :data:`STYLE`'s ``.bar``)."""
    return f"0 <span class='bar' style='background:{css_gradient()}'></span> 1"


def view_link(sid: str, port: int = DEFAULT_PORT) -> str:
    """The ``milkit view`` address that opens slide ``sid`` (the viewer reads ``?slide=``)."""
    return f"http://127.0.0.1:{int(port)}/?slide={quote(str(sid), safe='')}"


def sortable_table(table_id: str, headers: list[str], rows: list[list[str]], row_ids: list[str] | None = None) -> str:
    """A table whose columns sort on a click (with the sort script); cells are HTML already."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        (f"<tr data-id='{html.escape(row_ids[i])}'>" if row_ids else "<tr>") + "".join(f"<td>{c}</td>" for c in r)
        + "</tr>" for i, r in enumerate(rows))
    return (f"<p class='note'>click a column to sort</p><table id='{html.escape(table_id)}' class='sortable'>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


#: the CSS these pieces need (thumbnail pairs, the colour bar, sortable headers)
STYLE = """table.sortable th{cursor:pointer;background:#f0f0f0}.pair img{margin:4px;border:1px solid #ccc}
.pair{display:inline-block;vertical-align:top;margin:0 1em .6em 0}
.bar{display:inline-block;width:140px;height:12px;vertical-align:middle;border:1px solid #999}"""

#: click a header to sort its table by that column (numbers numerically), again to reverse
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
