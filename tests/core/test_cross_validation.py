"""`milkit train --folds K` (milkit.cross_validation): K fold runs, mean ± sd by hand, resume, bad input."""

from __future__ import annotations

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
    assert printed[-1].startswith("fold-2 verdict mil: ") and printed[-3].startswith("fold-0 verdict mil: ")
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
