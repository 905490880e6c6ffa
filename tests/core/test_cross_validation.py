"""`milkit train --folds K` (milkit.cross_validation): K fold runs, mean ± sd by hand, resume, bad input."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import yaml

from milkit.cli import main
from milkit.cross_validation import render, summarise

N_SLIDES, N_PATCH, D = 24, 16, 8


def _cohort(root):
    rng = np.random.default_rng(0)
    feats = root / "feats"
    feats.mkdir()
    rows = ["slide_id,label"]
    for i in range(N_SLIDES):
        y = i % 2
        x = rng.normal(size=(N_PATCH, D)).astype(np.float32)
        inst = np.zeros(N_PATCH, np.int64)
        if y:
            inst[:3] = 1
            x[:3, 0] += 4.0
        with h5py.File(feats / f"s{i:02d}.h5", "w") as f:
            f.create_dataset("features", data=x)
            xs = (np.arange(N_PATCH) % 4) * 64
            c = f.create_dataset("coords", data=np.stack([xs, (np.arange(N_PATCH) // 4) * 64], 1))
            c.attrs["patch_size_level0"] = 64
            f.create_dataset("instance_labels", data=inst)
        rows.append(f"s{i:02d},{y}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = {"seed": 0,
           "data": {"kind": "feature_bags", "features_dir": str(feats), "labels_csv": str(root / "labels.csv")},
           "method": {"name": "mil", "encoder": {"name": "linear", "in_dim": D, "out_dim": 8}},
           "trainer": {"max_epochs": 6, "lr": 0.01, "progress_bar": False, "accelerator": "cpu", "devices": 1}}
    (root / "cv.yaml").write_text(yaml.safe_dump(cfg))
    return root / "cv.yaml"


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    cfg = _cohort(root)
    return root, cfg


def test_three_folds_write_three_runs_and_their_mean_and_sd(cv_run, capsys):
    root, cfg = cv_run
    out = root / "out"
    capsys.readouterr()
    assert main(["train", str(cfg), "--out", str(out), "--folds", "3"]) == 0
    captured = capsys.readouterr()
    assert "k-fold splits of every labelled slide replace data.split_mode 'auto'" in captured.err
    printed = captured.out.strip().splitlines()
    assert printed[-2].startswith("fold-2 verdict mil: ") and printed[-4].startswith("fold-0 verdict mil: ")
    assert printed[-1].startswith("cross-validation verdict mil: ")  # the verdict of `label` on this folder
    per_fold = [json.loads((out / f"fold-{k}" / "metrics.json").read_text()) for k in range(3)]
    for k in range(3):
        data = yaml.safe_load((out / f"fold-{k}" / "config.yaml").read_text())["data"]
        assert (data["split_mode"], data["folds"], data["fold"]) == ("kfold", 3, k)
    s = json.loads((out / "cv_summary.json").read_text())
    assert s["folds"] == 3 and s["primary_stage"] == "mil"
    for key in ("bag_auroc", "instance_auroc", "instance_f1"):
        vals = [m["mil"]["test"][key] for m in per_fold]
        cell = s["stages"]["mil"]["test"][key]
        assert cell["values"] == pytest.approx(vals)
        assert cell["mean"] == pytest.approx(np.mean(vals)) and cell["sd"] == pytest.approx(np.std(vals, ddof=1))
    assert s["stages"]["mil"]["verdicts"] == [m["mil"]["trust"]["verdict"] for m in per_fold]
    assert s["stages"]["mil"]["test"]["instance_auroc"]["mean"] > 0.8  # chance 0.5: a planted 4-sd shift in 3 of 16 patches
    assert "| test | instance_auroc |" in (out / "cv_summary.md").read_text()
    # a second run is refused (nothing changed); --resume keeps the finished folds as they are
    before = (out / "fold-0" / "stages" / "mil" / "model.pt").stat().st_mtime_ns
    assert main(["train", str(cfg), "--out", str(out), "--folds", "3"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(cfg), "--out", str(out), "--folds", "3", "--resume"]) == 0
    assert (out / "fold-0" / "stages" / "mil" / "model.pt").stat().st_mtime_ns == before
    assert json.loads((out / "cv_summary.json").read_text()) == s
    # a fold trained with another config is not summarised as this cross-validation's
    assert main(["train", str(cfg), "--out", str(out), "--folds", "3", "--resume", "--set", "trainer.lr=0.5"]) == 2
    assert "trainer.lr" in capsys.readouterr().err


def test_folds_trained_as_separate_jobs_are_summarised_by_resume(cv_run, capsys):
    """A SLURM array trains fold k into OUT/fold-k with the k-fold keys; --folds K --resume then trains
    nothing and writes the summary."""
    root, cfg = cv_run
    out = root / "array"
    for k in range(2):
        assert main(["train", str(cfg), "--out", str(out / f"fold-{k}"), "--set", "data.split_mode=kfold",
                     "--set", "data.folds=2", "--set", f"data.fold={k}"]) == 0
    stamps = [(out / f"fold-{k}" / "stages" / "mil" / "model.pt").stat().st_mtime_ns for k in range(2)]
    assert main(["train", str(cfg), "--out", str(out), "--folds", "2", "--resume"]) == 0
    assert [(out / f"fold-{k}" / "stages" / "mil" / "model.pt").stat().st_mtime_ns for k in range(2)] == stamps
    s = json.loads((out / "cv_summary.json").read_text())
    per_fold = [json.loads((out / f"fold-{k}" / "metrics.json").read_text()) for k in range(2)]
    assert s["stages"]["mil"]["test"]["bag_auroc"]["values"] == pytest.approx([m["mil"]["test"]["bag_auroc"]
                                                                                for m in per_fold])


def test_folds_bad_input_is_one_line_and_writes_nothing(cv_run, tmp_path, capsys):
    root, cfg = cv_run
    spatial = tmp_path / "spatial.yaml"
    spatial.write_text(yaml.safe_dump({"data": {"kind": "spatial_bags"}, "method": {"name": "mil"}}))
    capsys.readouterr()
    assert main(["train", str(spatial), "--out", str(tmp_path / "a"), "--folds", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--folds: data.kind 'spatial_bags' has no k-fold splits" in err[0]
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.yaml").write_text("seed: 0\n")
    assert main(["train", str(cfg), "--out", str(single), "--folds", "3"]) == 2
    assert "holds a single milkit run" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["train", str(cfg), "--out", str(tmp_path / "other"), "--folds", "3"]) == 2
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]
    assert main(["train", str(cfg), "--out", str(tmp_path / "b"), "--folds", "1"]) == 2  # typer: min 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_summary_by_hand():
    def fold(auc, f1, verdict):
        return {"_run": {"primary_stage": "s"},
                "s": {"val": {"bag_auroc": 1.0, "n_bags": 4, "instance": "not computable"},
                      "test": {"bag_auroc": auc, "instance_f1": f1, "n_bags": 4, "instance_n_pos": 3}, "trust": {"verdict": verdict}}}

    s = summarise([fold(0.5, 0.2, "uncertain"), fold(0.7, None, "trustworthy"), fold(0.9, 0.4, "trustworthy")])
    t = s["stages"]["s"]["test"]
    assert t["bag_auroc"]["mean"] == pytest.approx(0.7) and t["bag_auroc"]["sd"] == pytest.approx(0.2)
    assert t["instance_f1"]["n"] == 2 and t["instance_f1"]["mean"] == pytest.approx(0.3)  # a missing value is left out
    assert "n_bags" not in t and "instance_n_pos" not in t and "instance" not in s["stages"]["s"]["val"]
    assert s["stages"]["s"]["verdicts"] == ["uncertain", "trustworthy", "trustworthy"]
    assert "| test | bag_auroc | 0.700 ± 0.200 | 0.500, 0.700, 0.900 |" in render(s)


def test_pooled_out_of_fold_test_covers_every_slide_once(cv_run):
    """The test folds partition the slides: out_of_fold_mil.csv holds each slide once, and the pooled
    slide AUROC is the AUROC of that file's column, inside its own interval."""
    import csv

    from milkit.metrics.classification import auroc

    root, cfg = cv_run
    out = root / "pooled"
    assert main(["train", str(cfg), "--out", str(out), "--folds", "3"]) == 0
    rows = list(csv.DictReader((out / "out_of_fold_mil.csv").open()))
    assert sorted(r["slide_id"] for r in rows) == [f"s{i:02d}" for i in range(N_SLIDES)]
    assert {int(r["fold"]) for r in rows} == {0, 1, 2}
    from milkit.config import build_experiment

    for k in range(3):  # each slide's fold is the one whose test split holds it
        exp = build_experiment(yaml.safe_load((out / f"fold-{k}" / "config.yaml").read_text()))
        test_ids = {exp.data.build(exp.seed).test[i].bag_id for i in range(len(exp.data.build(exp.seed).test))}
        assert {r["slide_id"] for r in rows if int(r["fold"]) == k} == test_ids
    pooled = json.loads((out / "cv_summary.json").read_text())["pooled_test"]["mil"]
    assert pooled["n_slides"] == N_SLIDES and pooled["n_patches"] == N_SLIDES * N_PATCH
    value = auroc([int(r["label"]) for r in rows], [float(r["bag_prob"]) for r in rows])
    assert pooled["slide_auroc"]["value"] == pytest.approx(value, abs=1e-6)
    lo, hi = pooled["slide_auroc"]["ci95"]
    assert lo <= value <= hi
    assert pooled["patch_auroc"]["value"] > 0.8 and 0 <= pooled["patch_f1"] <= 1  # chance 0.5 (planted shift)
    assert "pooled out-of-fold test (24 slides)" in (out / "cv_summary.md").read_text()


