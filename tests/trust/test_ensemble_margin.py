"""choose_labels' ``margin`` (issue 11 hard-confounded): with ``spread`` a replica replaces the ensemble only
when the ensemble is below the median replica by more than the replicas' spread (population sd) of that
validation metric; by hand."""

import numpy as np
import pytest

from milkit.benchmarks.hard_bags import ensemble_metrics
from milkit.trust.ensemble import MARGIN, choose_labels

Y6 = np.array([0, 0, 0, 1, 1, 1])


def _m(prob, y=Y6) -> dict:
    return {"prob": np.array(prob, float), "y": np.array(y), "bag_prob": np.array([0.3, 0.7]), "bag_y": np.array([0, 1])}


#: patch AUROC (of 9 pairs) 2/9, 4/9, 5/9: median 4/9, spread sd(2, 4, 5)/9 = 0.13858; their mean
#: (negatives 0.733, 0.3, 0.667; positives 0.5, 0.433, 0.533) has AUROC 3/9: below the median by 1/9 = 0.111,
#: less than the spread. Patch F1 (F1-best thresholds): replicas 2/3, 2/3, 3/4, the mean 3/4 ≥ the median 2/3.
P = [[0.5, 0.4, 0.8, 0.6, 0.1, 0.3], [0.8, 0.4, 0.7, 0.1, 0.5, 0.9], [0.9, 0.1, 0.5, 0.8, 0.7, 0.4]]


def test_a_gap_inside_the_seed_spread_keeps_the_ensemble_only_with_margin_spread():
    plain = choose_labels([_m(p) for p in P])
    assert plain["val"]["ensemble"]["patch_auroc"] == pytest.approx(3 / 9)
    assert [r["patch_auroc"] for r in plain["val"]["replicas"]] == pytest.approx([2 / 9, 4 / 9, 5 / 9])
    assert plain["val"]["seed_spread"]["patch_auroc"] == pytest.approx(np.std([2, 4, 5]) / 9)
    assert plain["below_median_on"] == ["patch_auroc"] and plain["used"] == "seed-2"  # best: F1 3/4, AUROC 5/9
    assert plain["margin"] == "none" == MARGIN  # the default is unchanged
    spread = choose_labels([_m(p) for p in P], margin="spread")
    assert spread["below_median_on"] == [] and spread["used"] == "ensemble" and spread["margin"] == "spread"
    assert "by more than the seed spread" in spread["rule"] and "seed spread" not in plain["rule"].split(";")[0]


def test_a_gap_beyond_the_spread_still_picks_the_best_replica():
    # y = [0, 0, 1, 1]: A, B perfect (F1 1, AUROC 1), C poor (F1 2/3, AUROC 3/8); their mean has F1 0.8 and
    # AUROC 3/4. F1 spread sd(1, 1, 2/3) = 0.157: 0.8 < 1 − 0.157 → below; AUROC spread 0.295: 0.75 > 0.705 → not
    y = [0, 0, 1, 1]
    a, b, c = _m([0.1, 0.2, 0.3, 0.4], y), _m([0.2, 0.1, 0.35, 0.3], y), _m([0.9, 0.1, 0.1, 0.6], y)
    rec = choose_labels([a, b, c], margin="spread")
    assert rec["val"]["seed_spread"]["patch_f1"] == pytest.approx(np.std([1, 1, 2 / 3]))
    assert rec["below_median_on"] == ["patch_f1"] and rec["used"] == "seed-0"
    assert choose_labels([a, b, c])["below_median_on"] == ["patch_f1", "patch_auroc"]


def test_identical_replicas_and_a_bad_margin():
    same = [_m(P[0])] * 3
    assert choose_labels(same, margin="spread")["used"] == "ensemble"  # spread 0: a tie, as before
    with pytest.raises(ValueError, match="margin must be one of none, spread"):
        choose_labels(same, margin="wide")


def test_the_benchmark_passes_the_margin_through():
    members = [{"val_prob": np.array(p, float), "val_y": Y6, "val_bag_prob": np.array([0.3, 0.7]),
                "val_bag_y": np.array([0, 1]), "test_prob": np.array(p, float), "test_y": Y6,
                "test_bag_prob": np.array([0.3, 0.7]), "test_bag_y": np.array([0, 1])} for p in P]
    assert ensemble_metrics(members)["used"] == "seed-2"
    e = ensemble_metrics(members, margin="spread")
    assert e["used"] == "ensemble" and e["patch_auroc"] == pytest.approx(3 / 9)
