"""QuPath GeoJSON against QuPath's import rules; FROC by hand; evaluate/view CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from milkit.cli import main
from milkit.slide.annotations import read_geojson, tumour_geometry
from milkit.slide.froc import detections, froc, lesion_hits
from milkit.slide.qupath import outline_collection


def assert_qupath_importable(fc: dict, level0_size: tuple[int, int] | None = None) -> None:
    """QuPath's GeoJSON import (File → Import objects): a FeatureCollection of Features with
    objectType annotation/detection, a classification with name and [r, g, b] colour, a UUID
    id where one is given, numeric measurements, and valid (non-self-intersecting) closed
    polygons in level-0 pixels (inside the slide when its size is given)."""
    import math
    import uuid

    assert fc["type"] == "FeatureCollection" and isinstance(fc["features"], list)
    for f in fc["features"]:
        assert f["type"] == "Feature"
        if "id" in f:
            assert str(uuid.UUID(f["id"])) == f["id"]
        p = f["properties"]
        assert p["objectType"] in ("annotation", "detection")
        cls = p["classification"]
        assert isinstance(cls["name"], str) and cls["name"]
        assert len(cls["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in cls["color"])
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in p.get("measurements", {}).values())
        g = shape(f["geometry"])
        assert g.geom_type in ("Polygon", "MultiPolygon") and g.is_valid and not g.is_empty
        rings = [r for poly in getattr(g, "geoms", [g]) for r in (poly.exterior, *poly.interiors)]
        assert all(r.is_closed for r in rings)
        if level0_size is not None:
            x0, y0, x1, y1 = g.bounds
            assert x0 >= 0 and y0 >= 0 and x1 <= level0_size[0] and y1 <= level0_size[1]


def test_merged_outlines_keep_holes_and_follow_import_rules():
    s = 64
    ring = [(x, y) for x in range(3) for y in range(3) if (x, y) != (1, 1)]  # 3×3 block minus its centre
    coords = np.array([(100 + x * s, 200 + y * s) for x, y in ring] + [(1000, 1000), (100 + s, 200 + s)])
    labels = np.array([1] * 8 + [1, 0])  # the centre patch is negative: a hole
    fc = outline_collection(coords, labels, s, offset=(100, 0))
    assert_qupath_importable(fc)
    assert [f["properties"]["objectType"] for f in fc["features"]] == ["annotation", "annotation"]
    big, lone = (shape(f["geometry"]) for f in fc["features"])
    assert big.area == 8 * s * s and len(big.interiors) == 1 and shapely.Polygon(big.interiors[0]).area == s * s
    assert big.bounds == (0, 200, 3 * s, 200 + 3 * s)  # level 0 minus the bounds offset
    assert lone.area == s * s and lone.bounds == (900, 1000, 900 + s, 1000 + s)
    assert fc["features"][0]["properties"]["measurements"]["holes"] == 1


def test_written_outlines_and_detections_import_and_round_trip(view_cohort, tmp_path):
    from milkit.slide.outputs import read_instances_h5

    d = view_cohort.labels_dir / "s00"
    s = read_instances_h5(d / "instances.h5")
    for name in ("outlines.geojson", "detections.geojson"):
        assert_qupath_importable(json.loads((d / name).read_text()), s.level0_size)
    review = json.loads((view_cohort.labels_dir / "s02" / "review.geojson").read_text())  # s00's is the fixture's
    assert review["features"] and assert_qupath_importable(review, s.level0_size) is None
    back = tumour_geometry(read_geojson(d / "outlines.geojson", own_objects=True))
    assert back.area == pytest.approx(int(s.labels.sum()) * s.size_level0 ** 2)
    empty = json.loads((view_cohort.labels_dir / "s01" / "outlines.geojson").read_text())
    assert empty == {"type": "FeatureCollection", "features": []}  # no positive patch, no outline


def test_review_regions_follow_import_rules():
    from milkit.trust.review import review_feature_collection

    # two diagonal neighbours (8-connected: one region, a MultiPolygon touching at a corner) and a far patch
    coords = np.array([[0, 0], [64, 64], [640, 640], [1280, 0]])
    fc = review_feature_collection(coords, 64, 64, np.array([0.9, 0.8, 0.7, 0.0]), "seed spread", offset=(0, 0),
                                   fraction=0.75)
    assert_qupath_importable(fc, (2048, 2048))
    kinds = [shape(f["geometry"]).geom_type for f in fc["features"]]
    assert kinds == ["MultiPolygon", "Polygon"]  # ranked by mean score: the diagonal pair first
    assert [f["properties"]["measurements"]["n_patches"] for f in fc["features"]] == [2, 1]


def test_froc_by_hand():
    # slide A: lesion 0 hit at 0.9, a false positive at 0.8, lesion 1 hit at 0.7; slide B: a false positive at 0.85
    a = (np.array([0.9, 0.8, 0.7]), np.array([0, -1, 1]), None)
    b = (np.array([0.85]), np.array([-1]), None)
    r = froc([a, b], n_lesions=2)
    # FP/slide → sensitivity: 0 → .5, .5 → .5, 1 → 1 (both FPs and the second lesion at 0.7–0.8)
    assert r["sensitivity_at_fp"] == {"0.25": 0.5, "0.5": 0.5, "1.0": 1.0, "2.0": 1.0, "4.0": 1.0, "8.0": 1.0}
    assert r["froc"] == pytest.approx(5 / 6)
    assert froc([a], n_lesions=0)["froc"] is None
    c, k = detections(np.array([[0, 0], [64, 0], [512, 0]]), np.array([0.9, 0.8, 0.7]), 64)
    np.testing.assert_array_equal(c, [[32, 32], [544, 32]])  # the neighbour within two patches is suppressed
    np.testing.assert_array_equal(k, [0.9, 0.7])
    hits = lesion_hits(c, [shapely.box(0, 0, 100, 100)], first_id=5)
    assert hits.tolist() == [5, -1]


def test_cli_labels_without_annotations_and_bad_view_input(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--labels", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--labels" in err and "--annotations" in err and len(err.strip().splitlines()) == 1
    assert main(["view", str(tmp_path / "missing"), "--no-browser"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["view", str(tmp_path), "--no-browser"]) == 2
    assert "instances.h5" in capsys.readouterr().err


def test_view_on_a_taken_port_is_one_line(view_cohort, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["view", str(view_cohort.labels_dir), "--port", str(port), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}" in err and "not free" in err and len(err.strip().splitlines()) == 1
