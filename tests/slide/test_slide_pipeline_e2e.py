"""tile → extract (tiny CNN) → train ABMIL on 6 slides → label → evaluate against the ASAP XML;
the written probability TIFF opens in OpenSlide; GeoJSON detections land on the lesion; CLI."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest

from milkit.cli import main
from milkit.config import build_experiment
from milkit.slide.annotations import patch_tumour_fraction, read_asap_xml, read_geojson
from milkit.slide.heatmap import normalise_scores
from milkit.slide.labeling import evaluate_annotations, label_slides
from milkit.slide.outputs import read_instances_h5
from milkit.workflow import train_run

LABELLED = ["s06", "s07", "s08", "s09"]  # validation and test slides (never trained on)


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "abmil"
    exp = build_experiment({
        "seed": 0,
        "data": {"kind": "feature_bags", "features_dir": str(cohort.tiles_dir), "labels_csv": str(cohort.labels_csv),
                 "annotations_dir": str(cohort.ann_dir)},
        # a linear embedding before the attention (identity on raw ReLU features trained unreliably here);
        # best epoch by AUROC − BCE (Sm App. B): with 2 validation bags, AUROC alone ties at 1.0 early
        "method": {"name": "mil", "encoder": {"name": "linear", "in_dim": 32, "out_dim": 64}, "model": {"name": "abmil"}},
        "trainer": {"max_epochs": 30, "lr": 1e-3, "progress_bar": False, "monitor": "val/auroc_minus_bce"},
    })
    train_run(exp, out)
    slides = [cohort.slides_dir / f"{s}.tif" for s in LABELLED]
    paths = label_slides(out, slides, cohort.tiles_dir, None, None, thumbnail_size=256)
    return out, paths


def test_label_then_evaluate_recovers_the_lesion(run, cohort):
    out, paths = run
    assert {p.name for p in paths} >= {"instances.csv", "instances.h5", "probability.tif", "detections.geojson", "outlines.xml",
                                       "heatmap.png", "slides.csv"}
    res = evaluate_annotations(out, cohort.ann_dir)
    # scored per split, as the run split them (s06, s07 val; s08, s09 test), never pooled
    assert set(res["splits"]) == {"val", "test"} and res["splits"]["test"]["n_slides"] == 2
    test = res["splits"]["test"]
    assert test["n_tumour_instances"] > 5 and res["per_slide"]["s08"]["split"] == "test"
    # chance is 0.5; the lesion's texture makes it separable, the margin is wide
    assert test["instance_auroc"] > 0.75
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["annotations"]["splits"]["test"] == test
    trust = read_instances_h5(out / "labels" / "s08" / "instances.h5").meta["trust"]  # the verdict travels along
    assert trust == {k: metrics["mil"]["trust"][k] for k in ("verdict", "rule")}
    # the two positive slides carry the annotations
    assert res["per_slide"]["s06"]["annotation"].endswith("s06.xml") and res["per_slide"]["s07"]["annotation"] is None
    page = (out / "report_annotations.html").read_text()  # per-split table, per-slide table, thumbnails
    assert "Metrics per split" in page and "?slide=s08" in page and page.count("data:image/png;base64,") == 8


def test_probability_tiff_opens_in_openslide_aligned_with_level0(run):
    out, _ = run
    s = read_instances_h5(out / "labels" / "s08" / "instances.h5")
    osr = openslide.OpenSlide(str(out / "labels" / "s08" / "probability.tif"))
    assert osr.dimensions == (1024, 1024) == s.level0_size
    assert osr.level_count >= 3 and float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    norm = s.probability  # the calibrated probability on the fixed scale [0, 1] (issue 11 §4)
    assert norm is not None and json.loads(osr.properties["tiff.ImageDescription"])["scale"] == [0.0, 1.0]
    for k in (0, len(s.coords) // 2, len(s.coords) - 1):
        x, y = (int(v) for v in s.coords[k])
        px = np.asarray(osr.read_region((x + 5, y + 7), 0, (1, 1)))[0, 0, 0]
        assert px == 1 + int(np.rint(254 * norm[k]))
    glass = np.asarray(osr.read_region((0, 0), 0, (8, 8)))[..., 0]
    assert (glass == 0).all()  # no patch on the glass corner


def test_geojson_detections_land_on_the_lesion(run, cohort):
    out, _ = run
    lesion = read_asap_xml(cohort.ann_dir / "s08.xml")
    dets = read_geojson(out / "labels" / "s08" / "detections.geojson", own_objects=True)
    assert len(dets) > 0 and all(d.positive for d in dets)
    fc = json.loads((out / "labels" / "s08" / "detections.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and "score" in fc["features"][0]["properties"]["measurements"]
    corners = np.array([d.exterior.min(axis=0) for d in dets]).astype(np.int64)
    hit = patch_tumour_fraction(lesion, corners, 64, (1024, 1024))
    with h5py.File(cohort.tiles_dir / "s08.h5") as f:
        base = patch_tumour_fraction(lesion, f["coords"][()], 64, (1024, 1024))
    # detections overlap the lesion far more than a random tissue patch does
    assert hit.mean() > 3 * base.mean()


def test_qupath_object_ids_are_unique_across_a_slides_files_and_slides_and_stable(run, cohort, tmp_path):
    """QuPath asks to refresh duplicate object IDs on import: every object of every slide's GeoJSON files has its
    own ID, and labelling again gives the same IDs (they are name-based, not random)."""
    out, _ = run
    files = ("detections.geojson", "outlines.geojson", "review.geojson")

    def ids(labels, slides):
        return {(s, f): [ft["id"] for ft in json.loads((labels / s / f).read_text())["features"]]
                for s in slides for f in files}

    first = ids(out / "labels", LABELLED)
    every = [i for v in first.values() for i in v]
    assert all(first[("s08", f)] for f in files)  # a positive slide has objects in every file
    assert len(every) > 3 * len(LABELLED) and len(set(every)) == len(every)
    label_slides(out, [cohort.slides_dir / "s08.tif"], cohort.tiles_dir, tmp_path / "again", None, thumbnail_size=64)
    assert ids(tmp_path / "again", ["s08"]) == {k: v for k, v in first.items() if k[0] == "s08"}


def test_cli_tile_extract_and_bad_input(cohort, tmp_path):
    src = cohort.slides_dir / "s01.tif"
    tiles = tmp_path / "tiles"
    rc = main(["tile", str(src), "--out", str(tiles), "--patch-size", "32", "--no-progress"])
    assert rc == 0 and (tiles / "s01.h5").is_file()
    rc = main(["extract", str(tiles), "--encoder", "tiny_cnn", "--weights", "none", "--workers", "0", "--no-progress"])
    assert rc == 0
    with h5py.File(tiles / "s01.h5") as f:
        assert f["features"].shape == (f["coords"].shape[0], 32)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(src.read_bytes()[:2000])
    assert main(["tile", str(broken), "--out", str(tmp_path / "t2"), "--no-progress"]) == 2
    assert not list((tmp_path / "t2").glob("*.h5")) if (tmp_path / "t2").exists() else True
    assert main(["extract", str(tiles), "--encoder", "nope", "--no-progress"]) == 2


def test_cli_label_and_evaluate_slides(run, cohort, tmp_path, capsys):
    out, _ = run
    labels = tmp_path / "labels"
    rc = main(["label", str(out), "--slides", str(cohort.slides_dir / "s08.tif"), "--features", str(cohort.tiles_dir),
               "--out", str(labels)])
    assert rc == 0 and (labels / "s08" / "probability.tif").is_file()
    said = capsys.readouterr().out.splitlines()  # a summary, not seven paths a slide
    assert said[0].startswith(f"labelled 1 slide(s) → {labels}/<slide>/: detections.geojson, heatmap.png, instances.csv")
    assert said[1] == f"slide table: {labels / 'slides.csv'}" and len(said) == 2
    assert main(["evaluate", str(out), "--annotations", str(cohort.ann_dir), "--labels", str(labels)]) == 0
    m = json.loads((out / "metrics.json").read_text())["annotations"]
    assert m["splits"]["test"]["n_slides"] == 1 and m["labels_dir"] == str(labels) and set(m["splits"]) == {"test"}
    # features from another slide: refused, naming the file, nothing written
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    with h5py.File(cohort.tiles_dir / "s08.h5") as f, h5py.File(wrong / "s09.h5", "w") as g:
        g.create_dataset("features", data=f["features"][()])
        c = g.create_dataset("coords", data=f["coords"][()])
        for k, v in f["coords"].attrs.items():
            c.attrs[k] = v
        c.attrs["level0_width"] = 2048
    rc = main(["label", str(out), "--slides", str(cohort.slides_dir / "s09.tif"), "--features", str(wrong),
               "--out", str(tmp_path / "l2")])
    assert rc == 2 and not (tmp_path / "l2").exists()
    # with a good slide before it, still nothing written: every slide is checked before the first output
    (wrong / "s08.h5").write_bytes((cohort.tiles_dir / "s08.h5").read_bytes())
    rc = main(["label", str(out), "--slides", str(cohort.slides_dir / "s08.tif"), str(cohort.slides_dir / "s09.tif"),
               "--features", str(wrong), "--out", str(tmp_path / "l3")])
    assert rc == 2 and not (tmp_path / "l3").exists()


def test_label_features_without_slides_gives_the_slides_labels(run, cohort, tmp_path):
    """`milkit label RUN --features DIR` alone (features made elsewhere, slides not here): every h5 is
    labelled with the same scores, labels and level-0 geometry as with its slide; bad input exits 2."""
    out, _ = run
    feats = tmp_path / "feats"
    feats.mkdir()
    for sid in ("s06", "s08"):
        (feats / f"{sid}.h5").write_bytes((cohort.tiles_dir / f"{sid}.h5").read_bytes())
    labels = tmp_path / "labels"
    assert main(["label", str(out), "--features", str(feats), "--out", str(labels)]) == 0
    for sid in ("s06", "s08"):
        alone, with_slide = read_instances_h5(labels / sid / "instances.h5"), read_instances_h5(
            out / "labels" / sid / "instances.h5")
        np.testing.assert_array_equal(alone.coords, with_slide.coords)
        np.testing.assert_allclose(alone.scores, with_slide.scores, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(alone.labels, with_slide.labels)
        assert alone.level0_size == with_slide.level0_size and alone.meta["slide"] == ""
        assert alone.meta["threshold_source"] == "threshold.json (validation:f1)"  # chosen on val patch labels
        for name in ("heatmap.png", "probability.tif", "detections.geojson", "outlines.geojson", "review.geojson"):
            assert (labels / sid / name).is_file(), name
    rows = (labels / "slides.csv").read_text().splitlines()
    assert rows[0] == "slide_id,bag_prob,n_patches,n_positive" and [r.split(",")[0] for r in rows[1:]] == ["s06", "s08"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["label", str(out), "--features", str(empty), "--out", str(tmp_path / "l3")]) == 2
    assert main(["label", str(out), "--features", str(tmp_path / "nope"), "--out", str(tmp_path / "l4")]) == 2
    assert main(["label", str(out), "--features", str(feats), "--data", str(tmp_path / "d.yaml"),
                 "--out", str(tmp_path / "l5")]) == 2
    with h5py.File(feats / "zz_tiles_only.h5", "w") as g:  # tiled, never extracted: refused before any output
        g.create_dataset("coords", data=np.zeros((2, 2), np.int64))
    assert main(["label", str(out), "--features", str(feats), "--out", str(tmp_path / "l6")]) == 2
    assert not any((tmp_path / d).exists() for d in ("l3", "l4", "l5", "l6"))


def test_clam_h5_without_attributes_takes_the_coordinate_step_as_patch_size(run, cohort, tmp_path, capsys):
    """CLAM's h5_files carry features and coords only: whole-slide outputs read the patch size off the
    grid (non-overlapping patches), say so once, and equal the outputs of the file with its attributes."""
    out, _ = run
    clam = tmp_path / "clam" / "h5_files"
    clam.mkdir(parents=True)
    with h5py.File(cohort.tiles_dir / "s08.h5") as f, h5py.File(clam / "s08.h5", "w") as g:
        g.create_dataset("features", data=f["features"][()])
        g.create_dataset("coords", data=f["coords"][()].astype(np.int32))  # CLAM writes int32, no attrs
        ps0 = int(f["coords"].attrs["patch_size_level0"])
    capsys.readouterr()
    assert main(["label", str(out), "--features", str(tmp_path / "clam"), "--out", str(tmp_path / "labels")]) == 0
    err = capsys.readouterr().err
    assert "1 feature file(s) have no patch_size_level0 attribute (CLAM h5_files: s08.h5)" in err
    alone, ref = (read_instances_h5(d / "s08" / "instances.h5") for d in (tmp_path / "labels", out / "labels"))
    assert alone.size_level0 == ref.size_level0 == ps0
    np.testing.assert_array_equal(alone.labels, ref.labels)
    np.testing.assert_allclose(alone.scores, ref.scores, rtol=0, atol=1e-6)


def test_geometry_without_the_slide_comes_from_the_h5_attributes():
    from milkit.slide.labeling import _geometry_from_h5

    coords = np.array([[0, 0], [64, 0], [128, 64]])
    attrs = {"level0_width": 512, "level0_height": 256, "mpp": 0.25, "bounds_x": 8, "bounds_y": 4}
    sid, size, thumb, ds, mpp, bounds = _geometry_from_h5(Path("x/s1_patches.h5"), attrs, coords, 64, 128)
    assert (sid, size, thumb.shape, ds, mpp, bounds) == ("s1", (512, 256), (64, 128, 3), 4.0, 0.25, (8, 4))
    assert int(thumb.min()) == 255  # a white canvas under the heatmap
    sid, size, _, _, mpp, bounds = _geometry_from_h5(Path("s2.h5"), {}, coords, 64, 128)  # CLAM: nothing recorded
    assert (sid, size, mpp, bounds) == ("s2", (192, 128), None, (0, 0))  # the patches' extent


def test_label_refuses_features_of_another_encoder_and_notes_another_patch_size(run, cohort, tmp_path, capsys):
    """The run records what made its training features (metrics.json _run.features); labelling features of
    another encoder is refused before any output (the same D can be another model), another patch size is
    noted once."""
    out, _ = run
    trained = json.loads((out / "metrics.json").read_text())["_run"]["features"]
    with h5py.File(cohort.tiles_dir / "s08.h5") as f:
        assert trained["encoder"] == [f.attrs["encoder"]] and trained["patch_size"] == [int(f["coords"].attrs["patch_size"])]
    for name, edit in (("other_encoder", {"encoder": "uni:hub"}), ("other_size", {"patch_size": 999})):
        d = tmp_path / name
        d.mkdir()
        (d / "s08.h5").write_bytes((cohort.tiles_dir / "s08.h5").read_bytes())
        with h5py.File(d / "s08.h5", "a") as f:
            for k, v in edit.items():
                for node in (f, f["coords"], f["features"]):
                    if k in node.attrs or k == "encoder":
                        node.attrs[k] = v
    capsys.readouterr()
    assert main(["label", str(out), "--features", str(tmp_path / "other_encoder"), "--out", str(tmp_path / "l1")]) == 2
    assert "features of encoder 'uni:hub'" in capsys.readouterr().err and not (tmp_path / "l1").exists()
    assert main(["label", str(out), "--features", str(tmp_path / "other_size"), "--out", str(tmp_path / "l2")]) == 0
    assert "s08.h5: patch_size 999, trained on" in capsys.readouterr().err


def test_a_positive_slide_without_annotation_is_left_out_of_the_patch_metrics(run, cohort, tmp_path, caplog):
    """Users annotate a few positive slides: one without its XML is not annotated (unknown patch
    labels), not all negative, so its tumour detections are not counted as false positives."""
    import logging
    import shutil

    out, _ = run
    full = evaluate_annotations(out, cohort.ann_dir)
    few = tmp_path / "few"
    shutil.copytree(cohort.ann_dir, few)
    (few / "s08.xml").unlink()  # s08: a positive test slide
    with caplog.at_level(logging.INFO, logger="milkit"):
        res = evaluate_annotations(out, few)
    assert "1 positive slide(s) have no annotation" in caplog.text and "s08" in caplog.text
    s08, s09 = res["per_slide"]["s08"], res["per_slide"]["s09"]
    assert s08["annotated"] is False and s08["n_tumour_patches"] is None and s08["instance_auroc"] is None
    test = res["splits"]["test"]
    # only s09's patches are scored; the slide metric still sees both slides
    assert test["n_instances"] == s09["n_patches"] == full["per_slide"]["s09"]["n_patches"]
    assert test["n_tumour_instances"] == 0 and test["n_lesions"] == 0 and test["froc"] is None
    assert test["slide_auroc"] == full["splits"]["test"]["slide_auroc"] and test["n_slides"] == 2
    assert res["not_annotated"] == ["s08"] and res["splits"]["val"] == full["splits"]["val"]
    assert "not annotated" in (out / "report_annotations.html").read_text()


def test_evaluate_warns_when_a_negative_slide_has_a_tumour_annotation(run, cohort, tmp_path, caplog):
    import logging
    import shutil

    out, _ = run
    ann = tmp_path / "ann"
    shutil.copytree(cohort.ann_dir, ann)
    shutil.copy(ann / "s08.xml", ann / "s09.xml")  # s09 is labelled negative
    with caplog.at_level(logging.WARNING, logger="milkit"):
        res = evaluate_annotations(out, ann)
    assert res["per_slide"]["s09"]["n_tumour_patches"] > 0
    assert "s09.xml: slide 's09' is labelled negative in the run's labels" in caplog.text


def test_label_in_batches_keeps_earlier_slides_and_refuses_another_runs_labels(run, cohort, tmp_path):
    """Labelling into an --out that holds labels: this run's are kept and listed (batches); another
    run's are refused (exit 2, nothing written) unless --overwrite, which replaces them."""
    import csv

    out, _ = run
    labels = tmp_path / "labels"
    feats = ["--features", str(cohort.tiles_dir), "--out", str(labels)]
    assert main(["label", str(out), "--slides", str(cohort.slides_dir / "s06.tif"), *feats]) == 0
    assert main(["label", str(out), "--slides", str(cohort.slides_dir / "s08.tif"), *feats]) == 0
    rows = list(csv.DictReader((labels / "slides.csv").open()))
    assert [r["slide_id"] for r in rows] == ["s06", "s08"] and (labels / "s06" / "instances.h5").is_file()
    # make s06's labels another run's
    with h5py.File(labels / "s06" / "instances.h5", "r+") as f:
        meta = json.loads(f.attrs["meta"])
        f.attrs["meta"] = json.dumps({**meta, "run_dir": "/elsewhere/run"})
    before = (labels / "slides.csv").read_bytes(), (labels / "s08" / "instances.h5").stat().st_mtime_ns
    assert main(["label", str(out), "--slides", str(cohort.slides_dir / "s09.tif"), *feats]) == 2
    assert not (labels / "s09").exists()
    assert ((labels / "slides.csv").read_bytes(), (labels / "s08" / "instances.h5").stat().st_mtime_ns) == before
    assert main(["label", str(out), "--slides", str(cohort.slides_dir / "s09.tif"), *feats, "--overwrite"]) == 0
    assert not any((labels / "s06").iterdir())  # the other run's files are gone, nothing else was there
    assert [r["slide_id"] for r in csv.DictReader((labels / "slides.csv").open())] == ["s08", "s09"]
    assert main(["label", str(out), "--overwrite"]) == 2  # split labels: the flag does not apply


