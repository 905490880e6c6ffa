"""Whole-slide reading through OpenSlide (``openslide-python`` + ``openslide-bin``).

Every coordinate that leaves this module is level-0 (x, y) of a top-left corner
(FORMATS.md "Per-slide HDF5"). MPP comes from ``openslide.mpp-x/-y``, an explicit
override, or an override CSV; when a physical size is asked for and no MPP is
known, :func:`Slide.require_mpp` refuses with an error naming the slide.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

log = logging.getLogger(__name__)
#: a level is read in bands only when each band has at least this many rows
BAND_MIN_ROWS = 256
#: extensions OpenSlide reads (vendor formats and generic tiled TIFF)
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")


def slide_id(path: str | Path) -> str:
    """The slide id: file name without its extension (FORMATS.md: ``slide_id`` has none)."""
    name = Path(path).name
    for ext in sorted(SLIDE_EXTENSIONS + (".ome.tif", ".ome.tiff"), key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


#: besides the slide formats, what a CSV cell naming a slide may end with and is not part of its id
ID_SUFFIXES = (".h5", ".pt")


def cell_slide_id(name: str) -> str:
    """The slide id in a CSV cell (labels, MPP overrides): a slide-file or feature-file extension is dropped,
    nothing else. TCGA ids hold dots (``TCGA-3C-AALI-01Z-00-DX1.F6E9A5DF-…``): what follows the last dot is not
    an extension there (:func:`slide_id` would cut it off, as it does a file's)."""
    low = name.lower()
    if low.endswith(SLIDE_EXTENSIONS + (".ome.tif", ".ome.tiff")):
        return slide_id(name)
    for ext in ID_SUFFIXES:
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def find_slides(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders into a sorted, de-duplicated list of slide files. A folder that holds no slide
    file itself is searched through its subfolders (GDC's download layout, ``<file uuid>/<slide>.svs``), with a
    notice."""
    out: list[Path] = []

    def is_slide(q: Path) -> bool:
        return q.suffix.lower() in SLIDE_EXTENSIONS and not q.name.startswith(".") and q.is_file()

    for p in map(Path, paths):
        if p.is_dir():
            found = [q for q in sorted(p.iterdir()) if is_slide(q)]
            if not found:
                found = sorted(q for q in p.rglob("*") if is_slide(q))
                if found:
                    log.info("%s holds no slide file itself; %d found in its subfolders (as GDC downloads them)",
                             p, len(found))
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: slide file or folder does not exist")
    seen: dict[str, Path] = {}
    for p in out:
        sid = slide_id(p)
        if sid in seen and seen[sid].resolve() != p.resolve():
            raise ValueError(f"{p}: slide id {sid!r} also used by {seen[sid]}")
        seen[sid] = p
    return sorted(seen.values(), key=lambda q: slide_id(q))


def read_mpp_csv(path: str | Path) -> dict[str, float]:
    """MPP overrides from a CSV with columns ``slide_id`` (or ``slide``/``wsi``) and ``mpp``."""
    from milkit.io import read_csv_rows

    rows = read_csv_rows(path, "MPP override CSV")
    if not rows:
        return {}
    cols = set(rows[0])
    sid_col = next((c for c in ("slide_id", "slide", "wsi") if c in cols), None)
    if sid_col is None or "mpp" not in cols:
        raise ValueError(f"{path}: MPP override CSV needs columns slide_id and mpp (has {sorted(cols)})")
    out = {}
    for i, r in enumerate(rows, start=2):
        cell = r["mpp"]
        try:  # a decimal comma (0,25: Excel's CSV where the delimiter is a semicolon)
            v = float(cell.replace(",", ".") if "." not in cell else cell)
        except ValueError:
            raise ValueError(f"{path}: line {i}: mpp {cell!r} is not a number") from None
        if not v > 0:
            raise ValueError(f"{path}: line {i}: mpp must be positive, got {v}")
        out[cell_slide_id(r[sid_col])] = v
    return out


@dataclass
class Slide:
    """An open slide. Use as a context manager or call :meth:`close`."""

    path: Path
    mpp_override: float | None = None
    _osr: openslide.OpenSlide = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: slide file does not exist")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise ValueError(f"{self.path}: not a slide format OpenSlide can read") from None
        except openslide.OpenSlideError as err:
            raise ValueError(f"{self.path}: unreadable slide ({err})") from None
        if self.mpp_override is not None and not self.mpp_override > 0:
            raise ValueError(f"{self.path}: MPP override must be positive, got {self.mpp_override}")

    # -- geometry ------------------------------------------------------------------
    @property
    def id(self) -> str:
        return slide_id(self.path)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return tuple(self._osr.dimensions)  # type: ignore[return-value]

    @property
    def level_count(self) -> int:
        return self._osr.level_count

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(d) for d in self._osr.level_dimensions]  # type: ignore[misc]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._osr.level_downsamples]

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    @property
    def vendor(self) -> str:
        return self._osr.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")

    @property
    def bounds_offset(self) -> tuple[int, int]:
        """``openslide.bounds-x/-y`` (0 when absent): QuPath's origin for cropped slides."""
        p = self._osr.properties
        return int(p.get(openslide.PROPERTY_NAME_BOUNDS_X, 0) or 0), int(p.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0) or 0)

    # -- physical size -------------------------------------------------------------
    @property
    def mpp(self) -> float | None:
        """Level-0 µm per pixel: the override, else the slide's own (mean of x and y), else None."""
        if self.mpp_override is not None:
            return float(self.mpp_override)
        p = self._osr.properties
        vals = []
        for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
            try:
                v = float(p.get(key, "nan"))
            except ValueError:
                v = math.nan
            if math.isfinite(v) and v > 0:
                vals.append(v)
        return float(np.mean(vals)) if vals else None

    @property
    def magnification(self) -> float | None:
        """Level-0 objective power: ``openslide.objective-power``, else 10/MPP (0.25 µm/px = 40×)."""
        p = self._osr.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        if self.mpp_override is None and p not in (None, ""):
            try:
                return float(p)
            except ValueError:
                pass
        mpp = self.mpp
        return None if mpp is None else 10.0 / mpp

    def require_mpp(self, why: str) -> float:
        """The MPP, or a ValueError naming the slide when it is unknown."""
        mpp = self.mpp
        if mpp is None:
            raise ValueError(
                f"{self.path}: the slide has no MPP (openslide.mpp-x) and {why}; "
                "pass --mpp or an --mpp-csv override, or tile at a fixed --downsample"
            )
        return mpp

    # -- pixels --------------------------------------------------------------------
    def best_level(self, downsample: float) -> int:
        """The highest level whose downsample does not exceed ``downsample`` (read, then resize)."""
        ds = self.level_downsamples
        best = 0
        for i, d in enumerate(ds):
            if d <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_region(self, xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the region at ``level`` whose top-left is level-0 ``xy``;
        transparent pixels (outside the scanned area) become white."""
        try:
            im = self._osr.read_region((int(xy[0]), int(xy[1])), int(level), (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as err:
            raise ValueError(f"{self.path}: cannot read region {xy} at level {level} ({err})") from None
        return rgba_to_rgb(im)

    def read_patch(self, xy: tuple[int, int], size_level0: int, out_size: int) -> np.ndarray:
        """A square patch of ``size_level0`` level-0 pixels resampled to ``out_size`` pixels."""
        ds = size_level0 / out_size
        level = self.best_level(ds)
        lds = self.level_downsamples[level]
        read = max(1, int(round(size_level0 / lds)))
        arr = self.read_region(xy, level, (read, read))
        if read != out_size:
            arr = np.asarray(Image.fromarray(arr).resize((out_size, out_size), Image.BILINEAR))
        return arr

    def read_level(self, level: int, threads: int | None = None) -> np.ndarray:
        """The whole of ``level`` as RGB uint8. Where the level's downsample is a whole number
        (so that each band's level-0 offset is exact), it is read in horizontal bands on
        ``threads`` threads (default: the usable CPUs, at most 4): OpenSlide is thread-safe and
        releases the GIL while it decodes, and the bands join into the single read's pixels
        (tests/slide/test_tissue_filters.py). A 4096² JPEG level reads ~1.6–2× faster on 2 cores."""
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        if threads is None:
            threads = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        n = min(2 * threads, lh // BAND_MIN_ROWS)
        if threads < 2 or n < 2 or abs(ds - round(ds)) > 1e-9:
            return self.read_region((0, 0), level, (lw, lh))
        edges = [lh * i // n for i in range(n + 1)]

        def band(i: int) -> np.ndarray:
            return self.read_region((0, int(round(edges[i] * ds))), level, (lw, edges[i + 1] - edges[i]))

        with ThreadPoolExecutor(threads) as pool:
            return np.concatenate(list(pool.map(band, range(n))), axis=0)

    def read_level_image(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """The whole slide at the coarsest level whose long side is ≥ ``max_size`` (or the
        finest if none is), resized to at most ``max_size``; returns (RGB, downsample vs level 0)."""
        w0, h0 = self.dimensions
        level = self.level_count - 1
        for i in range(self.level_count - 1, -1, -1):
            if max(self.level_dimensions[i]) >= max_size:
                level = i
                break
        else:
            level = 0
        lw, lh = self.level_dimensions[level]
        arr = self.read_level(level)
        scale = min(1.0, max_size / max(lw, lh))
        if scale < 1.0:
            tw, th = max(1, round(lw * scale)), max(1, round(lh * scale))
            arr = np.asarray(Image.fromarray(arr).resize((tw, th), Image.BILINEAR))
        return arr, w0 / arr.shape[1]

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rgba_to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Composite the RGBA image openslide-python returns (not premultiplied) on white."""
    if im.mode == "RGBA" and im.getchannel("A").getextrema()[0] == 255:  # opaque: PIL drops alpha, no copies
        return np.asarray(im.convert("RGB"))
    a = np.asarray(im)
    if a.ndim == 3 and a.shape[2] == 4:
        rgb = a[..., :3].astype(np.float32)
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        bg = np.asarray(background, np.float32)
        out = rgb * alpha + (1.0 - alpha) * bg
        return np.clip(out, 0, 255).astype(np.uint8)
    return np.asarray(im.convert("RGB"))


def open_slide(path: str | Path, mpp: float | None = None, mpp_table: dict[str, float] | None = None) -> Slide:
    """Open ``path``; ``mpp`` overrides everything, then ``mpp_table[slide_id]``."""
    override = mpp if mpp is not None else (mpp_table or {}).get(slide_id(path))
    return Slide(Path(path), mpp_override=override)
