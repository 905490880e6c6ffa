"""Annotations: Camelyon16/ASAP XML and QuPath GeoJSON → polygons → patch labels and pixel masks.

All geometry is level-0 (x, y) pixels. ASAP groups ``_2``, ``Exclusion`` and ``None``
are non-tumour holes (FORMATS.md "Annotations"): the tumour area is the union of tumour
polygons minus their interior rings, minus every non-tumour region. A patch's tumour
fraction is the exact area of patch ∩ tumour (shapely), so no rasterisation inflates a
lesion; it is positive when the fraction reaches ``threshold`` (0.5 by default, as in
Camelyon16 work, Sm App. B; always recorded with the labels). Pixel masks (for drawing
and pixel metrics) are still rasterised by :func:`level_mask`.

A third kind of region, *reviewed* (class ``Review`` as ``review.geojson`` writes it, QuPath's
``Region*``), marks where a partial annotation is complete: :func:`slide_patch_labels`, the one
rule training, ``evaluate --annotations`` and the viewer share, leaves patches outside it unknown
on a positive slide. :func:`write_asap_xml` / :func:`write_asap_region` write ASAP XML (``label``'s
``outlines.xml``; holes as ``Exclusion`` polygons).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw

from milkit import io

#: ASAP/QuPath group or class names (lower case) that are not tumour: Camelyon16's ``_2`` and ASAP's exclusions,
#: QuPath's default non-tumour classes (Stroma, Immune cells, Necrosis, Other, Ignore*, Negative) and a drawn
#: tissue outline or artefact. Any other name, or none, is tumour (what a pathologist draws is the lesion)
NON_TUMOUR = frozenset({"_2", "exclusion", "none", "normal", "ignore", "ignore*", "other", "background", "negative",
                        "stroma", "immune cells", "necrosis", "tissue", "artifact", "artefact"})
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")
log = logging.getLogger(__name__)
#: the name every object milkit writes for QuPath starts with (outlines, detections): an annotation file
#: exported from QuPath with them still in it must not count milkit's own predictions as truth
OWN_OBJECT_PREFIX = "milkit "


#: class or group names (lower case) of a *reviewed region*: the part of a slide someone looked at
#: (milkit's ``review.geojson`` class, QuPath's ``Region*``); see :func:`slide_patch_labels`
REVIEWED = frozenset({"review", "reviewed", "region*", "roi"})


@dataclass
class Region:
    """A polygon with optional interior rings; ``positive`` = tumour; ``reviewed`` = a reviewed
    region (neither tumour nor exclusion: it says where the annotation is complete)."""

    exterior: np.ndarray  # (K, 2) float level-0 (x, y)
    holes: list[np.ndarray] = field(default_factory=list)
    name: str = ""
    positive: bool = True
    reviewed: bool = False


def _base_class(name: str) -> str:
    """The base class of a QuPath derived class (``Stroma: Negative`` → ``stroma``), lower case."""
    return name.split(":")[0].strip().lower()


def _is_reviewed(name: str | None) -> bool:
    return name is not None and _base_class(name) in REVIEWED


def _is_tumour(name: str | None) -> bool:
    return name is None or (_base_class(name) not in NON_TUMOUR and not _is_reviewed(name))


def _region(exterior: np.ndarray, holes: list[np.ndarray], name: str | None) -> Region:
    return Region(exterior, holes, name or "", _is_tumour(name), _is_reviewed(name))


def read_asap_xml(path: str | Path) -> list[Region]:
    """Polygons of an ASAP/Camelyon16 XML; ``PartOfGroup`` decides tumour or not."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path}: not valid ASAP XML ({err})") from None
    regions = []
    n_shapes = 0
    for ann in root.iter("Annotation"):
        n_shapes += 1
        pts = []
        for c in ann.iter("Coordinate"):
            try:
                pts.append((int(c.get("Order", len(pts))), float(c.get("X")), float(c.get("Y"))))
            except (TypeError, ValueError):
                raise ValueError(f"{path}: annotation {ann.get('Name')!r} has a coordinate without numeric X/Y") from None
        if len(pts) < 3:
            continue  # dots and lines carry no area
        pts.sort(key=lambda t: t[0])
        group = ann.get("PartOfGroup")
        regions.append(_region(np.array([(x, y) for _, x, y in pts]), [], group))
    _check_area(path, n_shapes, len(regions))
    return regions


