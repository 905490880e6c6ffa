"""The seed ensemble's threshold (``trainer.ensemble_threshold``, milkit.trust.ensemble, issue 11 §3):
the median of the replicas' own validation thresholds by default; the ensemble's own F1-best
threshold as the option; no patch labels → the ensemble keeps its own; a bad value is one line."""

import json

import numpy as np
import pytest
import yaml

from milkit.cli import main
from milkit.config import Experiment
from milkit.trust.ensemble import (BASIS_PATCH, BASIS_SLIDE, ENSEMBLE_THRESHOLD, choose_labels, choose_stage,
                                   seed_median_threshold)

Y = np.array([0, 0, 0, 1, 1, 0, 1, 0])


def _m(prob) -> dict:
    return {"prob": np.array(prob, float), "y": Y, "bag_prob": np.array([0.3, 0.7]), "bag_y": np.array([0, 1])}


def test_median_of_the_replicas_own_thresholds_by_hand():
    # F1-best thresholds by hand: replica 0 separates at 0.6 (F1 1), replica 1 at 0.5, replica 2 at 0.2
    members = [_m([0.1, 0.2, 0.3, 0.6, 0.7, 0.4, 0.9, 0.5]), _m([0.1, 0.2, 0.3, 0.5, 0.8, 0.4, 0.6, 0.45]),
               _m([0.05, 0.1, 0.15, 0.2, 0.3, 0.1, 0.25, 0.12])]
    rec = choose_labels(members)
    assert rec["basis"] == BASIS_PATCH
    assert [r["threshold"] for r in rec["val"]["replicas"]] == pytest.approx([0.6, 0.5, 0.2])
    assert seed_median_threshold(rec) == pytest.approx(0.5)
    assert ENSEMBLE_THRESHOLD == "median_of_seeds"
    # an even number of replicas: the mean of the middle two
    rec2 = choose_labels(members[:2])
    assert seed_median_threshold(rec2) == pytest.approx(0.55)


def test_no_patch_labels_or_a_missing_threshold_keeps_the_ensembles_own():
    assert seed_median_threshold({"basis": BASIS_SLIDE, "val": {"replicas": [{"threshold": 0.3}]}}) is None
    assert seed_median_threshold({"basis": BASIS_PATCH, "val": {"replicas": [{"threshold": None},
                                                                             {"threshold": 0.2}]}}) is None


def test_a_bad_value_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="trainer.ensemble_threshold"):
        choose_stage(None, None, None, "mil", "f1", 0, "mean")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="ensemble_threshold"):
        Experiment.model_validate({"data": {"kind": "spatial_bags"}, "method": {"name": "mil"},
                                   "trainer": {"ensemble_threshold": "mean"}})


TINY = {
    "seed": 0,
    "data": {"kind": "spatial_bags", "n_train": 24, "n_val": 16, "n_test": 12, "min_side": 5, "max_side": 6,
             "feature_dim": 8, "signal": 3.0},
    "method": {"name": "mil", "encoder": {"name": "linear", "in_dim": 8, "out_dim": 8}},
    "trainer": {"max_epochs": 2, "lr": 0.005, "progress_bar": False, "accelerator": "cpu", "devices": 1, "seeds": 3},
}


@pytest.mark.parametrize("how", ["median_of_seeds", "ensemble"])
def test_the_run_labels_at_the_threshold_it_records(tmp_path, how):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "trainer": {**TINY["trainer"], "ensemble_threshold": how}}))
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 0
    thr = json.loads((tmp_path / "r" / "stages" / "mil" / "threshold.json").read_text())
    rec = thr["ensemble"]
    # seed 0 of this config: validation keeps the ensemble (the replica path is tests/trust/test_ensemble_choice.py)
    assert rec["used"] == "ensemble" and rec["below_median_on"] == []
    seeds = [r["threshold"] for r in rec["val"]["replicas"]]
    assert thr["ensemble_threshold"] == how
    if how == "median_of_seeds":
        assert thr["threshold"] == pytest.approx(float(np.median(seeds))) and thr["seed_thresholds"] == pytest.approx(seeds)
    else:
        assert thr["threshold"] == pytest.approx(rec["val"]["ensemble"]["threshold"]) and "seed_thresholds" not in thr
    page = (tmp_path / "r" / "report.html").read_text()
    assert ("median over the seeds of their own validation thresholds" in page) == (how == "median_of_seeds")
