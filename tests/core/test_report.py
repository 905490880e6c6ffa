"""report.html: metrics, ROC curves, histograms and training curves of a run directory; the
per-slide section of slide runs (its rendering in Chromium: tests/view/test_view_browser.py)."""

import base64

import numpy as np
import pytest

from milkit.report import ScoreSet, histogram_figure, read_training_log, render_report, write_report


def _scores(seed: int = 0) -> ScoreSet:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    return ScoreSet(bag_true=np.array([0, 1, 0, 1]), bag_prob=np.array([0.1, 0.9, 0.4, 0.6]),
                    instance_true=y, instance_score=y + rng.normal(0, 0.5, 200), threshold=0.5)


def test_report_holds_metrics_plots_and_training_curves(tmp_path):
    log = tmp_path / "stages" / "mil" / "logs" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("epoch,step,train/loss,val/bag_auroc\n0,4,0.69,\n0,4,,0.75\n1,9,0.5,\n1,9,,0.875\n")
    metrics = {"mil": {"threshold": {"threshold": 0.5, "source": "validation:youden_product"},
                       "val": {"bag_auroc": 0.75, "instance_auroc": 0.8}, "test": {"bag_auroc": 1.0, "n_bags": 4}},
               "_run": {"method": "mil", "train_seconds": 1.5}}
    path = write_report(tmp_path, metrics, {"mil": {"val": _scores(0), "test": _scores(1)}})
    page = path.read_text()
    assert path.name == "report.html" and page.startswith("<!doctype html>")
    assert "stage: mil" in page and "validation:youden_product" in page
    assert "<td>0.75</td>" in page and "<td>1</td>" in page  # val and test columns
    imgs = page.count("data:image/png;base64,")
    assert imgs == 4  # ROC, two histograms, training curves
    first = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_training_log(log) == {"train/loss": [(0, 0.69), (1, 0.5)], "val/bag_auroc": [(0, 0.75), (1, 0.875)]}


def test_report_without_instance_labels_or_logs(tmp_path):
    sc = ScoreSet(bag_true=np.array([0, 1]), bag_prob=np.array([0.2, 0.7]))
    assert histogram_figure(sc, "test") is None
    page = render_report(tmp_path, {"mil": {"test": {"bag_auroc": 1.0, "instance": "not computable"}}},
                         {"mil": {"test": sc}})
    assert page.count("data:image/png;base64,") == 1  # the bag ROC only
    assert "<td>instance</td><td>not computable</td>" in page  # why a metric is missing is shown
    one_class = ScoreSet(bag_true=np.array([1, 1]), bag_prob=np.array([0.2, 0.7]))
    assert "base64," not in render_report(tmp_path, {}, {})  # no stages, no plots
    assert render_report(tmp_path, {"s": {"test": {}}}, {"s": {"test": one_class}}).count("base64,") == 1


def test_report_escapes_names(tmp_path):
    page = render_report(tmp_path, {"<b>x</b>": {"test": {"bag_auroc": 0.5}}}, {})
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


def test_report_shows_the_verdict_rule_reliability_and_seed_spread(tmp_path):
    from milkit.trust.verdict import assess

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 10)
    patch_y = np.concatenate([np.r_[np.zeros(9, int), [int(v)]] for v in y])
    patch_s = patch_y * 2.0 + rng.normal(0, 1, len(patch_y))
    trust = assess(y, y * 0.8 + 0.1, patch_s.reshape(20, 10).max(1), patch_true=patch_y, patch_score=patch_s,
                   patch_prob=1 / (1 + np.exp(-patch_s)), patch_group=np.repeat(np.arange(20), 10),
                   member_scores=[patch_s, patch_s + rng.normal(0, 0.1, len(patch_s))], n_boot=200)
    seeds = [{"seed": k, "val": {"bag_auroc": 0.8 + k / 100}, "test": {"bag_auroc": 0.7, "instance_auroc": 0.6 + k / 10,
                                                                         "instance_f1": 0.5}} for k in range(2)]
    metrics = {"mil": {"trust": trust, "calibration": [{"source": "validation patch labels"}],
                       "threshold": {"threshold": 0.4, "source": "validation:f1", "criterion": "f1",
                                     "applies_to": "probability"},
                       "val": {"bag_auroc": 0.9}, "test": {"bag_auroc": 0.75, "instance_auroc": 0.71},
                       "seeds": seeds,
                       "seed_spread": {"test": {"instance_auroc": {"mean": 0.65, "sd": 0.0707, "min": 0.6, "median": 0.65,
                                                                   "max": 0.7, "ensemble": 0.71,
                                                                   "ensemble_minus_median": 0.06}}}}}
    page = render_report(tmp_path, metrics, {})
    assert f"verdict: {trust['verdict'].upper()}" in page and html_escape(trust["rule"]) in page
    assert "validation patch labels" in page and "criterion f1" in page and "on the probability" in page
    assert "seeds (2 replicas" in page and "0.65 ± 0.0707" in page and "<b>0.71</b>" in page
    assert "<td>0.6 / 0.65 / 0.7</td>" in page and "<td>+0.06</td>" in page  # the spread, the ensemble vs its median
    assert page.count("data:image/png;base64,") == 1  # the reliability diagram


