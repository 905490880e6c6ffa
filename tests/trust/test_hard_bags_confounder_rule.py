"""The pre-registered "do no harm on validation" rule for the hard-confounded candidates
(`benchmarks.hard_bags.CONFOUNDER_RULE`, issue 11), applied by hand."""

import numpy as np

from milkit.benchmarks.hard_bags import CONFOUNDER_RULE, LEVELS, _scores_path, adoption

BASE, CAND = "pseudo_label (this recipe)", "pseudo_label + within-slide pseudo-labels"
#: validation patches y = [0, 0, 1, 1]: WEAK has F1-best 0.8 and AUROC 0.75; SHARP F1 1 and AUROC 1
WEAK, SHARP = [0.1, 0.6, 0.5, 0.9], [0.1, 0.2, 0.5, 0.9]
#: both AUROC 0.5 (ranked N P P N / P N N P): F1-best 0.8 (threshold 0.5: TP 2, FP 1) / 2/3
MID_F1, LOW_F1 = [0.9, 0.1, 0.6, 0.5], [0.6, 0.5, 0.9, 0.1]


def _keep(out, level, row, seed, val_prob, bag=(0.2, 0.8)):
    p = _scores_path(out, level, row, seed)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, val_prob=np.array(val_prob), val_y=np.array([0, 0, 1, 1]), val_bag_prob=np.array(bag),
             val_bag_y=np.array([0, 1]))


def _both(out, prob_base, prob_cand, seeds=(0, 1, 2)):
    for sd in seeds:
        for level in LEVELS:
            _keep(out, level, BASE, sd, prob_base)
            _keep(out, level, CAND, sd, prob_cand)


def test_rule_covers_every_level_for_auroc_and_the_plain_levels_for_f1():
    clauses = {(m, lv): bar for m, levels, bar in CONFOUNDER_RULE for lv in levels}
    assert len(clauses) == 5 + 5 + 3
    assert clauses[("patch_auroc", "hard-confounded")] == clauses[("slide_auroc", "hard-mimic")] == -0.005
    assert ("patch_f1", "hard-confounded") not in clauses and clauses[("patch_f1", "easy")] == -0.005


def test_equal_passes_and_any_loss_on_one_level_fails(tmp_path):
    _both(tmp_path, WEAK, WEAK)
    assert adoption(tmp_path, CAND, rule=CONFOUNDER_RULE)["adopt"]  # no change = no harm
    # one seed of hard-mimic loses slide AUROC 1 → 0: mean −1/3, the only failing clause
    _keep(tmp_path, "hard-mimic", CAND, 1, WEAK, bag=(0.8, 0.2))
    a = adoption(tmp_path, CAND, rule=CONFOUNDER_RULE)
    assert not a["adopt"]
    assert [(k["metric"], k["level"]) for k in a["clauses"] if not k["ok"]] == [("slide_auroc", "hard-mimic")]


def test_patch_auroc_counts_on_hard_confounded_and_f1_only_on_the_plain_levels(tmp_path):
    _both(tmp_path, SHARP, SHARP)
    for sd in (0, 1, 2):
        _keep(tmp_path, "hard-confounded", CAND, sd, WEAK)  # F1 1 → 0.8 and AUROC 1 → 0.75
    a = adoption(tmp_path, CAND, rule=CONFOUNDER_RULE)
    assert [(k["metric"], k["level"]) for k in a["clauses"] if not k["ok"]] == [("patch_auroc", "hard-confounded")]
    # a lower patch F1 at equal patch AUROC (0.5) on hard-confounded is not a clause: adopted
    _both(tmp_path, SHARP, SHARP)
    for sd in (0, 1, 2):
        _keep(tmp_path, "hard-confounded", BASE, sd, MID_F1)
        _keep(tmp_path, "hard-confounded", CAND, sd, LOW_F1)
    assert adoption(tmp_path, CAND, rule=CONFOUNDER_RULE)["adopt"]
    # the same F1 loss on hard is a clause: not adopted
    for sd in (0, 1, 2):
        _keep(tmp_path, "hard", BASE, sd, MID_F1)
        _keep(tmp_path, "hard", CAND, sd, LOW_F1)
    a = adoption(tmp_path, CAND, rule=CONFOUNDER_RULE)
    assert [(k["metric"], k["level"]) for k in a["clauses"] if not k["ok"]] == [("patch_f1", "hard")]
