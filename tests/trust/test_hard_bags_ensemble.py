"""The ensemble column of ``milkit benchmark hard-bags`` (issue 11 §3): the seeds' kept
calibrated probabilities averaged by the product's rule, thresholded on validation, by hand."""

import numpy as np
import pytest

from milkit.benchmarks.hard_bags import SCORE_KEYS, ensemble_cell, ensemble_metrics, ensemble_table, save_scores
from milkit.trust.ensemble import ensemble_probability


def _member(val_prob, test_prob, val_bag, test_bag) -> dict:
    return {"val_prob": np.array(val_prob), "val_y": np.array([0, 0, 1, 1]),
            "val_bag_prob": np.array(val_bag), "val_bag_y": np.array([0, 1]),
            "test_prob": np.array(test_prob), "test_y": np.array([0, 1, 0, 1, -1]),
            "test_bag_prob": np.array(test_bag), "test_bag_y": np.array([0, 1])}


#: ensemble (mean) validation probabilities [0.2, 0.3, 0.4, 0.7]: F1 = 1 at threshold 0.4;
#: test [0.3, 0.45, 0.5, 0.7] (+ an unlabelled patch): AUROC 3/4, F1 at 0.4 = 2·2/(2·2+1) = 0.8;
#: test bags [0.4, 0.5]: slide AUROC 1 (member A alone: 0)
A = _member([0.1, 0.4, 0.35, 0.8], [0.2, 0.6, 0.6, 0.9, 0.9], [0.1, 0.9], [0.6, 0.4])
B = _member([0.3, 0.2, 0.45, 0.6], [0.4, 0.3, 0.4, 0.5, 0.0], [0.3, 0.7], [0.2, 0.6])


def test_ensemble_metrics_by_hand():
    e = ensemble_metrics([A, B])
    assert e["threshold"] == pytest.approx(0.4)
    assert e["patch_auroc"] == pytest.approx(0.75)
    assert e["patch_f1_run"] == pytest.approx(0.8)
    assert e["slide_auroc"] == pytest.approx(1.0)
    assert e["n"] == 2 and e["criterion"] == "f1"


def test_an_ensemble_of_identical_seeds_scores_as_one_seed():
    one, three = ensemble_metrics([A]), ensemble_metrics([A, A, A])
    for k in ("patch_auroc", "slide_auroc", "patch_f1_run", "threshold"):
        assert three[k] == pytest.approx(one[k])
    mean, spread = ensemble_probability([A["test_prob"]] * 3)
    np.testing.assert_allclose(mean.numpy(), A["test_prob"])
    assert float(spread.abs().max()) == 0.0


def test_members_on_different_data_are_refused():
    other = {**B, "test_y": np.array([1, 1, 0, 1, -1])}
    with pytest.raises(ValueError, match="test ys"):
        ensemble_metrics([A, other])


class _Lab:
    """A stand-in labeler: labels with the rows' probability, as a calibrated run does."""

    def label_values(self, row):
        return row["probability"]


def _rows(member: dict, split: str) -> list[dict]:
    p, y = member[f"{split}_prob"], member[f"{split}_y"]
    cut = len(p) // 2
    parts = [(p[:cut], y[:cut]), (p[cut:], y[cut:])]
    return [{"probability": pp, "scores": pp, "instance_labels": yy, "bag_prob": float(member[f"{split}_bag_prob"][i]),
             "label": int(member[f"{split}_bag_y"][i])} for i, (pp, yy) in enumerate(parts)]


