"""Synthetic whole slides for tests, the benchmark and demos: pyramidal tiled TIFF
(readable by OpenSlide, with MPP in the resolution tags) plus an ASAP XML of the lesion.

The slide is white glass with one elliptical tissue blob (pink stroma with sparse
purple nuclei); a positive slide carries a polygonal lesion inside the tissue whose
texture is denser and darker (crowded nuclei), so colour/texture features separate it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import tifffile
from PIL import Image, ImageDraw

from milkit import io
from milkit.slide.annotations import write_asap_xml

GLASS = (238, 236, 240)
STROMA = (226, 160, 196)
NUCLEUS = (110, 60, 150)
LESION = (150, 80, 170)


@dataclass
class SyntheticSlide:
    path: Path
    lesion: np.ndarray | None  # (K, 2) level-0 polygon, None for a negative slide
    annotation: Path | None
    size: tuple[int, int]
    mpp: float | None


def _blob_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    cy, cx = h * rng.uniform(0.45, 0.55), w * rng.uniform(0.45, 0.55)
    ry, rx = h * rng.uniform(0.32, 0.4), w * rng.uniform(0.32, 0.4)
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def lesion_polygon(size: tuple[int, int], rng: np.random.Generator, scale: float = 0.16) -> np.ndarray:
    """An irregular star-convex polygon inside the central tissue, level-0 (x, y)."""
    w, h = size
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    radii = min(w, h) * scale * rng.uniform(0.7, 1.2, angles.size)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def render_slide(
    size: tuple[int, int], lesion: np.ndarray | None, seed: int, nucleus_px: int = 6
) -> np.ndarray:
    """RGB uint8 (H, W, 3) image of the synthetic slide at level 0."""
    w, h = size
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float32)
    img[:] = GLASS
    tissue = _blob_mask(h, w, rng)
    img[tissue] = STROMA
    # nuclei: random dots, dense inside the lesion
    density = np.where(tissue, 0.012, 0.0).astype(np.float32)
    if lesion is not None:
        m = Image.new("L", (w, h), 0)
        ImageDraw.Draw(m).polygon([tuple(p) for p in lesion], fill=1)
        les = np.asarray(m, bool) & tissue
        img[les] = LESION
        density[les] = 0.06
    step = nucleus_px
    gy, gx = np.mgrid[0:h:step, 0:w:step]
    pick = rng.random(gy.shape) < density[gy, gx] * step * step / 4
    # each picked grid cell gets a (step-1)² nucleus in its top-left corner
    cell = np.zeros((step, step), bool)
    cell[: step - 1, : step - 1] = True
    nuclei = np.kron(pick, cell).astype(bool)[:h, :w]
    img[nuclei] = NUCLEUS
    img += rng.normal(0, 6, (h // 4 + 1, w // 4 + 1, 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
    return np.clip(img, 0, 255).astype(np.uint8)


def write_pyramid_tiff(
    path: str | Path, img: np.ndarray, mpp: float | None, tile: int = 256, compression: str = "jpeg", levels: int = 3
) -> None:
    """Write ``img`` as a tiled pyramidal TIFF (levels in the main IFD chain, as OpenSlide's
    generic-TIFF reader expects) with MPP in XResolution/YResolution (pixels per cm)."""

    def write(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=img.nbytes > 2**31) as tif:
            level = img
            for i in range(levels):
                kw = {}
                if mpp is not None:  # pixels per centimetre; None writes a slide without MPP
                    kw = {"resolution": (1e4 / mpp / 2**i, 1e4 / mpp / 2**i), "resolutionunit": "CENTIMETER"}
                tif.write(
                    level,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression=compression,
                    subfiletype=0 if i == 0 else 1,
                    metadata=None,
                    **kw,
                )
                if min(level.shape[:2]) // 2 < tile:
                    break
                level = np.asarray(Image.fromarray(level).reduce(2))

    io.write_with(path, write)


def make_slide(
    out_dir: str | Path,
    name: str,
    positive: bool,
    seed: int,
    size: tuple[int, int] = (1536, 1536),
    mpp: float | None = 0.25,
    lesion_scale: float = 0.16,
    compression: str = "jpeg",
) -> SyntheticSlide:
    """Write ``<out_dir>/<name>.tif`` (and ``<name>.xml`` for a positive slide)."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed + 7919)
    lesion = lesion_polygon(size, rng, lesion_scale) if positive else None
    img = render_slide(size, lesion, seed)
    path = out_dir / f"{name}.tif"
    write_pyramid_tiff(path, img, mpp, compression=compression)
    ann = None
    if lesion is not None:
        ann = out_dir / f"{name}.xml"
        write_asap_xml(ann, [lesion])
    return SyntheticSlide(path=path, lesion=lesion, annotation=ann, size=size, mpp=mpp)


# ----------------------------------------------------------------------------- real-image slides
def _ihc_stains() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's bundled immunohistochemistry sample (512×512, haematoxylin + DAB; shipped
    inside the wheel, no download) as (DAB-positive original, the same tissue with the DAB
    stain removed by colour deconvolution, Ruifrok & Johnston 2001)."""
    from skimage import data
    from skimage.color import hed2rgb, rgb2hed

    ihc = data.immunohistochemistry()
    hed = rgb2hed(ihc)
    hed[..., 2] = 0
    neg = np.clip(hed2rgb(hed) * 255, 0, 255).astype(np.uint8)
    return ihc, neg


def _mosaic(src: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Tile ``src`` into (h, w, 3) with a random flip/rotation per tile."""
    t = src.shape[0]
    out = np.empty((h, w, 3), np.uint8)
    for y in range(0, h, t):
        for x in range(0, w, t):
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            tile = np.rot90(src, k)
            tile = tile[:, ::-1] if flip else tile
            out[y:y + t, x:x + t] = tile[: h - y, : w - x]
    return out


def render_ihc_slide(size: tuple[int, int], lesion: np.ndarray | None, seed: int) -> np.ndarray:
    """RGB (H, W, 3): an elliptical piece of real IHC tissue on glass; outside the lesion the
    DAB (brown) stain is removed, inside it the tissue keeps it (a DAB-positive lesion)."""
    w, h = size
    rng = np.random.default_rng(seed)
    pos, neg = _ihc_stains()
    layout = np.random.default_rng(seed + 1)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GLASS
    tissue = _blob_mask(h, w, rng)
    normal = _mosaic(neg, h, w, layout)
    img[tissue] = normal[tissue]
    if lesion is not None:
        m = Image.new("L", (w, h), 0)
        ImageDraw.Draw(m).polygon([tuple(p) for p in lesion], fill=1)
        les = np.asarray(m, bool) & tissue
        img[les] = _mosaic(pos, h, w, np.random.default_rng(seed + 1))[les]  # same layout: only the stain differs
    return img


def make_ihc_slide(out_dir: str | Path, name: str, positive: bool, seed: int, size: tuple[int, int] = (1536, 1536),
                   mpp: float | None = 0.5, lesion_scale: float = 0.16) -> SyntheticSlide:
    """Like :func:`make_slide`, with real IHC tissue (:func:`render_ihc_slide`) instead of drawn texture."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed + 7919)
    lesion = lesion_polygon(size, rng, lesion_scale) if positive else None
    path = out_dir / f"{name}.tif"
    write_pyramid_tiff(path, render_ihc_slide(size, lesion, seed), mpp)
    ann = None
    if lesion is not None:
        ann = out_dir / f"{name}.xml"
        write_asap_xml(ann, [lesion])
    return SyntheticSlide(path=path, lesion=lesion, annotation=ann, size=size, mpp=mpp)
