"""Patch grid on a slide: ``milkit tile`` (tissue mask → grid → ``<slide>.h5`` + thumbnail).

The grid lives in level-0 pixels: a patch of ``patch_size`` pixels at the target
resolution covers ``patch_size_level0 = round(patch_size · downsample)`` level-0
pixels, with ``downsample = target_mpp / mpp`` (or level-0 magnification / target
magnification, or a fixed downsample that needs no physical size). A patch is kept
when the tissue mask covers at least ``tissue_fraction`` of it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import openslide
from PIL import Image, ImageDraw
from pydantic import Field, model_validator
from scipy import ndimage

import milkit
from milkit import io
from milkit.config import StrictModel
from milkit.slide.reader import Slide, open_slide
from milkit.slide.tissue import TissueConfig, tissue_mask

log = logging.getLogger(__name__)

#: a milkit temp file older than this (s) in the output folder is a leftover, not a live write
STALE_TMP_S = 600.0
#: µm/px when no resolution is given (20×, TilingConfig)
DEFAULT_TARGET_MPP = 0.5


class TilingConfig(StrictModel):
    """Patch grid settings. Give at most one of ``target_mpp``, ``target_magnification`` and
    ``downsample``; none means ``target_mpp = 0.5`` µm/px (20×)."""

    #: patch side in pixels at the target resolution; CLAM's default 256 (Sm App. B patches
    #: with CLAM [Lu et al.]; the dump lost its size and magnification)
    patch_size: int = Field(256, ge=8)
    #: µm/px of the patches; 0.5 µm/px = 20×, the magnification commonly used for Camelyon16
    target_mpp: float | None = Field(None, gt=0)
    target_magnification: float | None = Field(None, gt=0)
    #: fixed downsample of level 0 (needs no MPP)
    downsample: float | None = Field(None, gt=0)
    #: overlap between neighbouring patches in target pixels (TRIDENT's ``overlap``); 0 = none
    overlap: int = Field(0, ge=0)
    #: minimum tissue fraction of a kept patch (common practice; not from the papers)
    tissue_fraction: float = Field(0.25, ge=0, le=1)
    tissue: TissueConfig = TissueConfig()

    @model_validator(mode="after")
    def _one_resolution(self) -> "TilingConfig":
        given = [k for k in ("target_mpp", "target_magnification", "downsample") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of --target-mpp, --magnification, --downsample (target_mpp, "
                             f"target_magnification, downsample; got {given})")
        if self.overlap >= self.patch_size:
            raise ValueError(f"--overlap {self.overlap} must be smaller than --patch-size {self.patch_size}")
        return self


@dataclass
class Grid:
    """A slide's kept patches and the geometry that produced them."""

    coords: np.ndarray  # (N, 2) int64 level-0 top-left (x, y)
    tissue_fraction: np.ndarray  # (N,) float32
    attrs: dict
    mask: np.ndarray  # tissue mask at ``mask_downsample``
    mask_downsample: float
    thumbnail: np.ndarray | None = None  # RGB the mask was computed on


def resolve_geometry(slide: Slide, cfg: TilingConfig) -> dict:
    """Downsample, level-0 patch size and stride, and the resolution attrs (an unknown value is
    None, and is left out of the h5)."""
    mpp0, mag0 = slide.mpp, slide.magnification
    if cfg.downsample is not None:
        ds = float(cfg.downsample)
    elif cfg.target_magnification is not None:
        if mag0 is None:
            slide.require_mpp(f"tiling at {cfg.target_magnification}x needs the level-0 magnification")
        ds = float(mag0) / cfg.target_magnification  # type: ignore[arg-type]
    else:
        target = cfg.target_mpp if cfg.target_mpp is not None else DEFAULT_TARGET_MPP
        ds = target / slide.require_mpp(f"tiling at {target} µm/px needs it")
    if ds < 1 - 1e-3:
        raise ValueError(
            f"{slide.path}: the target resolution is finer than level 0 (downsample {ds:.3g} < 1); "
            "choose a coarser target"
        )
    ps0 = int(round(cfg.patch_size * ds))
    stride0 = int(round((cfg.patch_size - cfg.overlap) * ds))
    w, h = slide.dimensions
    return {
        "patch_size": int(cfg.patch_size),
        "patch_level": int(slide.best_level(ds)),  # CLAM's attr: the pyramid level patches are read from
        "patch_size_level0": ps0,
        "stride_level0": stride0,
        "downsample": ds,
        "level0_magnification": mag0,
        "target_magnification": None if mag0 is None else mag0 / ds,
        "mpp": mpp0,
        "target_mpp": None if mpp0 is None else mpp0 * ds,
        "overlap": int(cfg.overlap),
        "level0_width": int(w),
        "level0_height": int(h),
    }


