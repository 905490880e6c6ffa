"""Patch scores → images: a score raster on the patch grid, a PNG overlay on the thumbnail,
and a pyramidal tiled TIFF probability map aligned with level 0 (opens in OpenSlide/QuPath).

The raster's cells are ``cell = gcd(patch_size_level0, stride_level0)`` level-0 pixels;
a cell covered by several (overlapping) patches holds their mean. TIFF pixels are uint8:
0 where no patch was scored, else ``1 + round(254·p)`` with p ∈ [0, 1] the (normalised)
score, so p ≈ (v − 1)/254; ``milkit label`` draws the validation-calibrated probability
(milkit.trust.calibration) on the one fixed scale [0, 1] for every slide, so a negative
slide looks cold, and records that scale in the TIFF's ImageDescription (``scale``).
The heatmap PNG carries a colour bar of the same scale. tifffile writes the TIFF tile by tile from the raster, so the
level-0 image never sits in memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from milkit import io

TILE = 256


def normalise_scores(scores: np.ndarray, kind: str) -> tuple[np.ndarray, dict]:
    """Scores in [0, 1]: probabilities as they are; other scores (attention logits) mapped
    linearly between their 1st and 99th percentile within the slide (FORMATS.md "Heatmaps")."""
    s = np.asarray(scores, np.float64)
    if kind == "probability":
        return np.clip(s, 0, 1), {"normalisation": "none (probabilities)"}
    if s.size == 0:
        return s, {"normalisation": "percentile 1-99", "low": 0.0, "high": 0.0}
    lo, hi = np.percentile(s, [1, 99])
    if hi - lo < 1e-12:
        return np.full_like(s, 0.5), {"normalisation": "constant scores", "low": float(lo), "high": float(hi)}
    return np.clip((s - lo) / (hi - lo), 0, 1), {"normalisation": "percentile 1-99", "low": float(lo), "high": float(hi)}


def score_raster(coords: np.ndarray, values: np.ndarray, size_level0: int, stride_level0: int,
                 level0_size: tuple[int, int], max_cells: int = 64_000_000) -> tuple[np.ndarray, int]:
    """(raster float32 (h, w) with NaN where no patch, cell size in level-0 px)."""
    cell = math.gcd(int(size_level0), int(stride_level0 or size_level0)) or int(size_level0)
    w0, h0 = level0_size
    while math.ceil(w0 / cell) * math.ceil(h0 / cell) > max_cells:
        cell *= 2
    hw = (math.ceil(h0 / cell), math.ceil(w0 / cell))
    acc = np.zeros(hw, np.float64)
    cnt = np.zeros(hw, np.int64)
    c = np.asarray(coords, np.int64).reshape(-1, 2)
    v = np.asarray(values, np.float64).ravel()
    k = max(1, math.ceil(size_level0 / cell))
    x0, y0 = c[:, 0] // cell, c[:, 1] // cell
    for dy in range(k):
        for dx in range(k):
            ys, xs = y0 + dy, x0 + dx
            ok = (ys < hw[0]) & (xs < hw[1]) & (ys >= 0) & (xs >= 0)
            np.add.at(acc, (ys[ok], xs[ok]), v[ok])
            np.add.at(cnt, (ys[ok], xs[ok]), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)
    return r.astype(np.float32), cell


def overlay(thumb: np.ndarray, thumb_downsample: float, raster: np.ndarray, cell: int,
            cmap: str = "coolwarm", alpha: float = 0.5) -> Image.Image:
    """Thumbnail with the raster (values in [0, 1]) colour-mapped and alpha-blended where scored."""
    import matplotlib

    h, w = thumb.shape[:2]
    # thumbnail pixel → raster cell (nearest)
    ys = np.minimum((np.arange(h) * thumb_downsample / cell).astype(np.int64), raster.shape[0] - 1)
    xs = np.minimum((np.arange(w) * thumb_downsample / cell).astype(np.int64), raster.shape[1] - 1)
    r = raster[ys][:, xs]
    have = np.isfinite(r)
    rgba = matplotlib.colormaps[cmap](np.nan_to_num(r, nan=0.0))[..., :3] * 255
    out = thumb.astype(np.float32).copy()
    out[have] = (1 - alpha) * out[have] + alpha * rgba[have]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def with_colorbar(img: Image.Image, cmap: str = "coolwarm", label: str = "probability",
                  lo: float = 0.0, hi: float = 1.0) -> Image.Image:
    """``img`` with a vertical colour bar of ``cmap`` on [lo, hi] (ticks every quarter) on its right."""
    import matplotlib
    from PIL import ImageDraw, ImageFont

    w, h = img.size
    bar_h = max(40, int(0.8 * h))
    bar_w, pad, text_w = 16, 10, 60
    canvas = Image.new("RGB", (w + pad + bar_w + text_w + 16, max(h, bar_h + 30)), (255, 255, 255))
    canvas.paste(img.convert("RGB"), (0, 0))
    grad = np.linspace(1, 0, bar_h)[:, None].repeat(bar_w, 1)
    rgb = (matplotlib.colormaps[cmap](grad)[..., :3] * 255).astype(np.uint8)
    top = (canvas.size[1] - bar_h) // 2
    x0 = w + pad
    canvas.paste(Image.fromarray(rgb), (x0, top))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.rectangle([x0, top, x0 + bar_w - 1, top + bar_h - 1], outline=(0, 0, 0))
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + int(round((1 - q) * (bar_h - 1)))
        draw.line([x0 + bar_w, y, x0 + bar_w + 3, y], fill=(0, 0, 0))
        draw.text((x0 + bar_w + 5, y - 5), f"{lo + q * (hi - lo):.2g}", fill=(0, 0, 0), font=font)
    draw.text((max(0, x0 - 4), max(0, top - 14)), label[:14], fill=(0, 0, 0), font=font)
    return canvas


def to_uint8(raster: np.ndarray) -> np.ndarray:
    """0 where no patch, 1 + round(254·p) elsewhere."""
    out = np.zeros(raster.shape, np.uint8)
    have = np.isfinite(raster)
    out[have] = (1 + np.rint(254 * np.clip(raster[have], 0, 1))).astype(np.uint8)
    return out


def _cell_spans(n: int, size: int, cell: int, ds: int, tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tile along one axis of a level (``n`` pixels at downsample ``ds``): the first and last
    raster cell it covers and whether the tile lies wholly inside the level."""
    start = np.arange(0, n, tile)
    first = np.minimum(start * ds // cell, size - 1)
    last = np.minimum((start + tile - 1) * ds // cell, size - 1)
    return first, last, start + tile <= n


def _tiles(r8: np.ndarray, cell: int, shape: tuple[int, int], ds: int, tile: int):
    """Row-major ``tile``×``tile`` tiles of the level whose downsample is ``ds`` (nearest cell),
    zlib-encoded. Constant tiles (most of a slide: glass, or inside one patch) are found from the
    raster cells they cover, without drawing them, and encoded once per value."""
    import imagecodecs

    h, w = shape
    cache: dict[int, bytes] = {}

    def encoded(v: int) -> bytes:
        if v not in cache:
            cache[v] = imagecodecs.zlib_encode(np.full((tile, tile), v, np.uint8))
        return cache[v]

    xf, xl, xin = _cell_spans(w, r8.shape[1], cell, ds, tile)
    xcells = np.minimum(xf[:, None] + np.arange(int((xl - xf).max()) + 1), xl[:, None])  # cells of each tile
    yf, yl, yin = _cell_spans(h, r8.shape[0], cell, ds, tile)
    for ty, y0, y1, y_inside in zip(range(0, h, tile), yf.tolist(), yl.tolist(), yin.tolist()):
        band = r8[y0:y1 + 1]
        lo, hi = band.min(0)[xcells].min(1), band.max(0)[xcells].max(1)
        const = ((lo == hi) & xin & y_inside).tolist()
        yy = np.minimum(((ty + np.arange(tile)) * ds) // cell, r8.shape[0] - 1)
        ymask = (ty + np.arange(tile)) < h
        rows = None  # the tile row's pixels, drawn only for a tile that is not constant
        for tx, c, v in zip(range(0, w, tile), const, lo.tolist()):
            if c:
                yield encoded(v)
                continue
            if rows is None:
                rows = r8[yy]
            xx = np.minimum(((tx + np.arange(tile)) * ds) // cell, r8.shape[1] - 1)
            xmask = (tx + np.arange(tile)) < w
            t = rows[:, xx]
            if not (ymask.all() and xmask.all()):
                t = np.where(ymask[:, None] & xmask[None, :], t, 0).astype(np.uint8)
            v = int(t.min())
            # level 1: a third of the default level's time on these blocky tiles, ~2x their (small) size
            yield encoded(v) if v == int(t.max()) else imagecodecs.zlib_encode(np.ascontiguousarray(t), level=1)


def write_probability_tiff(path: str | Path, raster: np.ndarray, cell: int, level0_size: tuple[int, int],
                           mpp: float | None, description: dict | None = None, tile: int = TILE) -> None:
    """Pyramidal tiled TIFF (deflate, uint8 grey) of ``raster`` at every level of 2×
    downsampling, level 0 the size of the slide; MPP in the resolution tags when known."""
    r8 = to_uint8(raster)
    w0, h0 = int(level0_size[0]), int(level0_size[1])
    desc = json.dumps({"milkit": "probability map", "encoding": "0 = no patch; p = (v - 1) / 254",
                       "scale": [0.0, 1.0], **(description or {})})

    def write(tmp: Path) -> None:
        big = w0 * h0 > 2**31
        with tifffile.TiffWriter(tmp, bigtiff=big) as tif:
            ds = 1
            while True:
                w, h = math.ceil(w0 / ds), math.ceil(h0 / ds)
                kw = dict(
                    shape=(h, w), dtype=np.uint8, tile=(tile, tile), photometric="minisblack",
                    compression="zlib", subfiletype=0 if ds == 1 else 1, metadata=None,
                )
                if mpp:
                    kw.update(resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER")
                if ds == 1:
                    kw["description"] = desc
                tif.write(_tiles(r8, cell, (h, w), ds, tile), **kw)
                if max(w, h) <= tile:
                    break
                ds *= 2

    io.write_with(path, write)
