"""Feature bags: one bag per slide from pre-extracted patch features plus a labels CSV.

Layouts read (FORMATS.md "Per-slide HDF5"):

- ``h5`` — milkit/TRIDENT ``<slide>.h5`` (``features`` (N, D), ``coords`` (N, 2) level-0
  top-left with attrs) and CLAM ``h5_files/<slide>.h5`` (same datasets, no attrs: where a level-0
  patch size is needed it is the coordinate step, :func:`level0_patch_size`);
- ``clam_pt`` — CLAM ``pt_files/<slide>.pt`` (the (N, D) tensor only, loaded with
  ``weights_only=True``; coords from ``h5_files/<slide>.h5`` when it is there);
- ``torchmil`` — ``features/<bag>.npy|.h5`` with sibling ``coords/`` (grid units, turned
  into level-0 pixels with ``patch_size_level0``), ``patch_labels/`` or ``inst_labels/``,
  ``labels/``, and ``splits.csv``.

Labels CSV: ``slide_id`` (aliases ``slide``, ``wsi`` with extension), ``label`` (or
``label_column``), optional ``case_id`` (alias ``patient``) and ``split``. Splits come
from the CSV's ``split`` column, or are made stratified by label and grouped by case
(70/10/20 or k-fold; milkit.data.splits). Instance labels, for scoring only, come from
annotations (``annotations_dir``) or from the files themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from milkit.data.bag import Bag, BagDataset
from milkit.data.bag_cache import BagCache, bag_bytes
from milkit.data.base import DataConfig, DataSplits
from milkit.data.splits import kfold_splits, stratified_group_split

log = logging.getLogger(__name__)

Layout = Literal["auto", "h5", "clam_pt", "torchmil"]
SLIDE_ALIASES = ("slide_id", "slide", "wsi")
CASE_ALIASES = ("case_id", "patient")
#: the bag cache's budget when ``data.cache_gb`` is left out (without ``preload``): 2 GiB, ~500k
#: 1024-d float32 features (not from a paper; docs/scale.md)
DEFAULT_CACHE_BYTES = 2 * 2**30
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


# -- labels CSV -----------------------------------------------------------------------
#: label cells read as 1 / 0 without a ``data.label_map``
POSITIVE_WORDS = ("1", "1.0", "true", "yes", "positive", "tumor", "tumour")
NEGATIVE_WORDS = ("0", "0.0", "false", "no", "negative", "normal")
LABEL_WORDS = POSITIVE_WORDS + NEGATIVE_WORDS
@dataclass
class LabelRow:
    slide_id: str
    label: int
    case_id: str
    split: str | None
    #: the value of ``data.group_column`` (site, scanner, centre…); None without one
    group: str | None = None


def _parse_label(v: str, path: Path, line: int, label_map: dict[str, int | None] | None = None) -> int | None:
    """0 / 1 from a label cell; with ``label_map`` (CLAM's ``label_dict``) its values instead, None = skip the slide."""
    raw = (v or "").strip()
    if label_map is not None:
        if raw not in label_map:
            raise ValueError(f"{path}: line {line}: label {raw!r} is not in data.label_map "
                             f"({', '.join(map(repr, label_map))})")
        return label_map[raw]
    s = raw.lower()
    if s in POSITIVE_WORDS:
        return 1
    if s in NEGATIVE_WORDS:
        return 0
    raise ValueError(f"{path}: line {line}: label {v!r} is not binary (0/1); map the CSV's labels with "
                     "data.label_map, e.g. {normal_tissue: 0, tumor_tissue: 1}")


def _relative_note(path: Path) -> str:
    """Where a relative path of a config was looked for (the current folder, not the config's)."""
    return "" if path.is_absolute() else f" (a relative path is read from the current folder, {Path.cwd()})"


def read_labels_csv(path: str | Path, label_column: str = "label", group_column: str | None = None,
                    label_map: dict[str, int | None] | None = None) -> list[LabelRow]:
    """Rows of a slide labels CSV (or TSV), with FORMATS.md's column aliases; ``label_map`` maps the label
    column's values to 0 / 1 (None drops the slide, as CLAM's ``ignore``)."""
    from milkit.io import read_csv_rows
    from milkit.slide.reader import cell_slide_id

    path = Path(path)
    rows = read_csv_rows(path, "labels CSV", _relative_note(path))
    if not rows:
        raise ValueError(f"{path}: labels CSV has no rows")
    cols = set(rows[0])
    sid_col = next((c for c in SLIDE_ALIASES if c in cols), None)
    if sid_col is None or label_column not in cols:
        headless = any(c.lower() in LABEL_WORDS for c in cols)  # Camelyon16's reference.csv has no header line
        hint = (f"; the first line looks like data, not a header: add a first line such as "
                f"'slide_id,{label_column}'" if headless else "")
        what = (f"slide column (one of {', '.join(SLIDE_ALIASES)})" if sid_col is None
                else f"label column {label_column!r}")
        raise ValueError(f"{path}: no {what}; columns: {sorted(cols)}{hint}")
    case_col = next((c for c in CASE_ALIASES if c in cols), None)
    if group_column is not None and group_column not in cols:
        raise ValueError(f"{path}: no group column {group_column!r} (data.group_column); columns: {sorted(cols)}")
    out, seen = [], set()
    for i, r in enumerate(rows, start=2):
        sid = cell_slide_id(r[sid_col])
        if not sid:
            raise ValueError(f"{path}: line {i}: empty slide id")
        if sid in seen:
            raise ValueError(f"{path}: line {i}: slide {sid!r} listed twice")
        seen.add(sid)
        split = None
        if r.get("split"):
            if r["split"].lower() not in SPLIT_NAMES:
                raise ValueError(f"{path}: line {i}: split {r['split']!r} is not train, val or test")
            split = SPLIT_NAMES[r["split"].lower()]
        group = None
        if group_column is not None:
            group = r[group_column]
            if not group:
                raise ValueError(f"{path}: line {i}: empty {group_column!r} (data.group_column) for slide {sid!r}")
        label = _parse_label(r[label_column], path, i, label_map)
        if label is None:
            continue
        out.append(LabelRow(sid, label, (r[case_col] if case_col else "") or sid, split, group))
    if not out:
        raise ValueError(f"{path}: every slide's label is mapped to null by data.label_map")
    return out


# -- feature files ----------------------------------------------------------------------
@dataclass
class FeatureFile:
    """What one slide's feature file holds (numpy; coords level-0 top-left or None)."""

    path: Path
    features: np.ndarray
    coords: np.ndarray | None
    patch_size_level0: int | None
    instance_labels: np.ndarray | None = None
    #: level-0 origin of QuPath's coordinates (``openslide.bounds-x/-y``, as ``milkit tile`` records them)
    bounds_offset: tuple[int, int] = (0, 0)


def _attr_num(attrs: dict, key: str) -> float | None:
    v = attrs.get(key)
    if isinstance(v, bytes):
        v = v.decode()
    if v is None or (isinstance(v, str) and v in ("None", "")):
        return None
    try:
        return float(np.asarray(v).ravel()[0])
    except (TypeError, ValueError):
        return None


def read_h5_features(path: str | Path) -> FeatureFile:
    """milkit/TRIDENT/CLAM h5: ``features`` (N, D) and ``coords`` (N, 2); lengths must agree."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ValueError(f"{path}: no 'features' dataset (run 'milkit extract' first)")
            feats = np.asarray(f["features"][()], dtype=np.float32)
            coords, attrs = None, dict(f.attrs)
            if "coords" in f:
                coords = np.asarray(f["coords"][()], dtype=np.int64)
                attrs.update(dict(f["coords"].attrs))
            inst = None
            for name in ("instance_labels", "labels", "patch_labels"):
                if name in f:
                    inst = np.asarray(f[name][()]).astype(np.int64).reshape(-1)
                    break
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from None
    if feats.ndim == 3 and feats.shape[0] == 1:  # some writers keep a batch axis
        feats = feats[0]
    if feats.ndim != 2:
        raise ValueError(f"{path}: 'features' has shape {feats.shape}, expected (N, D)")
    if coords is not None:
        if coords.ndim == 3 and coords.shape[0] == 1:
            coords = coords[0]
        if coords.size == 0:
            coords = np.zeros((0, 2), np.int64)
        elif coords.ndim != 2 or coords.shape[1] != 2:
            raise ValueError(f"{path}: 'coords' has shape {coords.shape}, expected (N, 2) level-0 (x, y)")
        if len(coords) != len(feats):
            raise ValueError(f"{path}: {len(feats)} feature rows but {len(coords)} coords")
    if inst is not None and len(inst) != len(feats):
        raise ValueError(f"{path}: {len(feats)} feature rows but {len(inst)} instance labels")
    ps0 = _attr_num(attrs, "patch_size_level0")
    if ps0 is None and _attr_num(attrs, "patch_size") is not None and _attr_num(attrs, "downsample") is not None:
        ps0 = _attr_num(attrs, "patch_size") * _attr_num(attrs, "downsample")  # CLAM patch attrs
    bounds = tuple(int(_attr_num(attrs, k) or 0) for k in ("bounds_x", "bounds_y"))
    return FeatureFile(path, feats, coords, None if ps0 is None else int(round(ps0)), inst, bounds)  # type: ignore[arg-type]


def h5_attrs(path: str | Path) -> dict:
    """The attributes of an h5 file and of its ``coords`` dataset (where milkit/TRIDENT put the
    geometry), strings decoded; OSError for an unreadable file."""
    with h5py.File(path, "r") as f:
        a = {**dict(f.attrs), **(dict(f["coords"].attrs) if "coords" in f else {})}
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in a.items()}


def coordinate_step(coords: np.ndarray | None) -> int | None:
    """The smallest positive gap between distinct x or y coords (the patch grid's step), None for
    fewer than two positions on both axes."""
    if coords is None or not len(coords):
        return None
    gaps = [np.diff(u).min() for u in (np.unique(coords[:, 0]), np.unique(coords[:, 1])) if u.size > 1]
    return int(round(float(min(gaps)))) if gaps else None


def level0_patch_size(ff: FeatureFile, what: str = "whole-slide outputs") -> tuple[int, bool]:
    """(level-0 patch size, whether it was inferred): the coords' ``patch_size_level0`` (or CLAM's
    ``patch_size`` × ``downsample``) attribute, else the coordinate step, as for CLAM's ``h5_files``,
    which carry no attributes (non-overlapping patches: the step is the patch size)."""
    if ff.patch_size_level0 is not None:
        return ff.patch_size_level0, False
    if ff.coords is None:
        raise ValueError(f"{ff.path}: {what} need coords (N, 2) level-0 (x, y)")
    step = coordinate_step(ff.coords)
    if step is None or step <= 0:
        raise ValueError(f"{ff.path}: {what} need a patch_size_level0 attribute on coords (with fewer than two "
                         "patch positions it cannot be read off the grid)")
    return step, True


#: the h5 attributes that say how a feature file was made (``milkit extract`` / ``tile``; TRIDENT's names)
PROVENANCE_KEYS = ("encoder", "target_mpp", "patch_size")


def file_provenance(path: str | Path) -> dict:
    """What made one feature file, from its attributes only: ``encoder`` (milkit's ``name:weights``),
    ``target_mpp`` and ``patch_size`` (the coords' attributes); None where the file does not say."""
    out: dict = dict.fromkeys(PROVENANCE_KEYS)
    try:
        with h5py.File(path, "r") as f:
            attrs = {**dict(f.attrs), **(dict(f["coords"].attrs) if "coords" in f else {}),
                     **(dict(f["features"].attrs) if "features" in f else {})}
    except OSError:
        return out
    enc = attrs.get("encoder")
    out["encoder"] = enc.decode() if isinstance(enc, bytes) else (str(enc) if enc is not None else None)
    for k in ("target_mpp", "patch_size"):
        v = _attr_num(attrs, k)
        out[k] = None if v is None else (int(v) if k == "patch_size" else round(float(v), 6))
    return out


def provenance(paths: list[Path]) -> dict:
    """:func:`file_provenance` over many files: per key the sorted distinct values that were recorded."""
    seen: dict[str, set] = {k: set() for k in PROVENANCE_KEYS}
    for p in paths:
        for k, v in file_provenance(p).items():
            if v is not None:
                seen[k].add(v)
    return {k: sorted(v) for k, v in seen.items()}


def check_h5_features(path: str | Path, whole_slide: bool = False) -> None:
    """The checks of :func:`read_h5_features` on shapes and attributes only (no data read), so that a
    command can refuse a bad file before it writes anything; ``whole_slide`` also needs coords with a
    level-0 patch size (what whole-slide outputs are drawn with)."""
    path = Path(path)

    def shape(ds) -> tuple[int, ...]:
        sh = tuple(ds.shape)
        return sh[1:] if len(sh) == 3 and sh[0] == 1 else sh

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ValueError(f"{path}: no 'features' dataset (run 'milkit extract' first)")
            fs = shape(f["features"])
            if len(fs) != 2:
                raise ValueError(f"{path}: 'features' has shape {fs}, expected (N, D)")
            attrs = dict(f.attrs)
            if "coords" in f:
                cs = shape(f["coords"])
                attrs.update(dict(f["coords"].attrs))
                if 0 not in cs and (len(cs) != 2 or cs[1] != 2):
                    raise ValueError(f"{path}: 'coords' has shape {cs}, expected (N, 2) level-0 (x, y)")
                if 0 not in cs and cs[0] != fs[0]:
                    raise ValueError(f"{path}: {fs[0]} feature rows but {cs[0]} coords")
            elif whole_slide:
                raise ValueError(f"{path}: whole-slide outputs need coords (N, 2) level-0 (x, y)")
            has_ps0 = _attr_num(attrs, "patch_size_level0") is not None or (
                _attr_num(attrs, "patch_size") is not None and _attr_num(attrs, "downsample") is not None)
            if whole_slide and not has_ps0 and fs[0] > 0:  # the size is then read off the grid: needs two positions
                c = np.asarray(f["coords"][()]).reshape(-1, 2)
                if coordinate_step(c) is None:
                    raise ValueError(f"{path}: whole-slide outputs need a patch_size_level0 attribute on coords (with "
                                     "fewer than two patch positions it cannot be read off the grid)")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from None


def check_h5_values(path: str | Path, dim: int | None = None, trained: str = "the run",
                    chunk_rows: int = 65536) -> None:
    """The checks a command makes before it writes anything, beyond :func:`check_h5_features`'s shapes: the
    feature size D is ``dim`` (the size ``trained`` takes; None: not checked), finite features (read in chunks
    of ``chunk_rows``) and no two patches at one position (the patch graph and every map need distinct coords).
    Raises ValueError naming the file."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            ds = f["features"]
            if dim is not None and ds.ndim >= 2 and int(ds.shape[-1]) != dim:
                raise ValueError(f"{path}: features have D = {int(ds.shape[-1])}, but {trained} was trained on "
                                 f"D = {dim} features; label features of the run's encoder (milkit extract --encoder)")
            rows = ds.shape[-2] if ds.ndim >= 2 else 0
            bad = 0
            for start in range(0, rows, chunk_rows):
                block = np.asarray(ds[..., start:start + chunk_rows, :])
                finite = np.isfinite(block)
                if not finite.all():
                    bad += int((~finite).reshape(-1, block.shape[-1]).any(axis=1).sum())
            if bad:
                raise ValueError(f"{path}: features contain NaN or Inf ({bad} of {rows} rows); re-extract this slide")
            if "coords" in f and f["coords"].size:
                c = np.asarray(f["coords"][()]).reshape(-1, 2)
                n_distinct = len(np.unique(c, axis=0))
                if n_distinct != len(c):
                    raise ValueError(f"{path}: {len(c) - n_distinct} patch position(s) in 'coords' appear more than "
                                     "once; every patch needs its own position (re-tile this slide)")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from None


def read_pt_features(path: str | Path, coords_h5: Path | None = None) -> FeatureFile:
    """CLAM ``.pt``: the (N, D) tensor (``weights_only=True``); coords from ``coords_h5``."""
    path = Path(path)
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised naming the file
        raise ValueError(f"{path}: not a readable tensor file ({err})") from None
    if isinstance(t, dict) and "features" in t:
        t = t["features"]
    if not isinstance(t, torch.Tensor) or t.ndim != 2:
        raise ValueError(f"{path}: expected an (N, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    feats = t.float().numpy()
    coords, ps0 = None, None
    if coords_h5 is not None and coords_h5.is_file():
        with h5py.File(coords_h5, "r") as f:
            if "coords" in f:
                coords = np.asarray(f["coords"][()], dtype=np.int64).reshape(-1, 2)
                a = dict(f["coords"].attrs)
                ps0 = _attr_num(a, "patch_size_level0")
        if coords is not None and len(coords) != len(feats):
            raise ValueError(f"{path}: {len(feats)} feature rows but {len(coords)} coords in {coords_h5}")
    return FeatureFile(path, feats, coords, None if ps0 is None else int(ps0))


def _load_array(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    with h5py.File(path, "r") as f:
        keys = list(f)
        if not keys:
            raise ValueError(f"{path}: empty HDF5 file")
        return np.asarray(f[keys[0]][()])


def _sibling(root: Path, folders: tuple[str, ...], bag: str) -> Path | None:
    for folder in folders:
        for suf in (".npy", ".h5"):
            p = root / folder / f"{bag}{suf}"
            if p.is_file():
                return p
    return None


def read_torchmil_bag(root: str | Path, bag: str, patch_size_level0: int | None) -> FeatureFile:
    """torchmil processed layout: ``features/<bag>``, ``coords/<bag>`` (grid units),
    ``patch_labels/<bag>`` or ``inst_labels/<bag>``."""
    root = Path(root)
    fp = _sibling(root, ("features",), bag)
    if fp is None:
        raise FileNotFoundError(f"{root}: no features/{bag}.npy or .h5")
    feats = np.asarray(_load_array(fp), dtype=np.float32)
    if feats.ndim != 2:
        raise ValueError(f"{fp}: features have shape {feats.shape}, expected (N, D)")
    coords = None
    cp = _sibling(root, ("coords",), bag)
    if cp is not None:
        grid = np.asarray(_load_array(cp)).reshape(-1, 2)
        if len(grid) != len(feats):
            raise ValueError(f"{cp}: {len(grid)} coords but {len(feats)} feature rows in {fp}")
        coords = np.rint(grid * (patch_size_level0 or 1)).astype(np.int64)
    inst = None
    ip = _sibling(root, ("patch_labels", "inst_labels"), bag)
    if ip is not None:
        inst = np.asarray(_load_array(ip)).reshape(-1).astype(np.int64)
        if len(inst) != len(feats):
            raise ValueError(f"{ip}: {len(inst)} instance labels but {len(feats)} feature rows in {fp}")
    return FeatureFile(fp, feats, coords, patch_size_level0, inst)


def feature_subfolder_hint(features_dir: Path) -> str:
    """When a features folder holds no feature file but its subfolders do (TRIDENT writes
    ``<job>/features_<encoder>/``, one per encoder), the text that names them; else empty."""
    subs = sorted(d for d in features_dir.iterdir() if d.is_dir() and any(d.glob("*.h5"))) if features_dir.is_dir() else []
    if not subs:
        return ""
    names = ", ".join(f"{d.name}/" for d in subs[:3]) + (" …" if len(subs) > 3 else "")
    return f"; it holds none, but {names} do: point data.features_dir at the one of your encoder"


def detect_layout(features_dir: Path) -> str:
    """``torchmil`` (a features/ folder), ``clam_pt`` (pt_files/ or .pt files), else ``h5``."""
    if (features_dir / "features").is_dir():
        return "torchmil"
    if (features_dir / "pt_files").is_dir() and not (features_dir / "h5_files").is_dir():
        return "clam_pt"
    if not any(features_dir.glob("*.h5")) and any(features_dir.glob("*.pt")):
        return "clam_pt"
    return "h5"


def index_feature_files(features_dir: Path, layout: str) -> dict[str, Path]:
    """slide id → its feature file (or, for torchmil, the layout root)."""
    if layout == "torchmil":
        return {p.stem: features_dir for p in (features_dir / "features").iterdir() if p.suffix in (".npy", ".h5")}
    if layout == "clam_pt":
        d = features_dir / "pt_files" if (features_dir / "pt_files").is_dir() else features_dir
        return {p.stem: p for p in d.glob("*.pt")}
    d = features_dir / "h5_files" if (features_dir / "h5_files").is_dir() else features_dir
    return {p.stem.removesuffix("_patches"): p for p in d.glob("*.h5") if not p.name.startswith(".")}


# -- dataset --------------------------------------------------------------------------
class FeatureBagsConfig(DataConfig):
    """Feature bags from a folder of per-slide files and a labels CSV."""

    kind: Literal["feature_bags"] = "feature_bags"
    features_dir: Path
    labels_csv: Path | None = Field(None, description="slide_id,label[,case_id,split]; optional for torchmil")
    layout: Layout = "auto"
    label_column: str = "label"
    #: the label column's values → 0 / 1, e.g. ``{normal_tissue: 0, tumor_tissue: 1}`` (CLAM's ``label_dict``);
    #: a value mapped to null drops those slides (CLAM's ``ignore``). None = 0/1, true/false, tumor/normal,
    #: positive/negative. Not from a paper
    label_map: dict[str, int | None] | None = None
    #: auto: the CSV's split column when it has one, else fractions
    split_mode: Literal["auto", "csv", "fractions", "kfold"] = "auto"
    #: train/val/test; 70/10/20 as in Distill-to-Label §IV (NOTES.md)
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    #: k-fold: 5 folds (Distill-to-Label §IV; Sm App. B uses five train/val splits)
    folds: int = Field(5, ge=2)
    fold: int = Field(0, ge=0)
    #: share of the training cases moved to validation when the CSV (or k-fold) has no val part
    val_fraction: float = Field(0.1, ge=0, lt=1)
    #: labels CSV column whose values stay together in one split, on top of the case grouping: with
    #: ``site`` (or scanner, centre…) validation and test hold sites the model did not train on, the one way a
    #: validation split can show a site shortcut (docs/benchmarks.md, hard-combined). Not from a paper;
    #: None = group by case only
    group_column: str | None = None
    #: carve validation out of train (stratified, grouped by case, ``val_fraction``); None = only when
    #: the CSV's split column has train and test but no val (Camelyon16's official split);
    #: the resolved config records ``true`` when it happened
    val_from_train: bool | None = None
    #: level-0 patch size for torchmil grid coords (None keeps grid units)
    patch_size_level0: int | None = Field(None, ge=1)
    #: ASAP XML / GeoJSON per slide → instance labels (scoring only, never training)
    annotations_dir: Path | None = None
    #: patch positive iff tumour fraction ≥ this (Camelyon16 0.5: Sm App. B, NOTES.md)
    tumour_fraction: float = Field(0.5, gt=0, le=1)
    #: attach the 8-neighbour bag graph (milkit.data.graph) for Sm
    graph: bool = False
    #: read every bag once before training, into the bag cache (data/bag_cache.py: one mechanism);
    #: with ``cache_gb`` left out every bag is kept, as preload always did. Not from a paper: off
    #: by default (the cache keeps bags after their first read anyway)
    preload: bool = False
    #: keep bags in memory after their first read, up to this many GiB in all (data/bag_cache.py);
    #: a changed file is read again; 0 = read every bag on every access. None (left out) = 2 GiB,
    #: or no limit with ``preload``. Not from a paper: 2 GiB holds ~500k 1024-d float32 features,
    #: and an epoch then reads no file (docs/scale.md)
    cache_gb: float | None = Field(None, ge=0)

    @field_validator("label_map")
    @classmethod
    def _label_map(cls, v: dict[str, int | None] | None) -> dict[str, int | None] | None:
        if v is not None:
            if not v:
                raise ValueError("label_map is empty; leave it out for 0/1 labels")
            bad = {k: x for k, x in v.items() if x not in (0, 1, None)}
            if bad:
                raise ValueError(f"label_map values must be 0, 1 or null, got {bad}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "FeatureBagsConfig":
        if self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} must be < folds {self.folds}")
        if abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(f"fractions must sum to 1, got {list(self.fractions)}")
        if self.preload and self.cache_gb == 0:
            raise ValueError("data.preload: true keeps the bags in the bag cache, which data.cache_gb: 0 turns off; "
                             "leave data.cache_gb out (no limit with preload) or set data.preload: false")
        return self

    def cache_budget_bytes(self) -> int | None:
        """The bag cache's budget: ``cache_gb`` GiB; left out: 2 GiB, or no limit with ``preload``."""
        if self.cache_gb is None:
            return None if self.preload else DEFAULT_CACHE_BYTES
        return int(self.cache_gb * 2**30)

    def build(self, seed: int) -> DataSplits:
        table = FeatureTable.from_config(self)
        if self.annotations_dir is not None:  # here, not in from_config: milkit view reads the table too
            _note_not_annotated(table.rows, Path(self.annotations_dir))
        table.cache = BagCache(self.cache_budget_bytes())
        parts = table.split_indices(self, seed)
        if self.preload:
            preload_bags(table, self, [int(i) for idx in parts for i in idx])
        return DataSplits(*(FeatureBagDataset(table, idx, self) for idx in parts))


@dataclass
class FeatureTable:
    """Every labelled slide with its file; validated against the folder up front."""

    rows: list[LabelRow]
    files: list[Path]
    layout: str
    source: Path
    _inst: dict = field(default_factory=dict, repr=False)  # annotation labels, computed once
    _dim: tuple[int, Path] | None = field(default=None, repr=False)  # (D, first file read)
    #: bags kept after their first read (shared by the three splits); None = none kept
    cache: BagCache | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: FeatureBagsConfig) -> "FeatureTable":
        fdir = Path(cfg.features_dir)
        if not fdir.is_dir():
            raise FileNotFoundError(f"{fdir}: features folder (data.features_dir) does not exist{_relative_note(fdir)}")
        if cfg.annotations_dir is not None and not Path(cfg.annotations_dir).is_dir():
            raise FileNotFoundError(f"{cfg.annotations_dir}: annotations folder (data.annotations_dir) does not exist"
                                    f"{_relative_note(Path(cfg.annotations_dir))}")
        layout = detect_layout(fdir) if cfg.layout == "auto" else cfg.layout
        index = index_feature_files(fdir, layout)
        if cfg.labels_csv is not None:
            rows = read_labels_csv(cfg.labels_csv, cfg.label_column, cfg.group_column, cfg.label_map)
            source = Path(cfg.labels_csv)
            if cfg.group_column is not None:
                _check_case_groups(rows, source, cfg.group_column)
        elif layout == "torchmil":
            if cfg.group_column is not None:
                raise ValueError(f"{fdir}: data.group_column {cfg.group_column!r} needs data.labels_csv (the "
                                 "column is read from it)")
            rows, source = _torchmil_labels(fdir), fdir
        else:
            raise ValueError(f"{fdir}: data.labels_csv is required for the {layout!r} layout")
        missing = [r.slide_id for r in rows if r.slide_id not in index]
        if missing:
            shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
            raise ValueError(
                f"{source}: {len(missing)} labelled slide(s) have no feature file in {fdir} ({layout} layout): {shown}"
                + (feature_subfolder_hint(fdir) if not index else ""))
        if not rows:
            raise ValueError(f"{source}: no labelled slides")
        return cls(rows, [index[r.slide_id] for r in rows], layout, source)

    def split_indices(self, cfg: FeatureBagsConfig, seed: int) -> list[np.ndarray]:
        labels = np.array([r.label for r in self.rows])
        by_group = cfg.group_column is not None
        groups = np.array([r.group if by_group else r.case_id for r in self.rows])
        has_csv = all(r.split is not None for r in self.rows)
        mode = cfg.split_mode if cfg.split_mode != "auto" else ("csv" if has_csv else "fractions")
        if mode == "csv":
            if not has_csv:
                missing = next(i for i, r in enumerate(self.rows) if r.split is None)
                raise ValueError(f"{self.source}: split_mode 'csv' needs a split value on every row "
                                 f"(slide {self.rows[missing].slide_id!r} has none)")
            tr, va, te = (np.flatnonzero([r.split == s for r in self.rows]) for s in ("train", "val", "test"))
            _check_cases(self.rows, [tr, va, te], self.source)
            if by_group:
                _check_cases(self.rows, [tr, va, te], self.source, cfg.group_column)
            carve = cfg.val_from_train if cfg.val_from_train is not None else (len(va) == 0 and len(tr) > 0)
            if carve:
                tr, va = self._carve_val(tr, va, labels, groups, cfg, seed)
            for name, part in (("train", tr), ("val", va), ("test", te)):
                if len(part) == 0:
                    raise ValueError(f"{self.source}: the {name} split is empty (no row has split '{name}')")
            return [tr, va, te]
        if mode == "kfold":
            try:
                parts = list(kfold_splits(labels, groups, cfg.folds, seed, cfg.val_fraction)[cfg.fold])
            except ValueError as err:
                raise ValueError(f"{self.source}: data.folds: {err}") from None
        else:
            parts = stratified_group_split(labels, groups, cfg.fractions, seed)
        if by_group:
            for name, part in zip(("train", "val", "test"), parts):
                if len(part) == 0:
                    raise ValueError(f"{self.source}: data.group_column {cfg.group_column!r}: its "
                                     f"{len(np.unique(groups))} groups are too few for a {name} split; give "
                                     "more groups or a split column")
        return parts

    def _carve_val(self, tr: np.ndarray, va: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                   cfg: FeatureBagsConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Move ``val_fraction`` of the training cases (stratified, grouped by case) to validation."""
        if len(va):
            raise ValueError(f"{self.source}: data.val_from_train is true but {len(va)} rows already have split 'val'")
        if cfg.val_fraction <= 0:
            raise ValueError(f"{self.source}: the val split is empty and data.val_fraction is 0; "
                             "set data.val_fraction (e.g. 0.1) to carve validation out of train")
        keep, move = stratified_group_split(labels[tr], groups[tr], (1 - cfg.val_fraction, cfg.val_fraction), seed)
        if len(move) == 0 or len(keep) == 0:
            raise ValueError(f"{self.source}: the val split is empty and the {len(tr)} training slides are too few "
                             f"to carve {cfg.val_fraction:g} of them out as validation")
        log.warning("%s: no val split; %d of %d training slides (val_fraction %g, stratified, by %s) are "
                    "used for validation (data.val_from_train: true)", self.source, len(move), len(tr),
                    cfg.val_fraction, cfg.group_column or "case")
        cfg.val_from_train = True
        return np.sort(tr[keep]), np.sort(tr[move])

    def sources(self, i: int) -> list[Path]:
        """The files bag ``i`` is read from (what the cache watches for changes)."""
        row, path = self.rows[i], self.files[i]
        if self.layout == "torchmil":
            return [p for p in (_sibling(path, ("features",), row.slide_id), _sibling(path, ("coords",), row.slide_id),
                                _sibling(path, ("patch_labels", "inst_labels"), row.slide_id)) if p is not None]
        if self.layout == "clam_pt":
            h5 = path.parent.parent / "h5_files" / f"{row.slide_id}.h5"
            return [path, h5] if h5.is_file() else [path]
        return [path]

    def get(self, i: int, cfg: FeatureBagsConfig) -> Bag:
        """Bag ``i``, from the cache when it holds it and its files are unchanged."""
        if self.cache is None:
            return self.load(i, cfg)
        return self.cache.get(i, self.sources(i), lambda: self.load(i, cfg))

    def load(self, i: int, cfg: FeatureBagsConfig) -> Bag:
        """Bag ``i`` read from its file(s)."""
        row, path = self.rows[i], self.files[i]
        if self.layout == "torchmil":
            ff = read_torchmil_bag(path, row.slide_id, cfg.patch_size_level0)
        elif self.layout == "clam_pt":
            h5 = path.parent.parent / "h5_files" / f"{row.slide_id}.h5"
            ff = read_pt_features(path, h5)
        else:
            ff = read_h5_features(path)
        self._check_file(ff, row)
        inst = ff.instance_labels
        if cfg.annotations_dir is not None and ff.coords is not None:
            if i not in self._inst:
                self._inst[i] = _annotation_labels(cfg, row, ff)
            inst = self._inst[i]
        bag = Bag(
            instances=torch.from_numpy(ff.features),
            label=row.label,
            bag_id=row.slide_id,
            instance_labels=None if inst is None else torch.from_numpy(inst),
            coords=None if ff.coords is None else torch.from_numpy(ff.coords),
            meta={"path": str(ff.path), "case_id": row.case_id, "patch_size_level0": ff.patch_size_level0},
        )
        if cfg.graph:
            if ff.coords is None:
                raise ValueError(f"{ff.path}: data.graph (the patch graph SmAP, SmTAP and pseudo_label smooth over) "
                                 "needs coords, and this file has none; data.graph: false trains without it "
                                 "(pseudo_label without spatial smoothing; SmAP / SmTAP cannot)")
            from milkit.data.graph import grid_adjacency

            try:
                bag.adj = grid_adjacency(ff.coords, ff.patch_size_level0) if len(ff.features) else None
            except ValueError as err:  # duplicate positions: name the file
                raise ValueError(f"{ff.path}: {err}; every patch needs its own position (re-tile this slide)") from None
        return bag


    def _check_file(self, ff: FeatureFile, row: LabelRow) -> None:
        """Finite features, the same D as every other slide, and no empty positive bag."""
        n, d = ff.features.shape
        if n == 0 and row.label == 1:
            raise ValueError(f"{ff.path}: slide {row.slide_id!r} is labelled positive but its bag is empty "
                             "(0 patches); a positive bag needs instances (check tiling/tissue detection)")
        if n and not np.isfinite(ff.features).all():
            bad = int((~np.isfinite(ff.features)).any(axis=1).sum())
            raise ValueError(f"{ff.path}: features contain NaN or Inf ({bad} of {n} rows); re-extract this slide")
        if self._dim is None:
            self._dim = (d, ff.path)
        elif d != self._dim[0]:
            raise ValueError(f"{ff.path}: features have D = {d}, but {self._dim[1]} has D = {self._dim[0]}; "
                             "every slide needs features from the same encoder")


def _torchmil_labels(root: Path) -> list[LabelRow]:
    """Bag labels from ``labels/<bag>`` (max of the array) and splits from ``splits.csv``."""
    splits: dict[str, str] = {}
    sp = root / "splits.csv"
    if sp.is_file():
        from milkit.io import read_csv_rows

        for r in read_csv_rows(sp, "splits CSV"):
            name = r.get("bag_name") or r.get("slide_id") or r.get("bag")
            s = r.get("split", "").lower()
            if name and s in SPLIT_NAMES:
                splits[name] = SPLIT_NAMES[s]
    rows = []
    for p in sorted((root / "features").iterdir()):
        if p.suffix not in (".npy", ".h5"):
            continue
        lp = _sibling(root, ("labels",), p.stem)
        if lp is None:
            raise ValueError(f"{root}: bag {p.stem!r} has no labels/{p.stem}.npy; pass data.labels_csv")
        rows.append(LabelRow(p.stem, int(np.asarray(_load_array(lp)).max() > 0), p.stem, splits.get(p.stem)))
    return rows


def _check_cases(rows: list[LabelRow], parts: list[np.ndarray], source: Path, group_column: str | None = None) -> None:
    """No case (or, with ``group_column``, no group) has slides in two splits."""
    seen: dict[str, str] = {}
    what = "case" if group_column is None else f"{group_column} (data.group_column)"
    for name, idx in zip(("train", "val", "test"), parts):
        for i in idx:
            c = rows[i].case_id if group_column is None else rows[i].group
            if seen.setdefault(c, name) != name:
                raise ValueError(f"{source}: {what} {c!r} has slides in both {seen[c]} and {name}")


def _check_case_groups(rows: list[LabelRow], source: Path, group_column: str) -> None:
    """Every case lies in one group (a patient's slides from two sites would straddle two splits)."""
    group_of: dict[str, str] = {}
    for r in rows:
        g = group_of.setdefault(r.case_id, r.group)
        if g != r.group:
            raise ValueError(f"{source}: case {r.case_id!r} has slides in {group_column} {g!r} and {r.group!r} "
                             "(data.group_column keeps a group in one split)")


def _annotation_labels(cfg: FeatureBagsConfig, row: LabelRow, ff: FeatureFile) -> np.ndarray | None:
    """Patch labels from ``data.annotations_dir``; None (unknown) for a positive slide without an
    annotation file (:func:`milkit.slide.annotations.not_annotated`)."""
    from milkit.slide.annotations import (check_regions, find_annotation, not_annotated, read_annotations,
                                          slide_patch_labels, tumour_geometry)

    ann = find_annotation(cfg.annotations_dir, row.slide_id)  # type: ignore[arg-type]
    if not_annotated(ann, row.label):
        return None
    if not len(ff.features) or ann is None:  # Camelyon16: normal slides have no annotation
        return np.zeros(len(ff.features), np.int64)
    ps0, _ = level0_patch_size(ff, "annotations (data.annotations_dir)")  # CLAM h5_files: the coordinate step
    regions = read_annotations(ann, offset=ff.bounds_offset)  # QuPath GeoJSON starts at the bounds origin
    attrs = h5_attrs(ff.path) if ff.path.suffix == ".h5" else {}
    size = (_attr_num(attrs, "level0_width"), _attr_num(attrs, "level0_height"))
    level0 = (int(size[0]), int(size[1])) if None not in size else None
    check_regions(regions, ann, level0)  # all tumour outside the slide: an error, as for evaluate --annotations
    labels = slide_patch_labels(ann, row.label, ff.coords, ps0, cfg.tumour_fraction, regions, level0)
    if not tumour_geometry(regions).is_empty and not (labels == 1).any():
        log.warning("%s: its tumour covers none of slide %r's %d patches at data.tumour_fraction %g (wrong slide, "
                    "coordinate offset or patch size?); the slide gets no tumour patch", ann, row.slide_id,
                    len(labels), cfg.tumour_fraction)
    if row.label == 0 and (labels == 1).any():
        log.warning("%s: slide %r is labelled negative, but this annotation makes %d of its patches tumour; "
                    "check the labels CSV or the annotation", ann, row.slide_id, int((labels == 1).sum()))
    return labels


def _note_not_annotated(rows: list[LabelRow], folder: Path) -> None:
    """One notice naming the positive slides that ``data.annotations_dir`` does not annotate."""
    from milkit.slide.annotations import find_annotation, not_annotated, note_unmatched_annotations

    note_unmatched_annotations(folder, [r.slide_id for r in rows])
    miss = [r.slide_id for r in rows if not_annotated(find_annotation(folder, r.slide_id), r.label)]
    if miss:
        shown = ", ".join(miss[:5]) + (" …" if len(miss) > 5 else "")
        log.info("%d positive slide(s) have no annotation in %s (%s): their patch labels are unknown and they are "
                 "left out of every patch metric (negative slides without one are all negative)", len(miss),
                 folder, shown)


def preload_bags(table: FeatureTable, cfg: FeatureBagsConfig, indices: list[int]) -> None:
    """``data.preload``: read every bag of ``indices`` once into ``table.cache`` before training.
    A ``data.cache_gb`` too small for all of them is refused (one line, after the pass, with the
    size they need); a bag left out because its file changed while it was read is read again later."""
    cache = table.cache
    if cache is None or cache.budget_bytes == 0:
        raise ValueError("data.preload: true needs the bag cache; data.cache_gb: 0 turns it off")
    need = sum(bag_bytes(table.get(i, cfg)) for i in indices)
    if cache.budget_bytes is not None and need > cache.budget_bytes:
        raise ValueError(f"data.preload: the {len(indices)} bags need {need / 2**30:.3g} GiB in memory, more than "
                         f"data.cache_gb: {cfg.cache_gb:g}; raise data.cache_gb, leave it out (no limit with preload) "
                         "or set data.preload: false")


class FeatureBagDataset(BagDataset):
    """Bags of one split, read on first access and kept within ``cache_gb`` (``preload``: the
    cache was filled before training, ``preload_bags``)."""

    def __init__(self, table: FeatureTable, indices: np.ndarray, cfg: FeatureBagsConfig):
        self.table = table
        self.indices = [int(i) for i in indices]
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Bag:
        return self.table.get(self.indices[i], self.cfg)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def validate(self) -> None:
        """Read every bag once (milkit train does, before writing anything): unreadable files,
        NaN/Inf, an empty positive bag or a different D fail here, naming the file."""
        for i in range(len(self)):
            self[i]

    @property
    def bags(self) -> list[Bag]:  # type: ignore[override]
        """Every bag of the split (loads them all)."""
        return [self[i] for i in range(len(self))]

    @property
    def labels(self) -> list[int]:
        return [self.table.rows[i].label for i in self.indices]

    @property
    def bag_ids(self) -> list[str]:
        return [self.table.rows[i].slide_id for i in self.indices]