def patch_fractions(mask: np.ndarray, mask_ds: float, coords: np.ndarray, ps0: int) -> np.ndarray:
    """Fraction of each level-0 square (top-left ``coords``, side ``ps0``) covered by ``mask``,
    a boolean image at downsample ``mask_ds`` of level 0 (integral image, O(N))."""
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    h, w = mask.shape
    ii = np.zeros((h + 1, w + 1), np.int64)
    ii[1:, 1:] = np.cumsum(np.cumsum(mask, 0, dtype=np.int64), 1)
    x0 = np.clip(np.floor(coords[:, 0] / mask_ds).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / mask_ds).astype(np.int64), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + ps0) / mask_ds).astype(np.int64), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + ps0) / mask_ds).astype(np.int64), 0, h)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    s = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return (s / area).astype(np.float32)


def grid_coords(width: int, height: int, ps0: int, stride0: int) -> np.ndarray:
    """All level-0 top-left corners of patches lying fully inside the slide, row-major."""
    xs = np.arange(0, width - ps0 + 1, stride0, dtype=np.int64)
    ys = np.arange(0, height - ps0 + 1, stride0, dtype=np.int64)
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def compute_grid(slide: Slide, cfg: TilingConfig) -> Grid:
    """Tissue mask on a thumbnail, then the kept patches of the level-0 grid."""
    geo = resolve_geometry(slide, cfg)
    long_side = max(slide.dimensions)
    size = max(16, min(cfg.tissue.thumbnail_size, int(np.ceil(long_side / cfg.tissue.min_downsample))))
    thumb, mask_ds = slide.read_level_image(size)
    mask = tissue_mask(thumb, cfg.tissue)
    coords = grid_coords(geo["level0_width"], geo["level0_height"], geo["patch_size_level0"], geo["stride_level0"])
    frac = patch_fractions(mask, mask_ds, coords, geo["patch_size_level0"])
    keep = frac >= cfg.tissue_fraction if cfg.tissue_fraction > 0 else frac > 0
    check_level_not_blank(slide, coords[keep], geo)
    attrs = dict(geo)
    attrs.update(
        name=slide.id,
        slide_path=str(slide.path.resolve()),
        coord_space="level0",
        coord_origin="top_left",
        reader=f"openslide-python {openslide.__version__} (OpenSlide {openslide.__library_version__})",
        slide_vendor=slide.vendor,
        # QuPath's origin for slides with a bounds offset (MRXS…): lets `milkit label --features` place GeoJSON
        # without the slide
        bounds_x=int(slide.bounds_offset[0]),
        bounds_y=int(slide.bounds_offset[1]),
        tissue_method=tissue_description(cfg),
        tissue_fraction_threshold=float(cfg.tissue_fraction),
        milkit_version=milkit.__version__,
    )
    return Grid(coords[keep], frac[keep], attrs, mask, mask_ds, thumb)


def tissue_description(cfg: TilingConfig) -> str:
    """The ``tissue_method`` attribute: how tissue was found."""
    t = cfg.tissue
    return f"hsv-saturation median{t.median} {t.method}" + (f"(floor {t.threshold})" if t.method == "otsu"
                                                             else f"({t.threshold})")


def tiled_otherwise(h5: Path, cfg: TilingConfig) -> str | None:
    """How an existing tile h5 differs from what ``cfg`` asks for (None: the same settings, or a
    file that records none of them, e.g. CLAM's): patch size, overlap, resolution, tissue rule."""
    from milkit.data.features import h5_attrs

    try:
        a = h5_attrs(h5)
    except OSError:
        return "not a readable HDF5 file"
    want: dict[str, object] = {"patch_size": cfg.patch_size, "overlap": cfg.overlap,
                               "tissue_fraction_threshold": cfg.tissue_fraction, "tissue_method": tissue_description(cfg)}
    res = [(k, getattr(cfg, k)) for k in ("target_mpp", "target_magnification", "downsample") if getattr(cfg, k) is not None]
    key, value = res[0] if res else ("target_mpp", DEFAULT_TARGET_MPP)
    want[key] = value
    diff = []
    for k, v in want.items():
        if k not in a or a[k] is None:
            continue
        same = math.isclose(float(a[k]), float(v), rel_tol=1e-6) if isinstance(v, (int, float)) else str(a[k]) == str(v)
        if not same:
            diff.append(f"{k} {a[k]} (asked: {v})")
    return "; ".join(diff) or None


def check_level_not_blank(slide: Slide, coords: np.ndarray, geo: dict, n: int = 8) -> None:
    """Refuse a slide whose patch level is blank where the thumbnail shows tissue (a pyramid
    whose level 0 is empty, e.g. a failed scan or conversion): sampled kept patches of one flat
    colour all round would otherwise become features of nothing."""
    if len(coords) == 0:
        return
    idx = np.unique(np.linspace(0, len(coords) - 1, num=min(n, len(coords))).round().astype(int))
    out = max(8, min(64, int(geo["patch_size"])))
    for x, y in coords[idx]:
        patch = slide.read_patch((int(x), int(y)), int(geo["patch_size_level0"]), out)
        if float(patch.astype(np.float32).std()) > 2.0:
            return
    raise ValueError(
        f"{slide.path}: level {geo['patch_level']} is blank (one flat colour) at all {len(idx)} sampled patches "
        "where the thumbnail shows tissue; the file's full-resolution level is empty or broken"
    )


