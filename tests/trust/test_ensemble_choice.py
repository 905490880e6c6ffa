"""Ensemble or replica, chosen on validation (milkit.trust.ensemble.choose_labels, issue 11 §3):
hand-built members where validation prefers a seed → that seed labels and is recorded; where the
ensemble is better → the ensemble; ties → the ensemble; without patch labels the slide metrics;
and a ``--seeds 3`` run whose stage labels with a replica is rebuilt identically by ``load``."""

import csv
import json
import math

import numpy as np
import pytest
import yaml

from milkit.cli import main
from milkit.run_dir import RunDir
from milkit.trust import ensemble
from milkit.trust.ensemble import BASIS_PATCH, BASIS_SLIDE, EnsembleLabeler, choose_labels, parse_used
from milkit.workflow import label_run, load_labelers

Y = np.array([0, 0, 1, 1])


def _m(prob, y=Y, bag_prob=(0.3, 0.7), bag_y=(0, 1), group=None) -> dict:
    d = {"prob": np.array(prob, float), "y": np.array(y), "bag_prob": np.array(bag_prob, float),
         "bag_y": np.array(bag_y)}
    if group is not None:
        d["group"] = np.array(group)
    return d


#: A and B rank the validation patches perfectly (F1 1, AUROC 1); C is poor (AUROC 0.375, F1 2/3).
#: Their mean [0.4, 0.1333, 0.25, 0.4333] has AUROC 3/4 and F1 0.8 (threshold 0.25): below the
#: median replica (1, 1) on both, so a replica labels. Ranked by (F1, AUROC), ties to the lower
#: replica: C < B < A — the validation-median replica is B (seed-1), the best A (seed-0).
A, B, C = _m([0.1, 0.2, 0.3, 0.4]), _m([0.2, 0.1, 0.35, 0.3]), _m([0.9, 0.1, 0.1, 0.6])


def test_validation_prefers_a_replica_which_then_labels_and_is_recorded():
    rec = choose_labels([A, B, C])
    assert rec["basis"] == BASIS_PATCH and rec["metrics"] == ["patch_f1", "patch_auroc"]
    assert rec["val"]["ensemble"]["patch_auroc"] == pytest.approx(0.75)
    assert rec["val"]["ensemble"]["patch_f1"] == pytest.approx(0.8)
    assert rec["val"]["ensemble"]["threshold"] == pytest.approx(0.25)
    assert rec["val"]["median_replica"] == pytest.approx({"patch_f1": 1.0, "patch_auroc": 1.0})
    assert [r["patch_auroc"] for r in rec["val"]["replicas"]] == pytest.approx([1.0, 1.0, 0.375])
    assert rec["val"]["replicas"][2]["patch_f1"] == pytest.approx(2 / 3)
    assert rec["below_median_on"] == ["patch_f1", "patch_auroc"]
    assert rec["used"] == "seed-0" and rec["fallback"] == "validation-best replica"  # the default
    assert "median replica" in rec["rule"] and "ties" in rec["rule"]
    assert choose_labels([A, B, C], fallback="median")["used"] == "seed-1"
    json.dumps(rec, allow_nan=False)  # the record goes into threshold.json as it is


def test_the_ensemble_labels_when_validation_says_it_is_better():
    # each replica misranks one pair (AUROC 3/4); their mean [0.35, 0.35, 0.7, 0.7] ranks perfectly
    p, q = _m([0.1, 0.6, 0.5, 0.9]), _m([0.6, 0.1, 0.9, 0.5])
    rec = choose_labels([p, q])
    assert rec["used"] == "ensemble" and rec["below_median_on"] == []
    assert rec["val"]["ensemble"]["patch_auroc"] == pytest.approx(1.0)
    assert rec["val"]["median_replica"]["patch_auroc"] == pytest.approx(0.75)


def test_identical_replicas_tie_and_a_tie_goes_to_the_ensemble():
    rec = choose_labels([C, C, C])
    assert rec["used"] == "ensemble"
    assert rec["val"]["ensemble"]["patch_auroc"] == pytest.approx(rec["val"]["median_replica"]["patch_auroc"])


