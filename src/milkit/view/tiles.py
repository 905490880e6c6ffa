"""Deep-zoom tiles for the viewer: the slide (OpenSlide's ``DeepZoomGenerator``, or a
tifffile reader for pyramids OpenSlide cannot open) and the heatmap (patch values on
the fixed colour scale, transparent where no patch was scored).

Both follow the Deep Zoom Image (DZI) layout OpenSeadragon reads: level L of
``max_level = ceil(log2(max(w, h)))`` is the image downsampled 2^(max_level − L) times,
cut into ``tile_size`` squares with ``overlap`` pixels shared between neighbours.
"""

from __future__ import annotations

import io as _bytes
import math
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from milkit.view.colors import lut


def dzi_xml(width: int, height: int, tile: int, overlap: int, fmt: str) -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?>'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" Overlap="{overlap}" '
            f'TileSize="{tile}"><Size Width="{width}" Height="{height}"/></Image>')


class DZGrid:
    """DZI geometry of a ``width``×``height`` level-0 image (overlap 0)."""

    def __init__(self, width: int, height: int, tile: int = 256):
        self.width, self.height, self.tile = int(width), int(height), int(tile)
        self.max_level = max(0, math.ceil(math.log2(max(self.width, self.height, 1))))

    def scale(self, level: int) -> float:
        """Level-0 pixels per pixel of ``level``."""
        return float(2 ** (self.max_level - level))

    def level_size(self, level: int) -> tuple[int, int]:
        s = self.scale(level)
        return max(1, math.ceil(self.width / s)), max(1, math.ceil(self.height / s))

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) of the tile in ``level`` pixels; ValueError outside the grid."""
        if not 0 <= level <= self.max_level:
            raise ValueError(f"no level {level}")
        lw, lh = self.level_size(level)
        x, y = col * self.tile, row * self.tile
        if col < 0 or row < 0 or x >= lw or y >= lh:
            raise ValueError(f"no tile {col}_{row} at level {level}")
        return x, y, min(self.tile, lw - x), min(self.tile, lh - y)

    def xml(self, fmt: str) -> str:
        return dzi_xml(self.width, self.height, self.tile, 0, fmt)


class TiffPyramid:
    """A pyramidal (tiled or stripped) TIFF read with tifffile, one segment at a time, so
    no level is decoded whole. Levels: the first series' ``levels`` (SubIFDs or reduced
    pages), as OME-TIFF and tifffile writers store them."""

    def __init__(self, path: str | Path):
        import tifffile

        self.path = Path(path)
        try:
            self._tf = tifffile.TiffFile(self.path)
            pages = [lvl.pages[0] for lvl in self._tf.series[0].levels]
        except (tifffile.TiffFileError, OSError, IndexError, ValueError) as err:
            raise ValueError(f"{self.path}: neither OpenSlide nor tifffile can read it ({err})") from None
        for p in pages:
            if p.dtype != np.uint8 or p.samplesperpixel not in (1, 3, 4) or p.planarconfig == 2:
                raise ValueError(f"{self.path}: tifffile fallback reads 8-bit grey/RGB(A) interleaved pyramids only")
        self.pages = pages
        self.dimensions = (int(pages[0].imagewidth), int(pages[0].imagelength))
        self.level_downsamples = [self.dimensions[0] / p.imagewidth for p in pages]
        self._lock = threading.Lock()

    def _segment(self, page, index: int) -> np.ndarray:
        with self._lock:
            fh = self._tf.filehandle
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
        seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        return np.asarray(seg)[0]  # (h, w, samples)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``level`` pixels [x, x+w) × [y, y+h); white outside."""
        page = self.pages[level]
        out = np.full((h, w, 3), 255, np.uint8)
        ch, cw = page.chunks[:2]
        nrow, ncol = page.chunked[:2]
        for r in range(max(0, y // ch), min(nrow, (y + h - 1) // ch + 1)):
            for c in range(max(0, x // cw), min(ncol, (x + w - 1) // cw + 1)):
                seg = self._segment(page, r * ncol + c)
                if seg.shape[-1] == 1:
                    seg = np.repeat(seg, 3, axis=-1)
                seg = seg[..., :3]
                sy, sx = r * ch, c * cw
                y0, y1 = max(y, sy), min(y + h, sy + ch, page.imagelength)
                x0, x1 = max(x, sx), min(x + w, sx + cw, page.imagewidth)
                if y1 > y0 and x1 > x0:
                    out[y0 - y:y1 - y, x0 - x:x1 - x] = seg[y0 - sy:y1 - sy, x0 - sx:x1 - sx]
        return out

    def close(self) -> None:
        self._tf.close()


class SlideTiles:
    """Slide tiles through OpenSlide's DeepZoomGenerator, else through :class:`TiffPyramid`."""

    def __init__(self, path: str | Path):
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        self.path = Path(path)
        self.backend = "openslide"
        try:
            self._osr = openslide.OpenSlide(str(self.path))
            self._dz = DeepZoomGenerator(self._osr, tile_size=254, overlap=1, limit_bounds=False)
            self.dimensions = tuple(self._osr.dimensions)
        except openslide.OpenSlideError:
            self.backend = "tifffile"
            self._tiff = TiffPyramid(self.path)
            self.dimensions = self._tiff.dimensions
            self._grid = DZGrid(*self.dimensions, tile=256)

    def dzi(self) -> str:
        return self._dz.get_dzi("jpeg") if self.backend == "openslide" else self._grid.xml("jpeg")

    def tile(self, level: int, col: int, row: int) -> Image.Image:
        if self.backend == "openslide":
            try:
                return self._dz.get_tile(level, (col, row)).convert("RGB")
            except ValueError as err:
                raise ValueError(f"{self.path}: {err}") from None
        g = self._grid
        x, y, w, h = g.tile_box(level, col, row)
        s = g.scale(level)
        ds = self._tiff.level_downsamples
        best = max(i for i, d in enumerate(ds) if d <= s * (1 + 1e-6)) if any(d <= s * (1 + 1e-6) for d in ds) else 0
        k = s / ds[best]  # pixels of the read level per output pixel
        arr = self._tiff.read(best, int(x * k), int(y * k), max(1, int(round(w * k))), max(1, int(round(h * k))))
        im = Image.fromarray(arr)
        return im if im.size == (w, h) else im.resize((w, h), Image.BILINEAR)

    def close(self) -> None:
        (self._osr if self.backend == "openslide" else self._tiff).close()


class HeatTiles:
    """Patch values (on [0, 1]) as RGBA tiles on the fixed colour scale over the slide's geometry."""

    def __init__(self, coords: np.ndarray, values: np.ndarray, size_level0: int, stride_level0: int,
                 level0_size: tuple[int, int]):
        from milkit.slide.heatmap import score_raster

        self.raster, self.cell = score_raster(coords, values, size_level0, stride_level0, level0_size)
        self.grid = DZGrid(*level0_size, tile=256)
        self._lut = lut()

    def dzi(self) -> str:
        return self.grid.xml("png")

    def tile(self, level: int, col: int, row: int) -> Image.Image:
        x, y, w, h = self.grid.tile_box(level, col, row)
        s = self.grid.scale(level)
        ys = np.minimum(((y + np.arange(h) + 0.5) * s // self.cell).astype(np.int64), self.raster.shape[0] - 1)
        xs = np.minimum(((x + np.arange(w) + 0.5) * s // self.cell).astype(np.int64), self.raster.shape[1] - 1)
        r = self.raster[ys][:, xs]
        have = np.isfinite(r)
        idx = np.rint(np.nan_to_num(r, nan=0.0) * 255).astype(np.int64)
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[..., :3] = self._lut[idx]
        rgba[..., 3] = np.where(have, 255, 0)
        return Image.fromarray(rgba, "RGBA")


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = _bytes.BytesIO()
    if fmt == "jpeg":
        im.convert("RGB").save(buf, format="JPEG", quality=80)
    else:
        im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