#: the groups milkit writes: tumour outlines, and the holes cut out of them (a :data:`NON_TUMOUR` name)
ASAP_TUMOUR_GROUP, ASAP_EXCLUSION_GROUP = "Tumor", "Exclusion"


def write_asap_xml(path: str | Path, polygons: list[np.ndarray], group: str = ASAP_TUMOUR_GROUP,
                   exclusions: Sequence[np.ndarray] = (), exclusion_group: str = ASAP_EXCLUSION_GROUP) -> None:
    """Camelyon16/ASAP XML (atomic): one ``Polygon`` annotation per (K, 2) level-0 polygon in
    ``group``, and per ``exclusions`` polygon in ``exclusion_group`` (ASAP has no holes: Camelyon16
    marks them as polygons of an exclusion group, which :func:`read_asap_xml` subtracts)."""
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    shapes = [(p, group, "#F4FA58") for p in polygons] + [(p, exclusion_group, "#64FE2E") for p in exclusions]
    for i, (poly, grp, colour) in enumerate(shapes):
        a = ET.SubElement(anns, "Annotation", Name=f"Annotation {i}", Type="Polygon", PartOfGroup=grp, Color=colour)
        coords = ET.SubElement(a, "Coordinates")
        for k, (x, y) in enumerate(np.asarray(poly, np.float64)):
            ET.SubElement(coords, "Coordinate", Order=str(k), X=f"{x:.3f}", Y=f"{y:.3f}")
    groups = ET.SubElement(root, "AnnotationGroups")
    for grp, colour in ((group, "#FF0000"), (exclusion_group, "#00FF00"))[: 2 if len(exclusions) else 1]:
        ET.SubElement(ET.SubElement(groups, "Group", Name=grp, PartOfGroup="None", Color=colour), "Attributes")
    io.write_text(path, '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode"))


def write_asap_region(path: str | Path, geom, group: str = ASAP_TUMOUR_GROUP) -> Path:
    """A shapely (Multi)Polygon in level-0 px of the full slide (ASAP uses no bounds offset) as ASAP
    XML: exteriors in ``group``, holes as :data:`ASAP_EXCLUSION_GROUP` polygons. Reading it back with
    :func:`tumour_geometry` gives the same area, except an island inside another region's hole,
    which Camelyon16's rule (exclusions are subtracted last) drops."""
    polys = [] if geom.is_empty else list(getattr(geom, "geoms", [geom]))
    ext = [np.asarray(p.exterior.coords)[:-1] for p in polys]
    holes = [np.asarray(h.coords)[:-1] for p in polys for h in p.interiors]
    write_asap_xml(path, ext, group, holes)
    return Path(path)


def _check_area(path: Path, n_shapes: int, n_polygons: int) -> None:
    """Points and lines carry no area: a file of only those is an error, some of them a warning."""
    if n_shapes and not n_polygons:
        raise ValueError(f"{path}: its {n_shapes} annotation(s) are all points or lines; "
                         "patch labels need polygons (an area)")
    if n_shapes > n_polygons:
        log.warning("%s: %d of %d annotations are points or lines and are ignored (no area)",
                    path, n_shapes - n_polygons, n_shapes)


def _rings_to_regions(rings: list, name: str | None, offset: tuple[float, float], path: Path) -> Region | None:
    try:
        arrs = [np.asarray(r, dtype=np.float64)[:, :2] + np.asarray(offset) for r in rings]
    except (ValueError, IndexError, TypeError):
        raise ValueError(f"{path}: polygon coordinates are not [[x, y], ...] lists") from None
    if not arrs or len(arrs[0]) < 3:
        return None
    return _region(arrs[0], [a for a in arrs[1:] if len(a) >= 3], name)


def _geometry_regions(geom: dict, name: str | None, offset, path: Path) -> list[Region]:
    t = (geom or {}).get("type")
    if t == "Polygon":
        r = _rings_to_regions(geom.get("coordinates", []), name, offset, path)
        return [r] if r else []
    if t == "MultiPolygon":
        out = []
        for poly in geom.get("coordinates", []):
            r = _rings_to_regions(poly, name, offset, path)
            if r:
                out.append(r)
        return out
    if t == "GeometryCollection":
        return [r for g in geom.get("geometries", []) for r in _geometry_regions(g, name, offset, path)]
    return []  # points and lines carry no area


def _class_name(cls: object) -> str | None:
    """A GeoJSON feature's class: QuPath's ``{"name": "Tumor: Positive"}``, QuPath 0.4's ``{"names": ["Tumor",
    "Positive"]}`` (joined as QuPath shows it), or a plain string; None when unclassified."""
    if isinstance(cls, dict):
        if isinstance(cls.get("name"), str):
            return cls["name"]
        names = cls.get("names")
        return ": ".join(map(str, names)) if isinstance(names, list) and names else None
    return cls if isinstance(cls, str) else None


def read_geojson(path: str | Path, offset: tuple[float, float] = (0.0, 0.0), own_objects: bool = False) -> list[Region]:
    """Polygons of a QuPath GeoJSON (FeatureCollection, Feature, or a list of features).
    ``offset`` is added to every coordinate (``openslide.bounds-x/-y`` for cropped slides).
    Objects milkit wrote itself (named :data:`OWN_OBJECT_PREFIX` …) are predictions, left out with a warning
    (a file of only those is an error), unless ``own_objects`` (reading milkit's outputs back as shapes)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        feats = obj.get("features", [])
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        feats = [obj]
    elif isinstance(obj, list):
        feats = obj
    else:
        raise ValueError(f"{path}: expected a GeoJSON FeatureCollection, Feature or list of features")
    regions = []
    n_shapes = n_area = n_ours = 0
    for f in feats:
        if not isinstance(f, dict):
            raise ValueError(f"{path}: a feature is not a JSON object")
        props = f.get("properties") or {}
        if not own_objects and str(props.get("name") or "").startswith(OWN_OBJECT_PREFIX):  # back from QuPath
            n_ours += 1
            continue
        cls = props.get("classification")
        name = _class_name(cls)
        got = _geometry_regions(f.get("geometry"), name, offset, path)
        n_shapes += f.get("geometry") is not None
        n_area += bool(got)
        regions += got
    if n_ours and not n_shapes:
        raise ValueError(f"{path}: holds only objects milkit wrote ({n_ours}: its predicted outlines or patches, "
                         f"named '{OWN_OBJECT_PREFIX}…', imported into QuPath and exported back), no annotation of "
                         "your own; an outline you corrected counts as truth once you rename it in QuPath")
    if n_ours:
        log.warning("%s: %d object(s) milkit wrote (its predicted outlines or patches, named '%s…') are "
                    "predictions, not annotations, and are left out; rename one you corrected to count it",
                    path, n_ours, OWN_OBJECT_PREFIX)
    _check_area(path, n_shapes, n_area)
    return regions


def read_annotations(path: str | Path, offset: tuple[float, float] = (0.0, 0.0)) -> list[Region]:
    """Dispatch on the suffix: ``.xml`` (ASAP) or ``.geojson``/``.json`` (QuPath)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file does not exist")
    if path.suffix.lower() == ".xml":
        return read_asap_xml(path)
    if path.suffix.lower() in (".geojson", ".json"):
        return read_geojson(path, offset)
    raise ValueError(f"{path}: unknown annotation format (use ASAP .xml or QuPath .geojson)")


def _annotation_names(sid: str) -> list[str]:
    """The file names an annotation of slide ``sid`` may have, in order of preference."""
    from milkit.slide.reader import SLIDE_EXTENSIONS

    # QuPath names its exports after the image, extension included (``<sid>.svs.geojson``)
    return [f"{stem}{suf}" for stem in (sid, *(sid + ext for ext in SLIDE_EXTENSIONS)) for suf in ANNOTATION_SUFFIXES]


def _annotation_files(folder: Path) -> dict[str, Path]:
    """The folder's annotation files by lower-cased name (``.XML`` and ``.GeoJSON`` count)."""
    return {p.name.lower(): p for p in sorted(folder.iterdir())
            if p.suffix.lower() in ANNOTATION_SUFFIXES and p.is_file() and not p.name.startswith(".")}


def find_annotation(folder: str | Path, sid: str) -> Path | None:
    """``folder/<sid>.xml|.geojson|.json`` (or ``<sid>.svs.geojson`` etc.; the extension in any case), or None:
    a negative slide without annotation is all negative (Camelyon16 annotates every tumour slide); a positive
    one was not annotated (:func:`not_annotated`)."""
    names = _annotation_names(sid)
    for name in names:
        p = Path(folder) / name
        if p.is_file():
            return p
    by_lower = _annotation_files(Path(folder))
    return next((by_lower[n.lower()] for n in names if n.lower() in by_lower), None)


def note_unmatched_annotations(folder: str | Path, slide_ids: Sequence[str]) -> list[Path]:
    """A ``milkit:`` notice naming the annotation files of ``folder`` that belong to none of ``slide_ids``
    (a misspelt or renamed file is otherwise silently unused), with the closest slide id; returns them."""
    import difflib

    from milkit.slide.reader import cell_slide_id

    files = _annotation_files(Path(folder))
    used = {n.lower() for sid in slide_ids for n in _annotation_names(sid)}
    unmatched = [p for name, p in files.items() if name not in used]
    if unmatched:
        def hint(p: Path) -> str:
            close = difflib.get_close_matches(cell_slide_id(p.name[: -len(p.suffix)]), list(slide_ids), n=1, cutoff=0.6)
            return f"{p.name} (slide {close[0]!r}?)" if close else p.name

        shown = ", ".join(hint(p) for p in unmatched[:5]) + (" …" if len(unmatched) > 5 else "")
        log.info("%d annotation file(s) in %s match no slide here and are not used: %s", len(unmatched), folder, shown)
    return unmatched


def not_annotated(annotation: Path | None, slide_label: int | None) -> bool:
    """A slide labelled positive with no annotation file: its patch labels are unknown, not
    negative. Users annotate a few of their positive slides; scoring the others' tumour patches
    as negatives would count every true detection on them as a false positive."""
    return annotation is None and slide_label == 1


def rasterize(regions: list[Region], size: tuple[int, int], downsample: float) -> np.ndarray:
    """Boolean tumour mask of shape (h, w) = ``size[::-1]`` at ``downsample`` of level 0:
    tumour exteriors painted, their holes and every non-tumour region subtracted."""
    w, h = int(size[0]), int(size[1])
    img = Image.new("L", (max(w, 1), max(h, 1)), 0)
    draw = ImageDraw.Draw(img)

    def poly(a: np.ndarray) -> list[tuple[float, float]]:
        return [(float(x) / downsample, float(y) / downsample) for x, y in a]

    for r in regions:
        if r.positive:
            draw.polygon(poly(r.exterior), fill=1)
    for r in regions:
        if r.positive:
            for hole in r.holes:
                draw.polygon(poly(hole), fill=0)
    for r in regions:
        if not r.positive and not r.reviewed:
            draw.polygon(poly(r.exterior), fill=0)
    return np.asarray(img, dtype=np.uint8)[:h, :w] > 0


def level_mask(regions: list[Region], level0_size: tuple[int, int], downsample: float) -> np.ndarray:
    """Pixel mask at any level (``downsample`` of level 0) covering the whole slide."""
    w0, h0 = level0_size
    return rasterize(regions, (int(np.ceil(w0 / downsample)), int(np.ceil(h0 / downsample))), downsample)


def tumour_geometry(regions: list[Region]):
    """The tumour area as one shapely geometry (level-0 px): the union of tumour exteriors
    minus their holes, minus every non-tumour region (Camelyon16 ``_2``/``Exclusion``).
    Self-intersecting outlines are repaired with ``shapely.make_valid``."""
    import shapely

    pos = [_polygon(r) for r in regions if r.positive]
    if not pos:
        return shapely.Polygon()
    geom = shapely.union_all(pos)
    neg = [_polygon(r, holes=False) for r in regions if not r.positive and not r.reviewed]
    if neg:
        geom = geom.difference(shapely.union_all(neg))
    return geom


def _polygon(r: Region, holes: bool = True):
    """The region as a valid shapely polygon (``make_valid`` repairs self-intersections)."""
    import shapely
    from shapely.geometry import Polygon

    g = Polygon(r.exterior, [h for h in r.holes if len(h) >= 3] if holes else [])
    return g if g.is_valid else shapely.make_valid(g)


def reviewed_geometry(regions: list[Region]):
    """The union of the reviewed regions (None when there are none: the whole slide was annotated)."""
    import shapely

    rev = [_polygon(r) for r in regions if r.reviewed]
    return shapely.union_all(rev) if rev else None


def patch_tumour_fraction(regions: list[Region], coords: np.ndarray, size_level0: int,
                          level0_size: tuple[int, int] | None = None, px_per_patch: int | None = None) -> np.ndarray:
    """Exact tumour fraction of each level-0 square patch: area(patch ∩ tumour) / area(patch),
    with :func:`tumour_geometry` (no rasterisation; ``level0_size`` and ``px_per_patch`` are
    accepted for callers of the former raster version and ignored)."""
    if not any(r.positive for r in regions):
        return np.zeros(len(np.asarray(coords).reshape(-1, 2)), np.float32)
    return area_fraction(tumour_geometry(regions), coords, size_level0)


def area_fraction(geom, coords: np.ndarray, size_level0: int) -> np.ndarray:
    """area(patch ∩ ``geom``) / area(patch) for each level-0 square patch (exact, shapely)."""
    import shapely

    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    out = np.zeros(len(coords), np.float32)
    if len(coords) == 0 or geom is None or geom.is_empty:
        return out
    s = float(size_level0)
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + s, coords[:, 1] + s)
    shapely.prepare(geom)
    hit = np.flatnonzero(shapely.intersects(geom, boxes))
    if hit.size:
        out[hit] = shapely.area(shapely.intersection(boxes[hit], geom)) / (s * s)
    return np.clip(out, 0.0, 1.0)


