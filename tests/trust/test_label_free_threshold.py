"""The instance threshold without validation patch labels (trainer.label_free_threshold): top_patch is
0.5; sure_positives separates the positive-slide patches above every negative-slide patch from the
negative slides; select_threshold records which rule was used and falls back to 0.5 when it cannot."""

from __future__ import annotations

import types

import numpy as np
import pytest

from milkit.config import ConfigError, build_experiment
from milkit.methods.base import select_threshold
from milkit.trust.calibration import label_free_threshold, sure_positive_targets
from milkit.trust.verdict import label_free_threshold_notice


def _rows(*slides):
    return [{"label": y, "probability": np.array(v, float), "scores": np.array(v, float), "instance_labels": None}
            for y, v in slides]


ROWS = _rows((0, [0.1, 0.2, 0.3]), (0, [0.05, 0.25]), (1, [0.35, 0.9, 0.95, 0.15]), (1, [0.28, 0.8]))
LAB = types.SimpleNamespace(threshold_on="probability", label_values=lambda r: r["probability"])


def test_sure_positive_targets_by_hand():
    vals = [{"label": r["label"], "v": r["probability"]} for r in ROWS]
    raw, y, w = sure_positive_targets(vals, "v")
    assert sorted(raw[y == 1]) == [0.35, 0.8, 0.9, 0.95]  # above the negative slides' max 0.3
    assert sorted(raw[y == 0]) == [0.05, 0.1, 0.2, 0.25, 0.3]
    assert w[y == 1].sum() == pytest.approx(1) and w[y == 0].sum() == pytest.approx(1)
    # a positive slide with nothing above the negatives still gives its top patch (MIL: at least one)
    raw, y, _ = sure_positive_targets([{"label": 0, "v": np.array([0.5])}, {"label": 1, "v": np.array([0.2, 0.4])}], "v")
    assert raw[y == 1].tolist() == [0.4]


def test_sure_positives_threshold_separates_them_and_top_patch_is_one_half():
    thr = label_free_threshold(ROWS, LAB.label_values, "sure_positives")
    values = np.concatenate([r["probability"] for r in ROWS])
    # Platt puts one half between the two target groups: above every negative-slide patch, at or below
    # the median sure positive, and on one of the values (labels are value >= threshold)
    assert 0.3 < thr <= 0.9 and thr in values
    # more sure positives lower in the gap pull it down; more negatives near the top push it up
    lower = label_free_threshold(ROWS + _rows((1, [0.32, 0.33, 0.34])), LAB.label_values, "sure_positives")
    assert lower <= thr
    assert label_free_threshold(ROWS, LAB.label_values, "top_patch") == 0.5
    with pytest.raises(ValueError, match="trainer.label_free_threshold must be one of"):
        label_free_threshold(ROWS, LAB.label_values, "median")


def test_select_threshold_records_the_rule_and_falls_back_without_both_classes_of_slides():
    info = select_threshold(LAB, None, rows=ROWS, label_free="sure_positives")
    assert info["source"] == "slide labels:sure_positives (no validation instance labels)"
    assert info["criterion"] == "none (no validation instance labels)" and 0.3 < info["threshold"] <= 0.9
    assert select_threshold(LAB, None, rows=ROWS)["source"].startswith("default:0.5")
    only_pos = _rows((1, [0.2, 0.9]), (1, [0.4]))
    info = select_threshold(LAB, None, rows=only_pos, label_free="sure_positives")
    assert info["threshold"] == 0.5 and info["source"] == (
        "default:0.5 (no validation instance labels; sure_positives needs negative and positive validation slides)")
    assert label_free_threshold(only_pos, LAB.label_values, "sure_positives") is None
    with_labels = [{**r, "instance_labels": (r["probability"] > 0.5).astype(int)} for r in ROWS]
    assert select_threshold(LAB, None, rows=with_labels, label_free="sure_positives")["source"] == "validation:f1"


def test_notice_says_which_rule_and_the_config_key_is_checked(tmp_path):
    top = {"threshold": {"source": "default:0.5 (no validation instance labels)"}}
    sure = {"threshold": {"source": "slide labels:sure_positives (no validation instance labels)"}}
    assert "try trainer.label_free_threshold=sure_positives" in label_free_threshold_notice({"mil": top})
    assert "look-alikes" in label_free_threshold_notice({"mil": sure})
    with pytest.raises(ConfigError, match="trainer.label_free_threshold"):
        build_experiment({"data": {"kind": "spatial_bags"}, "method": {"name": "mil"},
                          "trainer": {"label_free_threshold": "median"}})


def test_hard_bags_label_free_f1_hides_the_validation_patch_labels():
    from milkit.benchmarks.hard_bags import label_free_f1

    rng = np.random.default_rng(0)

    def slide(y, n=40):
        inst = np.zeros(n, int)
        if y:
            inst[:8] = 1
        raw = rng.normal(size=n) + 3.0 * inst
        return {"label": y, "raw": raw, "scores": raw, "calibration_input": None, "instance_labels": inst}

    val, test = [slide(i % 2) for i in range(10)], [slide(i % 2) for i in range(10)]
    lab = types.SimpleNamespace(score_kind="score")
    f = label_free_f1(lab, val, test)
    assert set(f) == {"top_patch", "sure_positives"} and all(0 < v <= 1 for v in f.values())
    # the validation patch labels are not used: scrambling them changes nothing
    scrambled = [{**r, "instance_labels": rng.permutation(r["instance_labels"])} for r in val]
    assert label_free_f1(lab, scrambled, test) == f
    # with large, well-ranked lesions (8 of 40 patches, 3 sd) taking the sure positives labels more of them
    assert f["sure_positives"] > f["top_patch"]
    assert label_free_f1(lab, [r for r in val if r["label"] == 1], test) == {"top_patch": None, "sure_positives": None}
