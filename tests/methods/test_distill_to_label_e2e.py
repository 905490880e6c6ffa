"""End to end: Distill-to-Label on digit-bags, and the train → label → evaluate CLI."""

import csv
import json

import pytest
import yaml

from milkit.cli import main
from milkit.config import build_experiment
from milkit.workflow import evaluate_run, label_run, train_run

TINY = {
    "seed": 0,
    "data": {"kind": "digit_bags", "n_train": 24, "n_val": 16, "n_test": 16, "mean_bag_size": 6},
    "method": {"name": "distill_to_label", "teacher": {"epochs": 1}, "student": {"epochs": 1}, "baseline_epochs": 1},
    "trainer": {"optimizer": "adam", "lr": 0.0005, "max_epochs": 1, "progress_bar": False},
}


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    """A short run on an easy setting: K = 6, 40 training bags, 4 epochs per stage, LeNet-5 with a
    64-wide FC layer (instead of 500) to keep it cheap."""
    raw = {
        "seed": 0,
        "data": {"kind": "digit_bags", "n_train": 40, "n_val": 30, "n_test": 40, "mean_bag_size": 6},
        "method": {"name": "distill_to_label", "baseline": False, "encoder": {"name": "lenet5", "out_dim": 64}},
        "trainer": {"optimizer": "adam", "lr": 0.0005, "max_epochs": 4, "progress_bar": False},
    }
    out = tmp_path_factory.mktemp("d2l") / "run"
    return out, train_run(build_experiment(raw), out)


def test_student_labels_instances_well_above_chance(learned_run):
    _, metrics = learned_run
    student = metrics["student"]["test"]
    # chance is 0.5; the issue asks for > 0.75 on a short run
    assert student["instance_auroc"] > 0.75, student
    assert student["bag_auroc"] > 0.75, student
    assert metrics["teacher"]["test"]["bag_auroc"] > 0.75


def test_run_directory_is_self_describing(learned_run):
    out, metrics = learned_run
    assert (out / "config.yaml").is_file() and (out / "metrics.json").is_file()
    for stage in ("teacher", "student"):
        assert (out / "stages" / stage / "model.pt").is_file()
        assert (out / "stages" / stage / "logs" / "metrics.csv").is_file()
        assert json.loads((out / "stages" / stage / "threshold.json").read_text())["source"].startswith("validation")
    again = evaluate_run(out)  # rebuilt from the run directory alone
    assert again["student"]["test"]["instance_auroc"] == pytest.approx(metrics["student"]["test"]["instance_auroc"])
    page = (out / "report.html").read_text()  # one section per stage, each with ROC, histograms, training curves
    for stage in ("teacher", "student"):
        assert f"stage: {stage}" in page
    assert page.count("data:image/png;base64,") >= 2 * 4


def test_label_csv_uses_validation_threshold(learned_run):
    out, _ = learned_run
    (path, _bags) = label_run(out, None, None, "test", None)
    thr = json.loads((out / "stages" / "student" / "threshold.json").read_text())["threshold"]
    rows = list(csv.DictReader(path.open()))
    assert rows and set(rows[0]) == {"bag_id", "instance", "score", "probability", "uncertainty", "label", "criterion"}
    for r in rows[:200]:  # the threshold applies to the calibrated probability (issue 11 §4)
        p = float(r["probability"])
        assert int(r["label"]) == int(p >= thr) or abs(p - thr) < 1e-5
        assert r["criterion"] == "f1" and r["uncertainty"] == ""


def test_cli_train_label_evaluate(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--set", "method.baseline=false"]) == 0
    assert main(["label", str(run), "--out", str(tmp_path / "labels")]) == 0
    assert (tmp_path / "labels" / "instance_labels_student.csv").is_file()
    assert main(["evaluate", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert set(m) >= {"teacher", "student"} and "abmil" not in m
    assert {"bag_auroc", "instance_auroc", "instance_f1", "instance_accuracy"} <= set(m["student"]["test"])


def test_cli_bad_inputs_exit_nonzero(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "method": {"name": "distill_to_label", "tacher": {}}}))
    assert main(["train", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "method.tacher" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    npz = tmp_path / "m.npz"
    import numpy as np

    np.savez(npz, images=np.zeros((4, 10, 10), np.uint8), labels=np.zeros(4))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(good), "--out", str(tmp_path / "r3"), "--set", f"data.mnist_path={npz}"]) == 2
    assert "(N, 28, 28)" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()  # nothing half-written
    assert main(["label", str(tmp_path / "not_a_run")]) == 2


def test_demo_montage_png(learned_run, tmp_path):
    from PIL import Image

    from milkit.demo import montage
    from milkit.workflow import load_labelers

    out, _ = learned_run
    _, labelers, exp = load_labelers(out)
    png = tmp_path / "m.png"
    montage(labelers["student"], exp.data.build(exp.seed).test, png, n_bags=4)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