def html_escape(s: str) -> str:
    import html

    return html.escape(s)


# ----------------------------------------------------------------------------- slide runs
def _bag(sid, label, prob, true, score, probability=None, thr=0.5):
    from milkit.view.run_slides import SlideBag

    n = len(score)
    coords = np.stack([np.arange(n) % 4, np.arange(n) // 4], 1) * 64
    vals = np.asarray(score if probability is None else probability, float)
    return SlideBag(sid, label, prob, coords, 64.0, np.asarray(score, float), (vals >= thr).astype(int),
                    None if probability is None else np.asarray(probability, float), "probability",
                    None if true is None else np.asarray(true))


def test_slide_section_metrics_per_split_by_hand(tmp_path):
    from milkit.view.run_slides import split_metrics

    # val: a positive slide (patches ranked perfectly) and a negative one; test: one of each, one ranking swapped
    val = [_bag("v pos&1", 1, 0.9, [1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]), _bag("v0", 0, 0.3, [0, 0, 0, 0], [0.6, 0.1, 0.1, 0.1])]
    test = [_bag("t1", 1, 0.4, [1, 0, 0, 0], [0.3, 0.7, 0.1, 0.1]), _bag("t0", 0, 0.8, [0, 0, -1, -1], [0.2, 0.1, 0.9, 0.9])]
    m = split_metrics(val)
    # pooled val patches: positives 0.9, 0.8 above every negative (0.2, 0.1, 0.6, 0.1 ×3) → AUROC 1
    assert m["patch_auroc"] == 1.0 and m["slide_auroc"] == 1.0 and m["n_truth_positive"] == 2
    # labels at 0.5: TP 2, FP 1 (0.6), FN 0 → F1 = 4/5
    assert m["patch_f1"] == pytest.approx(0.8)
    t = split_metrics(test)
    # test labelled patches: positive 0.3 against negatives 0.7, 0.1, 0.1, 0.2, 0.1 → 4 of 5 below it
    assert t["patch_auroc"] == pytest.approx(0.8) and t["slide_auroc"] == 0.0 and t["n_labelled_slides"] == 2
    assert t["mean_slide_patch_auroc"] == pytest.approx(2 / 3)  # t1 only (t0 has no positive patch)
    assert val[1].metrics()["patch_f1"] is None and val[0].metrics()["patch_f1"] == 1.0
    sc = {"val": ScoreSet(np.array([1, 0]), np.array([0.9, 0.3]), slides=val),
          "test": ScoreSet(np.array([1, 0]), np.array([0.4, 0.8]), slides=test)}
    page = render_report(tmp_path, {"mil": {"val": {}, "test": {}}, "_run": {"primary_stage": "mil"}}, {"mil": sc},
                         view_port=9123)
    section = page.split("id='slides-section'")[1]
    assert "http://127.0.0.1:9123/?slide=v%20pos%261" in section  # the id quoted in the viewer link
    assert "<td>0.800</td>" in section and "<td>0.667</td>" in section  # test patch AUROC, mean per-slide AUROC
    assert section.count("<tr data-id=") == 4 and "milkit view" in section
    # per split 1 worst FN and 1 worst FP, each: ground-truth patch labels + heatmap
    assert section.count("data:image/png;base64,") == 8
    for sid in ("val-v pos&amp;1", "val-v0", "test-t1", "test-t0"):
        assert f"href='#slide-{sid}'" in section and f"id='slide-{sid}'" in section
    png = section.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    # a run without slides (no coords) has no such section
    assert "slides-section" not in render_report(tmp_path, {"mil": {"test": {}}}, {"mil": {"test": _scores()}})


def test_slide_heatmap_uses_the_fixed_scale():
    from PIL import Image

    from milkit.view.colors import lut
    from milkit.view.figures import heat_overlay, label_overlay

    base = Image.new("RGB", (128, 64), (255, 255, 255))
    img = np.asarray(heat_overlay(base, np.array([[0, 0], [64, 0]]), np.array([0.0, 1.0]), 64, 128, alpha=255))
    t = lut()
    assert (img[10, 10] == t[0]).all() and (img[10, 100] == t[255]).all()  # 0 → the scale's 0, 1 → its 1
    lab = np.asarray(label_overlay(base, np.array([[0, 0], [64, 0]]), np.array([1, -1]), 64, 128, alpha=255))
    assert (lab[10, 10] == (200, 0, 0)).all() and (lab[10, 100] == 255).all()  # unknown patches are not drawn
    # many small squares (the vectorised path): a 10×10 grid of 64-px patches on a 20-px image tiles it exactly
    grid = np.stack(np.meshgrid(np.arange(10), np.arange(10)), -1).reshape(-1, 2) * 64
    v = (grid[:, 0] // 64 + grid[:, 1] // 64) / 18  # 0 … 1 along the diagonal
    img = np.asarray(heat_overlay(Image.new("RGB", (20, 20)), grid, v, 64, 640, alpha=255))
    want = t[np.rint(v * 255).astype(int)].reshape(10, 10, 3).repeat(2, 0).repeat(2, 1)  # row = y, column = x
    np.testing.assert_array_equal(img, want)


def test_slide_run_report_end_to_end(tmp_path):
    """A tiny feature-bag run (train → report.html): the per-slide section lists the val and
    test slides only, and its per-split patch AUROC is the one metrics.json holds."""
    import json

    import h5py

    from milkit.config import build_experiment
    from milkit.workflow import train_run

    rng = np.random.default_rng(0)
    feats, rows = tmp_path / "feats", ["slide_id,label,split"]
    feats.mkdir()
    splits = ["train"] * 8 + ["val"] * 4 + ["test"] * 4
    ys, xs = (a.ravel() for a in np.mgrid[0:6, 0:6])
    for i, split in enumerate(splits):
        lab = np.zeros(36, np.int64)
        if i % 2 == 0:
            r, c = rng.integers(0, 4, 2)
            lab[(ys >= r) & (ys < r + 2) & (xs >= c) & (xs < c + 2)] = 1
        x = rng.normal(size=(36, 8)).astype(np.float32)
        x[lab == 1, 0] += 3
        with h5py.File(feats / f"sl{i:02d}.h5", "w") as f:
            f["features"] = x
            f.create_dataset("coords", data=np.stack([xs, ys], 1) * 64).attrs["patch_size_level0"] = 64
            f["instance_labels"] = lab
        rows.append(f"sl{i:02d},{i % 2 == 0:d},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    exp = build_experiment({
        "seed": 0, "data": {"kind": "feature_bags", "features_dir": str(feats), "labels_csv": str(tmp_path / "labels.csv")},
        "method": {"name": "mil", "encoder": {"name": "linear", "in_dim": 8, "out_dim": 16}, "model": {"name": "abmil"}},
        "trainer": {"max_epochs": 2, "lr": 1e-3, "progress_bar": False}})
    train_run(exp, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    page = (tmp_path / "run" / "report.html").read_text()
    section = page.split("id='slides-section'")[1]
    ids = {r.split("'")[0] for r in section.split("<tr data-id='")[1:]}
    assert ids == {f"{s}:sl{i:02d}" for i, s in enumerate(splits) if s != "train"}  # never the training slides
    split_rows = section.split("id='slide-splits'>")[1].split("</table>")[0].split("<tr>")[2:]
    for row, split in zip(split_rows, ("val", "test")):
        cells = [c.split("</td>")[0] for c in row.split("<td>")[1:]]
        assert cells[0] == split and cells[1] == "4 (2)" and cells[3] == "144"
        assert float(cells[6]) == pytest.approx(metrics["mil"][split]["instance_auroc"], abs=5e-4)
        assert float(cells[7]) == pytest.approx(metrics["mil"][split]["instance_f1"], abs=5e-4)
    assert f"milkit label {tmp_path / 'run'} --slides SLIDES/ --features {feats}" in section
    assert "(0 of these 8 slides are labelled there now)" in section  # no labels/ written yet
    assert section.count("data:image/png;base64,") == 16  # 2 splits × (2 FN + 2 FP) × (patch labels, heatmap)


def test_report_lists_stages_only_not_the_annotations_record(tmp_path):
    """`evaluate --annotations` adds an `annotations` key to metrics.json: not a stage."""
    metrics = {"_run": {"method": "mil"}, "mil": {"val": {"bag_auroc": 1.0}, "test": {"bag_auroc": 0.9}},
               "annotations": {"splits": {"test": {"n_slides": 2}}, "per_slide": {}}}
    page = render_report(tmp_path, metrics, {})
    assert "stage: mil" in page and "stage: annotations" not in page