def check_regions(regions: list[Region], path: str | Path, level0_size: tuple[int, int] | None = None) -> None:
    """Refuse annotations that would silently turn a positive slide negative (issue #13):
    a file whose shapes are all points/lines (no area), or whose tumour polygons all lie
    outside the ``level0_size`` slide; warn when some tumour area falls outside it."""
    if level0_size is None or not regions:
        return
    import shapely

    geom = tumour_geometry(regions)
    if geom.is_empty:
        return
    w, h = level0_size
    inside = geom.intersection(shapely.box(0, 0, w, h)).area
    if inside <= 0:
        x0, y0, x1, y1 = (int(round(v)) for v in geom.bounds)
        raise ValueError(f"{path}: every tumour polygon lies outside the {w}×{h} slide "
                         f"(bounds x {x0}..{x1}, y {y0}..{y1}; wrong slide or coordinate offset?)")
    if inside < 0.99 * geom.area:
        log.warning("%s: %.0f%% of the tumour area lies outside the %d×%d slide and is ignored",
                    path, 100 * (1 - inside / geom.area), w, h)


def patch_labels(regions: list[Region], coords: np.ndarray, size_level0: int, threshold: float = 0.5,
                 level0_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64, tumour fractions): label 1 iff fraction ≥ ``threshold``; where the file
    holds reviewed regions, a patch that is not tumour and has less than ``threshold`` of its area
    inside them is −1 (unknown: drawn tumour is tumour anywhere, its absence means something only
    where someone looked)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"tumour fraction threshold must be in (0, 1], got {threshold}")
    frac = patch_tumour_fraction(regions, coords, size_level0, level0_size)
    labels = (frac >= threshold - 1e-9).astype(np.int64)
    rev = reviewed_geometry(regions)
    if rev is not None:
        labels[(labels == 0) & (area_fraction(rev, coords, size_level0) < threshold - 1e-9)] = -1
    return labels, frac


