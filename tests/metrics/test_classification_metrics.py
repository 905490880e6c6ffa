import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from milkit.metrics.classification import auroc, binary_metrics, choose_threshold


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 0.8, 200)
    m = binary_metrics(y, s, 0.4)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["f1"] == pytest.approx(f1_score(y, s >= 0.4))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, s >= 0.4))


def test_threshold_youden_product_hand_computed():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.6, 0.4, 0.9])
    # candidates: 0.9 → tpr .5 fpr 0 → .5; 0.6 → tpr .5 fpr .5 → .25; 0.4 → tpr 1 fpr .5 → .5 (first max wins: 0.9)
    assert choose_threshold(y, s) == pytest.approx(0.9)
    assert choose_threshold(np.array([0, 1, 1]), np.array([0.2, 0.5, 0.7]), "f1") == pytest.approx(0.5)


def test_single_class_auroc_is_nan_and_threshold_refuses():
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1], [0.2, 0.3])
