"""The validation rule that decides whether a `pseudo_label` candidate row of `milkit benchmark
hard-bags` becomes the default (docs/benchmarks.md "hard-bags easy/medium patch F1"), by hand."""

import numpy as np
import pytest

from milkit.benchmarks.hard_bags import _scores_path, adoption, validation_metrics

BASE, CAND = "pseudo_label (this recipe)", "pseudo_label + own features"
#: validation patches y = [0, 0, 1, 1]: [0.1, 0.6, 0.5, 0.9] has F1-best threshold 0.5 (TP 2, FP 1:
#: F1 0.8) and AUROC 3/4; [0.1, 0.2, 0.5, 0.9] separates them (F1 1, AUROC 1)
WEAK, SHARP = [0.1, 0.6, 0.5, 0.9], [0.1, 0.2, 0.5, 0.9]


def _keep(out, level, row, seed, val_prob, bag=(0.2, 0.8)):
    p = _scores_path(out, level, row, seed)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, val_prob=np.array(val_prob + [0.99]), val_y=np.array([0, 0, 1, 1, -1]),  # the unlabelled patch is left out
             val_bag_prob=np.array(bag), val_bag_y=np.array([0, 1]))


def test_validation_metrics_by_hand(tmp_path):
    _keep(tmp_path, "easy", BASE, 0, WEAK)
    _keep(tmp_path, "easy", BASE, 1, SHARP, bag=(0.8, 0.2))
    m = validation_metrics(tmp_path, "easy", BASE, [0, 1])
    assert m[0] == pytest.approx({"patch_f1": 0.8, "patch_auroc": 0.75, "slide_auroc": 1.0})
    assert m[1] == pytest.approx({"patch_f1": 1.0, "patch_auroc": 1.0, "slide_auroc": 0.0})
    with pytest.raises(FileNotFoundError, match="no kept scores for easy / pseudo_label \\(this recipe\\) / seed 2"):
        validation_metrics(tmp_path, "easy", BASE, [2])


def test_adoption_needs_every_clause(tmp_path):
    for seed in (0, 1):
        for level in ("easy", "medium", "hard"):
            _keep(tmp_path, level, BASE, seed, WEAK)
            _keep(tmp_path, level, CAND, seed, SHARP)
    a = adoption(tmp_path, CAND, seeds=(0, 1))
    assert a["adopt"] and len(a["clauses"]) == 2 + 3 + 3
    f1_easy = next(k for k in a["clauses"] if (k["metric"], k["level"]) == ("patch_f1", "easy"))
    assert f1_easy["diff"] == pytest.approx(0.2) and f1_easy["baseline"] == pytest.approx(0.8)
    assert not adoption(tmp_path, BASE, baseline=CAND, seeds=(0, 1))["adopt"]  # the other way round: F1 −0.2
    # better F1 on easy and medium but a lower hard patch AUROC (mean 0.875 vs 1.0): not adopted, and the
    # failing clause is the hard AUROC one only
    for seed in (0, 1):
        _keep(tmp_path, "hard", BASE, seed, SHARP)
    _keep(tmp_path, "hard", CAND, 1, WEAK)
    a = adoption(tmp_path, CAND, seeds=(0, 1))
    assert not a["adopt"]
    assert [(k["metric"], k["level"]) for k in a["clauses"] if not k["ok"]] == [("patch_auroc", "hard")]
    # a gain of exactly the bar passes (+0.010 F1), a hair less does not
    rule = (("patch_f1", ("easy",), 0.2),)
    assert adoption(tmp_path, CAND, seeds=(0, 1), rule=rule)["adopt"]
    assert not adoption(tmp_path, CAND, seeds=(0, 1), rule=(("patch_f1", ("easy",), 0.2001),))["adopt"]
