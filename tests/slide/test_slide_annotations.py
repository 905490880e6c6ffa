"""ASAP XML / GeoJSON → polygons → patch labels and pixel masks; heatmap rasters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from milkit.slide.annotations import (
    level_mask,
    patch_feature_collection,
    patch_labels,
    patch_tumour_fraction,
    read_annotations,
    read_asap_xml,
    read_geojson,
)
from milkit.slide.heatmap import normalise_scores, score_raster, to_uint8

ASAP = """<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
<Annotation Name="T" Type="Polygon" PartOfGroup="_0" Color="#F4FA58"><Coordinates>
<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="200" Y="0"/>
<Coordinate Order="3" X="0" Y="200"/><Coordinate Order="2" X="200" Y="200"/>
</Coordinates></Annotation>
<Annotation Name="hole" Type="Polygon" PartOfGroup="_2" Color="#64FE2E"><Coordinates>
<Coordinate Order="0" X="100" Y="100"/><Coordinate Order="1" X="200" Y="100"/>
<Coordinate Order="2" X="200" Y="200"/><Coordinate Order="3" X="100" Y="200"/>
</Coordinates></Annotation>
<Annotation Name="dot" Type="Dot" PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="5" Y="5"/></Coordinates></Annotation>
</Annotations><AnnotationGroups><Group Name="_0" PartOfGroup="None"/></AnnotationGroups></ASAP_Annotations>
"""


def _square(x0, y0, s):
    return [[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s], [x0, y0]]


def test_asap_groups_and_exclusion_holes(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(ASAP)
    regions = read_asap_xml(p)
    assert [r.positive for r in regions] == [True, False]  # the dot carries no area
    # coordinates are sorted by Order: a proper square, not a bow tie
    np.testing.assert_array_equal(regions[0].exterior, [[0, 0], [200, 0], [200, 200], [0, 200]])
    coords = np.array([[0, 0], [100, 0], [100, 100], [0, 100], [300, 300]])
    labels, frac = patch_labels(regions, coords, 100, 0.5, level0_size=(400, 400))
    np.testing.assert_allclose(frac, [1, 1, 0, 1, 0], atol=0.08)
    assert labels.tolist() == [1, 1, 0, 1, 0]
    m = level_mask(regions, (400, 400), 4.0)
    assert m.shape == (100, 100)
    assert m[10, 10] and not m[40, 40] and not m[80, 80]
    assert abs(m.sum() - 3 * 25 * 25) <= 3 * 26  # three of the four 100-px quarters


def test_threshold_is_inclusive_and_configurable(tmp_path):
    p = tmp_path / "half.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(0, 0, 64)]},
         "properties": {"classification": {"name": "Tumor", "color": [200, 0, 0]}}}]}))
    regions = read_annotations(p)
    coords = np.array([[32, 0], [48, 0]])  # half and a quarter of a 64-px patch covered
    frac = patch_tumour_fraction(regions, coords, 64, (256, 256), px_per_patch=64)
    np.testing.assert_allclose(frac, [0.5, 0.25], atol=0.02)
    assert patch_labels(regions, coords, 64, 0.5, (256, 256))[0].tolist() == [1, 0]
    assert patch_labels(regions, coords, 64, 0.25, (256, 256))[0].tolist() == [1, 1]
    with pytest.raises(ValueError, match="threshold"):
        patch_labels(regions, coords, 64, 0.0)


def test_geojson_multipolygon_holes_classes_and_offset(tmp_path):
    p = tmp_path / "q.geojson"
    p.write_text(json.dumps([
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
            [_square(0, 0, 100), _square(25, 25, 50)], [_square(200, 0, 50)]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(0, 200, 50)]},
         "properties": {"classification": {"name": "Exclusion"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}},
    ]))
    regions = read_geojson(p, offset=(10, 0))
    assert [r.positive for r in regions] == [True, True, False]
    assert len(regions[0].holes) == 1 and regions[0].exterior[0].tolist() == [10.0, 0.0]
    m = level_mask(regions, (300, 300), 1.0)
    assert m[10, 20] and not m[50, 60]  # inside the ring, then inside its hole
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.geojson"):
        read_annotations(bad)
    with pytest.raises(FileNotFoundError, match="missing.xml"):
        read_annotations(tmp_path / "missing.xml")


def test_detections_round_trip_through_geojson(tmp_path):
    coords = np.array([[0, 0], [64, 0], [128, 64]])
    fc = patch_feature_collection(coords, np.array([0.9, 0.1, 0.7]), np.array([1, 0, 1]), 64, offset=(8, 4))
    assert len(fc["features"]) == 2
    f0 = fc["features"][0]
    assert f0["properties"]["objectType"] == "detection"
    assert f0["properties"]["classification"]["name"] == "Tumor"
    assert f0["properties"]["measurements"]["score"] == pytest.approx(0.9)
    p = tmp_path / "d.geojson"
    p.write_text(json.dumps(fc))
    # milkit's own detections are predictions: read back as annotations they are refused
    with pytest.raises(ValueError, match="holds only objects milkit wrote"):
        read_geojson(p)
    back = read_geojson(p, offset=(8, 4), own_objects=True)  # QuPath coords + bounds offset = OpenSlide level 0
    np.testing.assert_array_equal(back[1].exterior[0], [128, 64])


def test_milkit_outlines_exported_back_from_qupath_are_not_truth(tmp_path, caplog):
    """A user imports outlines.geojson, draws the tumour, exports every annotation: milkit's predicted outline
    must not count as tumour truth (it would score the predictions against themselves)."""
    import logging

    from milkit.slide.qupath import outline_collection

    ours = outline_collection(np.array([[0, 0], [64, 0]]), np.array([1, 1]), 64)["features"]
    user = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[500, 500], [600, 500], [600, 600],
                                                                                [500, 600], [500, 500]]]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}
    p = tmp_path / "s.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": ours + [user]}))
    with caplog.at_level(logging.WARNING, logger="milkit"):
        regions = read_geojson(p)
    assert len(regions) == 1 and regions[0].exterior.min(axis=0).tolist() == [500, 500]
    assert "1 object(s) milkit wrote" in caplog.text


def test_score_raster_and_uint8_encoding():
    coords = np.array([[0, 0], [64, 0], [32, 0]])  # overlapping third patch, stride 32
    r, cell = score_raster(coords, np.array([0.0, 1.0, 0.5]), 64, 32, (160, 64))
    assert cell == 32 and r.shape == (2, 5)
    # cells: [0,32) only p0, [32,64) p0+p2, [64,96) p1+p2, [96,128) p1, [128,160) none
    np.testing.assert_allclose(r[0, :4], [0.0, 0.25, 0.75, 1.0])
    assert np.isnan(r[0, 4])
    assert to_uint8(r)[0].tolist() == [1, 65, 191, 255, 0]  # 1 + rint(254 p), half to even
    n, how = normalise_scores(np.array([-3.0, 0.0, 3.0]), "score")
    assert n.min() == 0 and n.max() == 1 and how["normalisation"].startswith("percentile")
    p, _ = normalise_scores(np.array([0.2, 0.7]), "probability")
    np.testing.assert_allclose(p, [0.2, 0.7])


def _fc(*geoms, name="Tumor"):
    return json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": g, "properties": {"classification": {"name": name}}} for g in geoms]})


def test_tumour_fraction_is_the_exact_intersection_area(tmp_path):
    p = tmp_path / "tri.geojson"
    p.write_text(_fc({"type": "Polygon", "coordinates": [[[0, 0], [64, 0], [0, 64], [0, 0]]]}))
    frac = patch_tumour_fraction(read_annotations(p), np.array([[0, 0], [32, 0], [64, 64]]), 64)
    # half the patch; ∫_32^64 (64 − x) dx / 64² = 512 / 4096; nothing
    np.testing.assert_allclose(frac, [0.5, 0.125, 0.0], atol=1e-6)
    # a strip 30 px wide covers 30/64 < 0.5 of a patch: the former 1/4-resolution raster with
    # filled outlines counted 8 of 16 mask columns (0.5) and called the patch tumour
    p.write_text(_fc({"type": "Polygon", "coordinates": [_square(0, 0, 64)[:1] + [[30, 0], [30, 64], [0, 64], [0, 0]]]}))
    labels, frac = patch_labels(read_annotations(p), np.array([[0, 0]]), 64, 0.5, (256, 256))
    assert frac[0] == pytest.approx(30 / 64, abs=1e-6) and labels.tolist() == [0]


def test_exclusion_groups_and_holes_are_not_tumour_exactly(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(ASAP)
    coords = np.array([[0, 0], [100, 0], [100, 100], [0, 100], [50, 50]])
    frac = patch_tumour_fraction(read_asap_xml(p), coords, 100)
    # the _2 square [100, 200)² is cut out of the tumour square [0, 200)²; the centred patch
    # [50, 150)² loses its lower-right quarter
    np.testing.assert_allclose(frac, [1, 1, 0, 1, 0.75], atol=1e-6)
    q = tmp_path / "ring.geojson"
    q.write_text(_fc({"type": "Polygon", "coordinates": [_square(0, 0, 128), _square(32, 32, 64)]}))
    frac = patch_tumour_fraction(read_annotations(q), np.array([[32, 32], [0, 0]]), 64)
    np.testing.assert_allclose(frac, [0.0, 0.75], atol=1e-6)  # the hole, and a corner patch a quarter in it


def test_points_lines_only_and_outside_polygons_are_named_errors(tmp_path, caplog):
    from milkit.slide.annotations import check_regions

    pts = tmp_path / "points.geojson"
    pts.write_text(_fc({"type": "Point", "coordinates": [5, 5]}, {"type": "LineString", "coordinates": [[0, 0], [9, 9]]}))
    with pytest.raises(ValueError, match=r"points\.geojson.*points or lines"):
        read_annotations(pts)
    dots = tmp_path / "dots.xml"
    dots.write_text(ASAP.split('<Annotation Name="T"')[0] + ASAP[ASAP.index('<Annotation Name="dot"'):])
    with pytest.raises(ValueError, match=r"dots\.xml.*points or lines"):
        read_annotations(dots)
    far = tmp_path / "far.geojson"
    far.write_text(_fc({"type": "Polygon", "coordinates": [_square(5000, 5000, 100)]}))
    regions = read_annotations(far)
    with pytest.raises(ValueError, match=r"far\.geojson.*outside the 1024×1024 slide"):
        check_regions(regions, far, (1024, 1024))
    half = tmp_path / "half.geojson"
    half.write_text(_fc({"type": "Polygon", "coordinates": [_square(1000, 0, 48)]}))
    with caplog.at_level("WARNING"):
        check_regions(read_annotations(half), half, (1024, 1024))
    assert "half.geojson" in caplog.text and "50% of the tumour area lies outside" in caplog.text


def test_find_annotation_takes_qupath_export_names_and_says_who_is_not_annotated(tmp_path):
    from milkit.slide.annotations import find_annotation, not_annotated

    (tmp_path / "a.xml").write_text("<ASAP_Annotations/>")
    (tmp_path / "b.svs.geojson").write_text("{}")  # QuPath: the image name, extension included
    (tmp_path / "c.svs.geojson").write_text("{}")
    (tmp_path / "c.geojson").write_text("{}")
    assert find_annotation(tmp_path, "a") == tmp_path / "a.xml"
    assert find_annotation(tmp_path, "b") == tmp_path / "b.svs.geojson"
    assert find_annotation(tmp_path, "c") == tmp_path / "c.geojson"  # the exact name first
    assert find_annotation(tmp_path, "d") is None
    assert not_annotated(None, 1) and not not_annotated(None, 0) and not not_annotated(None, None)
    assert not not_annotated(tmp_path / "a.xml", 1)


def test_annotation_files_that_match_no_slide_are_named(tmp_path, caplog):
    """An upper-case extension (``.XML``) is found; a file that belongs to no slide (a typo, another cohort's)
    is named with the closest slide id. Before, both were silently unused, and the slide read as not annotated."""
    import logging

    from milkit.slide.annotations import find_annotation, note_unmatched_annotations

    tcga = "TCGA-3C-AALI-01Z-00-DX1.F6E9A5DF"
    for name in ("tumor_001.XML", "tumor_02.xml", f"{tcga}.svs.geojson", "other.geojson", ".hidden.xml", "notes.txt"):
        (tmp_path / name).write_text("{}")
    assert find_annotation(tmp_path, "tumor_001") == tmp_path / "tumor_001.XML"
    with caplog.at_level(logging.INFO, logger="milkit.slide.annotations"):
        unused = note_unmatched_annotations(tmp_path, ["tumor_001", "tumor_002", tcga])
    assert [p.name for p in unused] == ["other.geojson", "tumor_02.xml"]
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "2 annotation file(s)" in msg and "tumor_02.xml (slide 'tumor_002'?)" in msg and "other.geojson" in msg
    (tmp_path / "empty").mkdir()
    assert note_unmatched_annotations(tmp_path / "empty", ["tumor_001"]) == []


@pytest.mark.parametrize("cell,ds,shape", [(512, 1, (1300, 1100)), (64, 1, (700, 650)), (64, 4, (200, 190)),
                                           (100, 8, (90, 70)), (256, 2, (512, 512))])
def test_probability_tiles_equal_the_drawn_level(cell, ds, shape):
    """The constant-tile shortcut of heatmap._tiles gives the tiles a plain nearest-cell drawing gives."""
    import imagecodecs

    from milkit.slide.heatmap import _tiles

    rng = np.random.default_rng(cell + ds)
    h, w = shape
    r8 = np.zeros((-(-h * ds // cell), -(-w * ds // cell)), np.uint8)
    r8[1:-1, 1:] = rng.integers(1, 4, size=(r8.shape[0] - 2, r8.shape[1] - 1))  # few values: many constant tiles
    r8[0, 0] = 200
    tile = 64
    yy = np.minimum(np.arange(h) * ds // cell, r8.shape[0] - 1)
    xx = np.minimum(np.arange(w) * ds // cell, r8.shape[1] - 1)
    level = np.zeros((-(-h // tile) * tile, -(-w // tile) * tile), np.uint8)
    level[:h, :w] = r8[yy][:, xx]  # beyond the level: 0
    got = [imagecodecs.zlib_decode(b) for b in _tiles(r8, cell, (h, w), ds, tile)]
    want = [level[y:y + tile, x:x + tile].tobytes() for y in range(0, h, tile) for x in range(0, w, tile)]
    assert len(got) == len(want) and all(g == t for g, t in zip(got, want))


def test_asap_outlines_round_trip_with_holes_and_no_bounds_offset(tmp_path):
    """outlines.xml: the positive region as ASAP XML (full-slide level-0 px, holes as Exclusion
    polygons); read back through the Camelyon16 reader it covers the same area."""
    from xml.etree import ElementTree as ET

    from milkit.slide.annotations import read_asap_xml, tumour_geometry, write_asap_region
    from milkit.slide.qupath import positive_region

    g = np.stack(np.meshgrid(np.arange(5), np.arange(3)), -1).reshape(-1, 2)
    labels = np.ones(len(g), int)
    labels[(g[:, 0] == 1) & (g[:, 1] == 1)] = 0  # a hole in the first region
    labels[g[:, 0] == 3] = 0  # column 3 negative: column 4 is a second region
    coords = g * 256 + np.array([1000, 2000])
    geom = positive_region(coords, labels, 256)
    path = write_asap_region(tmp_path / "outlines.xml", geom)
    root = ET.parse(path).getroot()
    groups = [a.get("PartOfGroup") for a in root.iter("Annotation")]
    assert sorted(groups) == ["Exclusion", "Tumor", "Tumor"]
    back = tumour_geometry(read_asap_xml(path))
    assert back.area == pytest.approx(geom.area) == 11 * 256 ** 2  # 15 patches, the hole and column 3 negative
    assert back.symmetric_difference(geom).area == pytest.approx(0)
    xs = [float(c.get("X")) for c in root.iter("Coordinate")]
    assert min(xs) == 1000  # level-0 px of the full slide: no bounds offset (QuPath's GeoJSON subtracts it)


def test_review_regions_close_the_loop_annotated_only_where_reviewed(tmp_path):
    """A pathologist imports review.geojson into QuPath, draws the tumour inside the Review regions,
    exports everything: the Review squares are not tumour; patches outside them are unknown (−1) on
    a positive slide and negative on a negative one; a file without Review regions covers the slide."""
    from milkit.slide.annotations import read_geojson, slide_patch_labels, tumour_geometry
    from milkit.trust.review import REVIEW_CLASS, review_feature_collection

    coords = np.stack(np.meshgrid(np.arange(6), np.arange(2)), -1).reshape(-1, 2) * 100  # 6 × 2 patches of 100 px
    scores = np.zeros(len(coords))
    scores[(coords[:, 0] < 200)] = 1.0  # the 4 patches of columns 0-1 are the most uncertain
    fc = review_feature_collection(coords, 100, 100, scores, "seed spread", (0, 0), fraction=4 / 12)
    assert [f["properties"]["classification"]["name"] for f in fc["features"]] == [REVIEW_CLASS[0]]
    fc["features"].append({"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
                           "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 200], [0, 200],
                                                                            [0, 0]]]}})  # column 0 is tumour
    fc["features"].append({"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
                           "geometry": {"type": "Polygon", "coordinates": [[[500, 0], [600, 0], [600, 100], [500, 100],
                                                                            [500, 0]]]}})  # one more, outside
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps(fc))
    regions = read_geojson(path)
    assert tumour_geometry(regions).area == pytest.approx(100 * 300)  # the Review square is not tumour
    pos = slide_patch_labels(path, 1, coords, 100)
    col, row = coords[:, 0] // 100, coords[:, 1] // 100
    assert pos[col == 0].tolist() == [1, 1] and pos[col == 1].tolist() == [0, 0]
    assert pos[(col == 5) & (row == 0)].tolist() == [1]  # drawn tumour counts outside the reviewed region too
    assert (pos[(col >= 2) & ~((col == 5) & (row == 0))] == -1).all()
    neg = slide_patch_labels(path, 0, coords, 100)
    assert neg[col == 0].tolist() == [1, 1] and (neg[(col >= 1) & (col < 5)] == 0).all()  # the rest is negative
    # no Review region: the whole slide is annotated; no file: negative → 0, positive → unknown
    fc["features"] = fc["features"][1:]
    path.write_text(json.dumps(fc))
    assert (slide_patch_labels(path, 1, coords, 100) == ((col == 0) | ((col == 5) & (row == 0)))).all()
    assert (slide_patch_labels(None, 0, coords, 100) == 0).all() and (slide_patch_labels(None, 1, coords, 100) == -1).all()


def test_slide_result_metrics_use_only_the_known_patches():
    from milkit.slide.outputs import SlideScores
    from milkit.view.slide_report import SlideResult

    coords = np.stack([np.arange(6) * 64, np.zeros(6, int)], 1)
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.95, 0.05])
    s = SlideScores("a", coords, scores, (scores >= 0.5).astype(int), 0.5, "probability", 64, 64, (512, 64), 0.5, 0.9)
    y = np.array([1, 1, 0, 0, -1, -1])  # the last two outside the reviewed region
    m = SlideResult("a", "test", 1, s, y, None, None).metrics()
    assert m["annotated"] and m["n_annotated_patches"] == 4 and m["n_tumour_patches"] == 2
    assert m["instance_auroc"] == 1.0 and m["instance_f1"] == 1.0  # patch 4 (0.95, unknown) is not a false positive


def test_per_slide_f1_is_undefined_on_a_slide_without_tumour_and_without_calls():
    from milkit.slide.outputs import SlideScores
    from milkit.view.slide_report import SlideResult

    coords = np.stack([np.arange(4) * 64, np.zeros(4, int)], 1)
    quiet = np.array([0.1, 0.2, 0.3, 0.2])
    s = SlideScores("n", coords, quiet, (quiet >= 0.5).astype(int), 0.5, "probability", 64, 64, (256, 64), 0.5, 0.2)
    assert SlideResult("n", "test", 0, s, np.zeros(4, int), None, None).metrics()["instance_f1"] is None  # 0/0
    loud = np.array([0.9, 0.2, 0.3, 0.2])  # one false positive: F1 is 0, and says so
    s = SlideScores("n", coords, loud, (loud >= 0.5).astype(int), 0.5, "probability", 64, 64, (256, 64), 0.5, 0.9)
    assert SlideResult("n", "test", 0, s, np.zeros(4, int), None, None).metrics()["instance_f1"] == 0.0


def test_qupath_default_non_tumour_classes_are_not_tumour(tmp_path):
    """A pathologist who draws Tumor and also QuPath's Stroma / Necrosis / Immune cells (its default classes) or
    the tissue outline gets only the Tumor polygons as tumour; the others are cut out of it."""
    def square(x0, cls):
        ring = [[x0, 0], [x0 + 100, 0], [x0 + 100, 100], [x0, 100], [x0, 0]]
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": cls}}}

    classes = ["Tumor", "Stroma", "Necrosis", "Immune cells", "Tissue", "Carcinoma", "Stroma: Negative",
               "Tumor: Positive", {"names": ["Stroma", "Positive"]}, {"names": ["Tumor"]}]
    feats = [square(200 * i, c) for i, c in enumerate(classes)]
    for f, c in zip(feats, classes):
        if isinstance(c, dict):  # QuPath 0.4's derived-class form
            f["properties"]["classification"] = c
    p = tmp_path / "s.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    regions = read_geojson(p)
    assert [r.positive for r in regions] == [True, False, False, False, False, True, False, True, False, True]