def test_review_fraction_sets_how_much_review_geojson_outlines(run, cohort, tmp_path, capsys):
    out, _ = run
    sizes = {}
    for frac in ("0.02", "0.2"):
        labels = tmp_path / frac
        assert main(["label", str(out), "--slides", str(cohort.slides_dir / "s08.tif"), "--features",
                     str(cohort.tiles_dir), "--out", str(labels), "--review-fraction", frac]) == 0
        fc = json.loads((labels / "s08" / "review.geojson").read_text())
        assert fc["properties"]["fraction"] == float(frac)
        sizes[frac] = sum(f["properties"]["measurements"]["n_patches"] for f in fc["features"])
    n = len(read_instances_h5(tmp_path / "0.2" / "s08" / "instances.h5").coords)
    assert sizes["0.02"] == int(np.ceil(0.02 * n)) and sizes["0.2"] == int(np.ceil(0.2 * n))
    capsys.readouterr()
    assert main(["label", str(out), "--slides", str(cohort.slides_dir / "s08.tif"), "--features", str(cohort.tiles_dir),
                 "--out", str(tmp_path / "bad"), "--review-fraction", "0"]) == 2
    assert "--review-fraction must be in (0, 1]" in capsys.readouterr().err and not (tmp_path / "bad").exists()