def test_a_cross_validation_folder_given_as_a_run_names_a_fold(cv_run, capsys):
    root, cfg = cv_run
    out = root / "out"
    if not (out / "fold-0" / "config.yaml").is_file():
        assert main(["train", str(cfg), "--out", str(out), "--folds", "3"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a cross-validation folder (3 fold runs)" in err and str(out / "fold-0") in err


def _trained(cv_run, name="out"):
    root, cfg = cv_run
    out = root / name
    if not (out / "fold-2" / "config.yaml").is_file():
        assert main(["train", str(cfg), "--out", str(out), "--folds", "3"]) == 0
    return root, out


def test_pooled_verdict_is_printed_last_and_read_on_every_slide(cv_run):
    root, out = _trained(cv_run)
    pooled = json.loads((out / "cv_summary.json").read_text())["pooled_test"]["mil"]
    trust = pooled["trust"]
    assert trust["n_slides"] == N_SLIDES and trust["slide_auroc"]["value"] == pytest.approx(pooled["slide_auroc"]["value"])
    # 12 slides a class pass the rule that every 8-slide fold's validation fails; the planted shift is found
    assert "fewer than 10 validation slides" not in trust["rule"] and trust["verdict"] == "trustworthy"
    # the rules say what they were read on: every slide out of fold, not a validation split
    assert "fewer than 10 out-of-fold slides of a class: too few to check" in " ".join(trust["rules"])
    assert not any("validation" in r for r in trust["rules"])
    assert "cross-validation verdict mil: TRUSTWORTHY" in (out / "cv_summary.md").read_text()


def test_label_a_cross_validation_folder_out_of_fold_and_new_slides_by_the_folds(cv_run, tmp_path, capsys):
    """Cohort slides are labelled by the fold that tested them (its own scores, threshold and calibration);
    a new slide by the mean of the folds' calibrated probabilities at the median fold threshold."""
    import csv
    import shutil

    import torch

    from milkit.data.bag import Bag, collate_bags
    from milkit.workflow import load_labelers

    root, out = _trained(cv_run)
    feats = tmp_path / "feats"
    shutil.copytree(root / "feats", feats)
    shutil.copy(feats / "s01.h5", feats / "new01.h5")  # not in the labels CSV: a new slide
    capsys.readouterr()
    assert main(["label", str(out), "--features", str(feats), "--out", str(tmp_path / "lab")]) == 0
    assert "24 slide(s) of the cross-validation cohort labelled out of fold" in capsys.readouterr().err
    fold_of = {r["slide_id"]: int(r["fold"]) for r in csv.DictReader((out / "out_of_fold_mil.csv").open())}
    labs = [load_labelers(out / f"fold-{k}")[1]["mil"] for k in range(3)]

    def read(sid):
        with h5py.File(tmp_path / "lab" / sid / "instances.h5") as f:
            return (json.loads(f.attrs["meta"]), float(f.attrs["bag_prob"]), float(f.attrs["threshold"]),
                    f["probability"][()], f["label"][()], f["uncertainty"][()] if "uncertainty" in f else None)

    with h5py.File(feats / "s01.h5") as f:
        x = torch.from_numpy(f["features"][()])
    batch = collate_bags([Bag(x, 0, "s01")])
    for sid in ("s00", "s01", "s07"):
        meta, bag_prob, thr, prob, label, unc = read(sid)
        k = fold_of[sid]
        assert meta["labelled_by"].startswith(f"fold-{k} (out of fold") and unc is None
        assert thr == pytest.approx(labs[k].threshold) and (label == (prob >= thr)).all()
    meta, bag_prob, thr, prob, label, unc = read("s01")
    o = labs[fold_of["s01"]].outputs(batch)
    assert prob == pytest.approx(o.probability[0].double().numpy(), abs=1e-6) and bag_prob == pytest.approx(float(o.bag_prob[0]), abs=1e-6)
    meta, bag_prob, thr, prob, label, unc = read("new01")
    per = np.stack([lab.outputs(batch).probability[0].double().numpy() for lab in labs])
    assert meta["labelled_by"].startswith("ensemble of 3 folds") and meta["n_folds"] == 3
    assert prob == pytest.approx(per.mean(0), abs=1e-6) and unc == pytest.approx(per.std(0), abs=1e-6)
    assert thr == pytest.approx(np.median([lab.threshold for lab in labs]))
    assert meta["trust"]["verdict"] == json.loads((out / "cv_summary.json").read_text())["pooled_test"]["mil"]["trust"]["verdict"]
    # --split labels one run's split: a one-line error naming a fold
    assert main(["label", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out / "fold-0") in err[0] and "--features" in err[0]
    # a fold missing: its slides would be labelled by folds that trained on them, and called new
    partial = tmp_path / "partial"
    shutil.copytree(out, partial, ignore=shutil.ignore_patterns("fold-1"))
    assert main(["label", str(partial), "--features", str(feats), "--out", str(tmp_path / "lab2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3-fold cross-validation with fold-1 missing" in err[0] and "--resume" in err[0]
    assert not (tmp_path / "lab2").exists()


def test_evaluate_a_cross_validation_folder_against_annotations_out_of_fold(cv_run, tmp_path, capsys):
    """Every cohort slide is scored as test (out of fold); the result lands in cv_summary.json and the viewer's list."""
    from milkit.view.catalog import Catalog

    root, out = _trained(cv_run)
    ann = tmp_path / "ann"
    ann.mkdir()
    tumour = {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
              "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [192, 0], [192, 64], [0, 64], [0, 0]]]}}
    for i in range(1, N_SLIDES, 2):  # the planted positives: patches 0–2, the first row's left three
        (ann / f"s{i:02d}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [tumour]}))
    lab = tmp_path / "lab"
    assert main(["label", str(out), "--features", str(root / "feats"), "--out", str(lab)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--annotations", str(ann), "--labels", str(lab)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("test: n_slides 24") and str(out / "report_annotations.html") in printed
    result = json.loads((out / "cv_summary.json").read_text())["annotations"]
    assert list(result["splits"]) == ["test"] and result["splits"]["test"]["n_tumour_instances"] == 3 * N_SLIDES // 2
    assert result["splits"]["test"]["instance_auroc"] > 0.8  # chance 0.5
    assert "pooled_test" in json.loads((out / "cv_summary.json").read_text())  # the summary is kept
    # the folder still takes --resume, labels and report in it (label's default --out is OUT/labels)
    assert main(["label", str(out), "--features", str(root / "feats")]) == 0 and (out / "labels" / "s01").is_dir()
    assert main(["train", str(root / "cv.yaml"), "--out", str(out), "--folds", "3", "--resume"]) == 0
    rows = {r["id"]: r for r in Catalog(lab, annotations_dir=ann).slide_list(wait=True)}
    assert {r["split"] for r in rows.values()} == {"test"} and rows["s01"]["true_label"] == 1
    assert rows["s01"]["patch_auroc"] == pytest.approx(result["per_slide"]["s01"]["instance_auroc"])


def test_label_folds_of_seed_ensembles(cv_run, tmp_path):
    """--folds 2 --seeds 2: each fold labels with its seed ensemble; a new slide with the folds' mean of those."""
    import shutil

    import torch

    from milkit.data.bag import Bag, collate_bags
    from milkit.workflow import load_labelers

    root, cfg = cv_run
    out = tmp_path / "cvs"
    assert main(["train", str(cfg), "--out", str(out), "--folds", "2", "--seeds", "2"]) == 0
    assert json.loads((out / "cv_summary.json").read_text())["pooled_test"]["mil"]["trust"]["seed_agreement"]["n_seeds"] == 2
    feats = tmp_path / "new"
    feats.mkdir()
    shutil.copy(root / "feats" / "s03.h5", feats / "new03.h5")
    assert main(["label", str(out), "--features", str(feats), "--out", str(tmp_path / "lab")]) == 0
    with h5py.File(feats / "new03.h5") as f:
        batch = collate_bags([Bag(torch.from_numpy(f["features"][()]), 0, "new03")])
    labs = [load_labelers(out / f"fold-{k}")[1]["mil"] for k in range(2)]
    assert all(len(lab.members) == 2 for lab in labs)
    per = np.stack([lab.outputs(batch).probability[0].double().numpy() for lab in labs])
    with h5py.File(tmp_path / "lab" / "new03" / "instances.h5") as f:
        assert f["probability"][()] == pytest.approx(per.mean(0), abs=1e-6)
        meta = json.loads(f.attrs["meta"])
        assert (meta["n_seeds"], meta["n_folds"]) == (2, 2) and f.attrs["calibration"]


def test_label_warns_about_positive_slides_without_a_positive_patch(cv_run, tmp_path, caplog):
    """A threshold above every patch of a slide the model calls positive: label says which slides and why."""
    import logging
    import shutil

    root, out = _trained(cv_run)
    run = tmp_path / "run"
    shutil.copytree(out / "fold-0", run)
    thr = json.loads((run / "stages" / "mil" / "threshold.json").read_text())
    (run / "stages" / "mil" / "threshold.json").write_text(json.dumps({**thr, "threshold": 1.0, "source": "edited"}))
    with caplog.at_level(logging.WARNING, logger="milkit"):
        assert main(["label", str(run), "--features", str(root / "feats"), "--out", str(tmp_path / "lab")]) == 0
    rows = list(csv.DictReader((tmp_path / "lab" / "slides.csv").open()))
    called = sorted(r["slide_id"] for r in rows if float(r["bag_prob"]) >= 0.5)
    assert called and all(int(r["n_positive"]) == 0 for r in rows)
    msg = next(r.getMessage() for r in caplog.records if "no positive patch" in r.getMessage())
    assert msg.startswith(f"{len(called)} slide(s) called positive") and called[0] in msg and "(edited) = 1" in msg
