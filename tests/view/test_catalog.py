"""The viewer's catalog reads lazily: hundreds of slides list from h5 attributes and label
counts without opening a slide; per-slide metrics match evaluate's."""

from __future__ import annotations

import shutil

import numpy as np

from milkit.view.catalog import Catalog


def test_three_hundred_slides_list_without_opening_any(view_cohort, tmp_path):
    src = view_cohort.labels_dir / "s01" / "instances.h5"
    for i in range(300):
        (tmp_path / f"c{i:03d}").mkdir()
        shutil.copy(src, tmp_path / f"c{i:03d}" / "instances.h5")
    cat = Catalog(tmp_path)
    rows = cat.slide_list()
    assert len(rows) == 300 and rows[0]["id"] == "c000" and rows[0]["split"] == "unlisted"
    assert rows[0]["n_patches"] > 0 and rows[0]["patch_auroc"] is None
    assert not cat._open  # nothing opened until a slide is asked for


def test_list_metrics_agree_with_evaluate(view_cohort, tmp_path):
    from milkit.slide.labeling import evaluate_annotations

    res = evaluate_annotations(tmp_path, view_cohort.ann_dir, view_cohort.labels_dir)
    rows = {r["id"]: r for r in Catalog(view_cohort.labels_dir, annotations_dir=view_cohort.ann_dir).slide_list(wait=True)}
    for sid, m in res["per_slide"].items():
        assert rows[sid]["n_tumour_patches"] == m["n_tumour_patches"]
        assert rows[sid]["true_label"] == int(m["n_tumour_patches"] > 0) == m["true_label"]
        a, b = rows[sid]["patch_auroc"], m["instance_auroc"]
        assert (a is None and b is None) or np.isclose(a, b)


def test_patch_metrics_fill_in_behind_the_list(view_cohort, tmp_path, monkeypatch):
    """With --annotations and no evaluated metrics, the list comes back at once and the patch
    AUROC/F1 of several hundred slides follow from a background thread (``pending`` counts down)."""
    import threading

    src = view_cohort.labels_dir / "s00" / "instances.h5"
    for i in range(200):
        (tmp_path / f"c{i:03d}").mkdir()
        shutil.copy(src, tmp_path / f"c{i:03d}" / "instances.h5")
    go = threading.Event()
    calls = []
    real = Catalog._patch_metrics

    def gated(self, sid, f, true_label=None):
        go.wait(60)
        calls.append(sid)
        return real(self, sid, f, true_label) if sid == "c000" else {"patch_auroc": 0.5, "patch_f1": 0.25, "n_tumour_patches": 3}

    monkeypatch.setattr(Catalog, "_patch_metrics", gated)
    cat = Catalog(tmp_path, annotations_dir=view_cohort.ann_dir)
    rows = cat.slide_list()
    assert len(rows) == 200 and cat.pending == 200 and not calls  # listed before any metric was computed
    assert all(r["patch_auroc"] is None for r in rows)
    go.set()
    rows = cat.slide_list(wait=True)
    assert cat.pending == 0 and len(calls) == 200
    # c000 is a copy of s00 but has no annotation of its own: all negative, so AUROC undefined, F1 0
    assert rows[0]["n_tumour_patches"] == 0 and rows[0]["patch_auroc"] is None and rows[0]["true_label"] == 0
    assert rows[1]["patch_auroc"] == 0.5 and rows[1]["true_label"] == 1


def test_a_folder_of_pixel_map_labels_is_named_as_such(tmp_path, capsys):
    """`milkit view` (and `evaluate --annotations`) on what `label` writes for a segmentation run: one line that says
    these are image masks and where to look, exit 2; an empty folder says to label slides first."""
    from milkit.cli import main

    (tmp_path / "labels" / "seg" / "masks").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    assert main(["view", str(tmp_path / "labels"), "--no-browser"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pixel-map labels of images (stage seg" in err[0] and str(tmp_path / "labels" / "seg" / "overlay") in err[0]
    assert main(["view", str(tmp_path / "empty"), "--no-browser"]) == 2
    assert "no <slide>/instances.h5 (run 'milkit label RUN --slides" in capsys.readouterr().err


def test_slide_ids_with_url_characters_reach_their_tiles(view_cohort, tmp_path):
    """Slide file names hold spaces, '#', '%' and dots ("Slide #3 (50%).svs", TCGA ids): the tile addresses the
    viewer hands OpenSeadragon are percent-encoded, and the server finds the slide behind them."""
    from milkit.view.server import create_app

    sid = "Slide #3 (50%).DX1.F6E9"
    (tmp_path / sid).mkdir()
    shutil.copy(view_cohort.labels_dir / "s00" / "instances.h5", tmp_path / sid / "instances.h5")
    client = create_app(Catalog(tmp_path)).test_client()
    from urllib.parse import quote

    payload = client.get("/api/slide/" + quote(sid, safe="")).get_json()
    assert payload["id"] == sid and "#" not in payload["heat_tiles"] and "%" in payload["heat_tiles"]
    dzi = client.get(payload["heat_tiles"])
    assert dzi.status_code == 200 and b"Image" in dzi.data
    tile = client.get(payload["heat_tiles"].replace(".dzi", "_files/0/0_0.png"))  # as OpenSeadragon derives it
    assert tile.status_code == 200 and tile.data[:4] == b"\x89PNG"