def test_ensemble_cell_reads_the_kept_scores_and_compares_with_the_median_seed(tmp_path):
    for seed, m in ((0, A), (1, B)):
        save_scores(tmp_path / "scores" / "hard" / f"ABMIL_s{seed}.npz", _Lab(), _rows(m, "val"), _rows(m, "test"))
    with np.load(tmp_path / "scores" / "hard" / "ABMIL_s0.npz") as z:
        assert set(z.files) == set(SCORE_KEYS) | {"val_slide", "test_slide"}
        np.testing.assert_allclose(z["test_prob"], A["test_prob"])
        cut = len(A["test_prob"]) // 2  # each patch's slide: the two halves of _rows
        np.testing.assert_array_equal(z["test_slide"], np.repeat([0, 1], [cut, len(A["test_prob"]) - cut]))
    cell = {"0": {"patch_auroc": 0.6, "slide_auroc": 0.0, "patch_f1_run": 0.5, "run_threshold_source": "validation:f1"},
            "1": {"patch_auroc": 0.8, "slide_auroc": 1.0, "patch_f1_run": 0.7},
            "2": {"error": "ValueError: a failed seed has no scores"}}
    e = ensemble_cell(tmp_path, "hard", "ABMIL", cell)
    assert e["seeds"] == [0, 1]  # the failed seed is left out
    assert e["median_seed"] == pytest.approx({"patch_auroc": 0.7, "slide_auroc": 0.5, "patch_f1_run": 0.6})
    assert e["ensemble"]["patch_auroc"] == pytest.approx(0.75) and e["ensemble"]["patch_f1_run"] == pytest.approx(0.8)
    assert ensemble_cell(tmp_path, "hard", "ABMIL", {"0": cell["0"]}) is None  # one seed: no ensemble
    md = ensemble_table({"ABMIL": e})
    assert "| ABMIL | 2 | ensemble | 0.700 / 0.750 / +0.050 |" in md
    assert "in 0 of 3 cells with the rule; the plain ensemble in 0" in md


def test_ensemble_metrics_applies_the_products_validation_rule(monkeypatch):
    """The benchmark calls ``trust.ensemble.choose_labels`` itself (no second implementation): where
    validation prefers a replica, the numbers are that replica's, at its own validation threshold."""
    from milkit.trust import ensemble

    def mem(val_prob, test_prob) -> dict:
        return {"val_prob": np.array(val_prob), "val_y": np.array([0, 0, 1, 1]), "val_bag_prob": np.array([0.3, 0.7]),
                "val_bag_y": np.array([0, 1]), "test_prob": np.array(test_prob), "test_y": np.array([0, 1, 0, 1]),
                "test_bag_prob": np.array([0.4, 0.6]), "test_bag_y": np.array([0, 1])}

    # validation as in test_ensemble_choice: the mean is below the median replica → with the median
    # fallback seed-1 (B) labels (with the default, best, seed-0);
    # B's validation F1 threshold is 0.3 (its two positives 0.35, 0.3 above both negatives 0.2, 0.1):
    # test [0.1, 0.5, 0.3, 0.25] (labels 0 1 0 1) → at 0.3 one TP, one FP, one FN: F1 1/2; AUROC 3/4
    a = mem([0.1, 0.2, 0.3, 0.4], [0.9, 0.1, 0.1, 0.1])
    b = mem([0.2, 0.1, 0.35, 0.3], [0.1, 0.5, 0.3, 0.25])
    c = mem([0.9, 0.1, 0.1, 0.6], [0.5, 0.5, 0.5, 0.5])
    calls = []
    real = ensemble.choose_labels
    monkeypatch.setattr(ensemble, "choose_labels", lambda *a, **k: calls.append(1) or real(*a, **k))
    e = ensemble_metrics([a, b, c], fallback="median")
    assert calls == [1]
    assert e["used"] == "seed-1" and e["choice"]["below_median_on"] == ["patch_f1", "patch_auroc"]
    assert e["threshold"] == pytest.approx(0.3)
    assert e["patch_f1_run"] == pytest.approx(0.5) and e["patch_auroc"] == pytest.approx(0.75)
    assert e["slide_auroc"] == pytest.approx(1.0)
    # the plain ensemble, for the record, at the median of the replicas' thresholds (0.3, 0.3 and c's 0.1:
    # everything positive gives c its best F1, 2/3) — or, as an option, at its own F1-best 0.25
    assert [r["threshold"] for r in e["choice"]["val"]["replicas"]] == pytest.approx([0.3, 0.3, 0.1])
    assert e["mean_of_seeds"]["threshold"] == pytest.approx(0.3)
    own = ensemble_metrics([a, b, c], fallback="median", ensemble_threshold="ensemble")
    assert own["mean_of_seeds"]["threshold"] == pytest.approx(0.25) and own["threshold"] == pytest.approx(0.3)
    assert ensemble_metrics([a, b, c])["used"] == "seed-0"
    assert ensemble_metrics([A, B])["used"] == "ensemble"  # the hand-computed pair above: the mean wins