def slide_patch_labels(annotation: Path | None, slide_label: int | None, coords: np.ndarray, size_level0: int,
                       threshold: float = 0.5, regions: list[Region] | None = None,
                       level0_size: tuple[int, int] | None = None) -> np.ndarray:
    """One slide's patch labels from its annotation file, with the slide label deciding what an
    absent or partial annotation means:

    - no file: all 0 on a negative slide (Camelyon16 annotates every tumour slide), all −1
      (unknown) on a positive one (:func:`not_annotated`);
    - a file with reviewed regions (milkit's ``Review`` squares of ``review.geojson``, QuPath's
      ``Region*``): drawn tumour is tumour wherever it is; the other patches are negative inside
      the reviewed regions and, outside them, −1 on a positive slide (not looked at), 0 on a
      negative one;
    - otherwise the whole slide is annotated (:func:`patch_labels`).

    ``regions``: the file already read (with its offset)."""
    n = len(np.asarray(coords).reshape(-1, 2))
    if annotation is None:
        return np.full(n, -1 if not_annotated(annotation, slide_label) else 0, np.int64)
    regions = read_annotations(annotation) if regions is None else regions
    labels, _ = patch_labels(regions, coords, size_level0, threshold, level0_size)
    if slide_label == 0:
        labels[labels < 0] = 0  # every patch of a negative slide is negative (the MIL assumption)
    return labels