def test_without_patch_labels_the_rule_uses_slide_auroc_minus_bce_and_max_patch_auroc():
    none = [-1, -1, -1, -1]
    g = [0, 0, 1, 1]
    # slide AUROC 1 for both; BCE of u: −(ln 0.8 + ln 0.6)/2, of w: −(ln 0.6 + ln 0.9)/2 (lower)
    u = _m([0.9, 0.1, 0.2, 0.3], none, (0.2, 0.6), group=g)  # top patch on the negative slide: max-patch AUROC 0
    w = _m([0.1, 0.1, 0.2, 0.8], none, (0.4, 0.9), group=g)  # max-patch AUROC 1
    rec = choose_labels([u, w])
    assert rec["basis"] == BASIS_SLIDE and rec["metrics"] == ["slide_auroc_minus_bce", "max_patch_slide_auroc"]
    reps = rec["val"]["replicas"]
    assert reps[0]["slide_auroc_minus_bce"] == pytest.approx(1 + (math.log(0.8) + math.log(0.6)) / 2)
    assert reps[1]["slide_auroc_minus_bce"] == pytest.approx(1 + (math.log(0.6) + math.log(0.9)) / 2)
    assert [r["max_patch_slide_auroc"] for r in reps] == pytest.approx([0.0, 1.0])
    # the mean: bags (0.3, 0.75): 1 − 0.3222 = 0.6778 ≥ the median replica's (0.6330 + 0.6919)/2 = 0.6625;
    # patches [0.5, 0.1, 0.15, 0.55]: slide maxima 0.5 < 0.55, max-patch AUROC 1 ≥ 0.5 → the ensemble
    ev = rec["val"]["ensemble"]
    assert ev["max_patch_slide_auroc"] == pytest.approx(1.0)
    assert ev["slide_auroc_minus_bce"] == pytest.approx(1 + (math.log(0.7) + math.log(0.75)) / 2)
    assert rec["val"]["median_replica"]["slide_auroc_minus_bce"] == pytest.approx(
        (reps[0]["slide_auroc_minus_bce"] + reps[1]["slide_auroc_minus_bce"]) / 2)
    assert rec["used"] == "ensemble"
    # a replica whose top patch sits on the negative slide drags the mean below the median replica: max-patch
    # AUROC 0 (maxima 0.397 on the negative slide > 0.367 on the positive), and bags (1/3, 0.8):
    # 1 − 0.3143 = 0.6857 < 0.6919; replicas ranked (0.633, 0) < (0.692, 1) twice, the tie to the lower
    # replica: v, seed-2, seed-1 → the validation-best replica is seed-1, the median seed-2
    v, x = _m([0.99, 0.1, 0.2, 0.3], none, (0.2, 0.6), group=g), _m([0.1, 0.1, 0.2, 0.4], none, (0.4, 0.9), group=g)
    rec = choose_labels([v, x, x])
    assert rec["val"]["ensemble"]["max_patch_slide_auroc"] == pytest.approx(0.0)
    assert rec["val"]["median_replica"]["max_patch_slide_auroc"] == pytest.approx(1.0)
    assert rec["val"]["ensemble"]["slide_auroc_minus_bce"] == pytest.approx(1 + (math.log(2 / 3) + math.log(0.8)) / 2)
    assert rec["below_median_on"] == ["slide_auroc_minus_bce", "max_patch_slide_auroc"] and rec["used"] == "seed-1"
    assert choose_labels([v, x, x], fallback="median")["used"] == "seed-2"


def test_parse_used_names_the_file_on_a_bad_value():
    assert parse_used("ensemble", 3, "x") is None and parse_used("seed-2", 3, "x") == 2
    with pytest.raises(ValueError, match="threshold.json: ensemble.used"):
        parse_used("seed-3", 3, "stages/mil/threshold.json")


TINY = {
    "seed": 0,
    "data": {"kind": "spatial_bags", "n_train": 24, "n_val": 16, "n_test": 12, "min_side": 5, "max_side": 6,
             "feature_dim": 8, "signal": 3.0},
    "method": {"name": "mil", "encoder": {"name": "linear", "in_dim": 8, "out_dim": 8}},
    "trainer": {"max_epochs": 2, "lr": 0.005, "progress_bar": False, "accelerator": "cpu", "devices": 1, "seeds": 3},
}


def test_a_run_that_labels_with_a_replica_is_rebuilt_identically_by_load(tmp_path, monkeypatch, capsys):
    """The rule's decision is forced to replica 2 here (the decision itself is tested above by hand):
    this checks the path from the decision to threshold.json, metrics.json, the report, the verdict
    line, ``load`` and ``milkit label``."""
    real = ensemble.choose_labels

    def forced(members, criterion="f1", fallback=ensemble.FALLBACK):
        rec = real(members, criterion, fallback)
        return {**rec, "used": "seed-2", "below_median_on": ["patch_f1"]}

    monkeypatch.setattr(ensemble, "choose_labels", forced)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 0
    assert "[labels: seed-2 — the ensemble was below the median replica" in capsys.readouterr().out.splitlines()[-1]
    monkeypatch.setattr(ensemble, "choose_labels", real)
    r = tmp_path / "r"
    thr = json.loads((r / "stages" / "mil" / "threshold.json").read_text())
    assert thr["ensemble"]["used"] == "seed-2" and thr["ensemble"]["val"]["replicas"][2]["seed"] == 2
    m = json.loads((r / "metrics.json").read_text())["mil"]
    assert m["ensemble"]["used"] == "seed-2" and "ensemble" not in m["threshold"]
    # the stage is replica 2: its own validation threshold and exactly its test numbers
    s2 = m["seeds"][2]
    assert thr["threshold"] == pytest.approx(s2["threshold"]["threshold"])
    assert thr["threshold"] == pytest.approx(thr["ensemble"]["val"]["replicas"][2]["threshold"])
    for k in ("bag_auroc", "instance_auroc", "instance_f1"):
        assert m["test"][k] == pytest.approx(s2["test"][k])
    page = (r / "report.html").read_text()
    assert "labels from: seed-2" in page and "stage (seed-2) − median seed" in page
    _, labs, _ = load_labelers(r)
    lab = labs["mil"]
    assert isinstance(lab, EnsembleLabeler) and lab.use == 2 and lab.used == "seed-2"
    assert lab.threshold == pytest.approx(thr["threshold"]) and lab.model is lab.members[2].model
    path, _ = label_run(r, tmp_path / "lab", None, "test", None)
    rows = list(csv.DictReader(path.open()))
    exp = RunDir(r).read_config()
    splits = exp.data.build(exp.seed)
    own = lab.members[2].predict_dataset(splits.test)
    np.testing.assert_allclose([float(x["probability"]) for x in rows],
                               np.concatenate([o["probability"] for o in own]), rtol=1e-5, atol=1e-6)
    spread = np.std(np.stack([np.concatenate([o["probability"] for o in mem.predict_dataset(splits.test)])
                              for mem in lab.members]), axis=0)
    np.testing.assert_allclose([float(x["uncertainty"]) for x in rows], spread, rtol=1e-4, atol=1e-6)
    assert float(spread.max()) > 0  # the replicas differ: the uncertainty is the ensemble's, not zero
    assert all(int(x["label"]) == int(float(x["probability"]) >= lab.threshold) for x in rows
               if abs(float(x["probability"]) - lab.threshold) > 1e-5)