def write_grid_h5(path: Path, grid: Grid) -> None:
    """TRIDENT-compatible ``coords`` (int64, attrs on the dataset) plus ``tissue_fraction``;
    an attribute whose value is unknown (None) is left out, never written as 'None'."""

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset("coords", data=grid.coords.astype(np.int64).reshape(-1, 2))
            for k, v in grid.attrs.items():
                if v is not None:
                    d.attrs[k] = v
            f.create_dataset("tissue_fraction", data=grid.tissue_fraction.astype(np.float32))

    io.write_with(path, write)


def write_thumbnail(path: Path, grid: Grid, max_size: int = 1024) -> None:
    """Thumbnail PNG with the tissue outline (green) and the kept patches (blue squares)."""
    img = Image.fromarray(grid.thumbnail)
    scale = min(1.0, max_size / max(img.size))
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    ds = grid.mask_downsample / scale  # level-0 px per thumbnail px
    mask = np.asarray(Image.fromarray(grid.mask.astype(np.uint8) * 255).resize(img.size, Image.NEAREST)) > 0
    edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
    arr = np.asarray(img).copy()
    arr[edge] = (0, 200, 0)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    ps = grid.attrs["patch_size_level0"] / ds
    for x, y in grid.coords:
        draw.rectangle([x / ds, y / ds, x / ds + ps, y / ds + ps], outline=(30, 60, 220))

    def save(tmp: Path) -> None:
        img.save(tmp, format="PNG", compress_level=3)

    io.write_with(path, save)


def tile_slide(slide_path: Path, out_dir: Path, cfg: TilingConfig, mpp: float | None = None,
               mpp_table: dict[str, float] | None = None) -> Path:
    """Tile one slide → ``out_dir/<slide_id>.h5`` and ``out_dir/thumbnails/<slide_id>.png``."""
    with open_slide(slide_path, mpp, mpp_table) as slide:
        grid = compute_grid(slide, cfg)
        h5 = Path(out_dir) / f"{slide.id}.h5"
        write_thumbnail(Path(out_dir) / "thumbnails" / f"{slide.id}.png", grid)
        write_grid_h5(h5, grid)
    return h5


def tile_slides(slides: list[Path], out_dir: Path, cfg: TilingConfig, mpp: float | None = None,
                mpp_table: dict[str, float] | None = None, overwrite: bool = False,
                progress: bool = True) -> list[Path]:
    """Tile every slide; finished ones (h5 present) are skipped unless ``overwrite``.

    Every slide to tile is opened first (format, MPP): one that cannot be is an error before
    anything is written. A slide that fails later (e.g. no tissue) leaves nothing behind; the
    others are still tiled, then one ValueError lists every failure.
    """
    from milkit.slide.reader import slide_id
    from milkit.slide.progress import track

    out_dir = Path(out_dir)
    for folder in (out_dir, out_dir / "thumbnails"):  # temp files of a tile run killed mid-write
        if folder.is_dir():
            io.remove_stale_temps(folder, min_age_s=STALE_TMP_S)
    if not overwrite:  # a finished slide is skipped only if it was tiled as asked (checked before any write)
        for p in slides:
            h5 = out_dir / f"{slide_id(p)}.h5"
            other = tiled_otherwise(h5, cfg) if h5.is_file() else None
            if other:
                raise ValueError(f"{h5}: already tiled with other settings ({other}); pass --overwrite to re-tile "
                                 "(its features go too) or choose another --out")
    unreadable = []
    for p in slides:  # every slide opens (and has an MPP) before any is tiled
        if overwrite or not (out_dir / f"{slide_id(p)}.h5").is_file():
            try:
                with open_slide(p, mpp, mpp_table):
                    pass
            except (ValueError, FileNotFoundError) as err:
                unreadable.append(str(err))
    if unreadable:
        raise ValueError(f"{len(unreadable)} of {len(slides)} slides cannot be opened, nothing tiled: "
                         + "; ".join(unreadable))
    done, errors = [], []
    for p in track(slides, "tiling", enabled=progress):
        h5 = out_dir / f"{slide_id(p)}.h5"
        if h5.is_file() and not overwrite:
            done.append(h5)
            continue
        try:
            done.append(tile_slide(p, out_dir, cfg, mpp, mpp_table))
        except (ValueError, FileNotFoundError) as err:
            errors.append(str(err))
    if errors:
        raise ValueError(f"{len(errors)} of {len(slides)} slides failed: " + "; ".join(errors))
    return done