def patch_feature_collection(coords: np.ndarray, scores: np.ndarray, labels: np.ndarray, size_level0: int,
                             offset: tuple[int, int] = (0, 0), positive_only: bool = True,
                             class_name: str = "Tumor", color: tuple[int, int, int] = (200, 0, 0),
                             score_name: str = "score", slide_id: str = "") -> dict:
    """QuPath-importable FeatureCollection: one ``detection`` square per (positive) patch,
    classified ``class_name`` with ``color``, the score as a measurement. ``offset`` is
    subtracted (QuPath coordinates start at the slide's bounds). IDs: :func:`milkit.slide.qupath.object_id` of
    ``slide_id`` and the patch's level-0 position."""
    from milkit.slide.qupath import object_id

    feats = []
    ox, oy = offset
    for (x, y), s, lab in zip(np.asarray(coords), np.asarray(scores), np.asarray(labels)):
        if positive_only and not lab:
            continue
        x0, y0 = int(x) - ox, int(y) - oy
        x1, y1 = x0 + size_level0, y0 + size_level0
        feats.append({
            "type": "Feature",
            "id": object_id(slide_id, "detection", int(x), int(y)),
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": "detection",
                "name": f"{OWN_OBJECT_PREFIX}patch",
                "classification": {"name": class_name if lab else "Other", "color": list(color) if lab else [0, 120, 255]},
                "measurements": {score_name: float(s)},
                "isLocked": False,
            },
        })
    return {"type": "FeatureCollection", "features": feats}
