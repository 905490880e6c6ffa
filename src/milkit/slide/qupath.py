"""QuPath annotation outlines of a slide's positive region: the union of its positive
patches (shapely ``unary_union``; holes kept), one ``annotation`` feature per connected
region, written next to the per-patch ``detections.geojson``.

QuPath's GeoJSON import (File → Import objects) wants a FeatureCollection whose features
carry ``properties.objectType`` (``annotation`` or ``detection``) and a ``classification``
with ``name`` and ``color`` ([r, g, b]), with geometry in level-0 pixels from the slide's
bounds origin (``openslide.bounds-x/-y``, subtracted here) and valid polygons.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np

from milkit import io
from milkit.slide.annotations import OWN_OBJECT_PREFIX

#: the namespace of :func:`object_id` (fixed: the same key gives the same ID in every run and release)
ID_NAMESPACE = uuid.UUID("4d0c3a52-6c1e-4f0b-9a57-2b8e4f7d9c10")


def object_id(*key: object) -> str:
    """A QuPath object ID for ``key`` (slide, file, object): a name-based UUID (version 5), so the same slide
    gives the same IDs in every run, and two objects differ wherever their keys do. A slide's several files
    can then go into one QuPath image without duplicate IDs (QuPath asks to refresh duplicates on import)."""
    return str(uuid.uuid5(ID_NAMESPACE, "/".join(map(str, key))))


def positive_region(coords: np.ndarray, labels: np.ndarray, size_level0: int):
    """The union of the positive patch squares (a shapely (Multi)Polygon, possibly empty)."""
    import shapely

    c = np.asarray(coords, np.float64).reshape(-1, 2)[np.asarray(labels).astype(bool)]
    if not len(c):
        return shapely.Polygon()
    s = float(size_level0)
    return shapely.unary_union(shapely.box(c[:, 0], c[:, 1], c[:, 0] + s, c[:, 1] + s))


def outline_collection(coords: np.ndarray, labels: np.ndarray, size_level0: int, offset: tuple[int, int] = (0, 0),
                       class_name: str = "Tumor", color: tuple[int, int, int] = (200, 0, 0), slide_id: str = "") -> dict:
    """FeatureCollection of merged ``annotation`` outlines (one per connected positive region), IDs from
    :func:`object_id` of ``slide_id`` and the outline itself (a changed outline is a new object)."""
    import shapely
    from shapely.geometry import mapping
    from shapely.geometry.polygon import orient

    geom = positive_region(coords, labels, size_level0)
    if not geom.is_empty:
        geom = shapely.affinity.translate(geom, -float(offset[0]), -float(offset[1]))
    polys = [] if geom.is_empty else list(getattr(geom, "geoms", [geom]))
    cell = float(size_level0) ** 2
    feats = []
    for p in sorted(polys, key=lambda g: -g.area):
        p = orient(p, 1.0)
        geometry = json.loads(json.dumps(mapping(p)))  # tuples → lists
        feats.append({
            "type": "Feature",
            "id": object_id(slide_id, "outline", json.dumps(geometry)),
            "geometry": geometry,
            "properties": {
                "objectType": "annotation",
                "name": f"{OWN_OBJECT_PREFIX}positive region ({int(round(p.area / cell))} patches)",
                "classification": {"name": class_name, "color": list(color)},
                "isLocked": False,
                "measurements": {"area_level0_px2": float(p.area), "holes": len(p.interiors)},
            },
        })
    return {"type": "FeatureCollection", "features": feats}


def write_outlines(path: str | Path, coords: np.ndarray, labels: np.ndarray, size_level0: int,
                   offset: tuple[int, int] = (0, 0), slide_id: str = "") -> Path:
    """Write :func:`outline_collection` to ``path`` atomically; returns the path."""
    path = Path(path)
    io.write_text(path, json.dumps(outline_collection(coords, labels, size_level0, offset, slide_id=slide_id)))
    return path
