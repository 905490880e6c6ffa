"""Calibration (milkit.trust.calibration): monotone, honest about inverted scores, hand-checked targets."""

import numpy as np
import pytest

from milkit.trust.calibration import (SOURCE_PATCH, SOURCE_SLIDE, Calibrator, calibrate_rows, fit_calibrator,
                                      reliability, slide_label_targets)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("logit_input", [False, True])
def test_calibration_is_monotone(seed, logit_input):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    raw = y * rng.normal(1.0, 1.0, 300) + rng.normal(0, 1, 300)
    if logit_input:
        raw = 1 / (1 + np.exp(-raw))
    cal = fit_calibrator(raw, y, logit_input=logit_input)
    grid = np.sort(np.concatenate([raw, rng.uniform(raw.min() - 5, raw.max() + 5, 500)]))
    if logit_input:
        grid = np.clip(grid, 0, 1)
    p = cal(grid)
    assert cal.slope > 0
    assert np.all(np.diff(p) >= 0) and p.min() >= 0 and p.max() <= 1
    assert np.all(np.diff(cal(np.sort(raw))) >= 0)


def test_well_specified_scores_are_recovered():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, 20000)
    p_true = 1 / (1 + np.exp(-(2 * z - 1)))
    y = (rng.uniform(size=z.size) < p_true).astype(int)
    cal = fit_calibrator(z, y)
    grid = np.linspace(-2, 2, 41)
    np.testing.assert_allclose(cal(grid), 1 / (1 + np.exp(-(2 * grid - 1))), atol=0.03)
    assert reliability(y, cal(z))["ece"] < 0.02


def test_inverted_scores_get_a_flat_map_not_a_flipped_one():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    raw = -3.0 * y + rng.normal(0, 1, 400)  # positives score low
    cal = fit_calibrator(raw, y)
    assert cal.slope == 0.0
    p = cal(raw)
    assert np.ptp(p) == 0  # one constant probability …
    assert p[0] == pytest.approx((y.sum() + 1) / (len(y) + 2), abs=0.02)  # … the (smoothed) base rate


def test_slide_label_targets_hand_computed():
    rows = [{"label": 0, "raw": np.array([0.1, 0.2, 0.3])}, {"label": 1, "raw": np.array([0.0, 0.9, 0.4])},
            {"label": 1, "raw": np.array([0.7])}, {"label": 0, "raw": np.array([0.5])}]
    raw, y, w = slide_label_targets(rows)
    np.testing.assert_allclose(raw, [0.1, 0.2, 0.3, 0.5, 0.9, 0.7])
    assert y.tolist() == [0, 0, 0, 0, 1, 1]
    np.testing.assert_allclose(w, [0.25] * 4 + [0.5] * 2)  # classes weighted equally
    cal = calibrate_rows([{**r, "instance_labels": None} for r in rows], logit_input=False)
    assert cal.source == SOURCE_SLIDE and cal.slope > 0 and (cal.n_pos, cal.n_neg) == (2, 4)


def test_patch_labels_are_preferred_and_unknown_labels_skipped():
    rows = [{"label": 1, "raw": np.array([2.0, -1.0, 0.5]), "instance_labels": np.array([1, 0, -1])},
            {"label": 0, "raw": np.array([-2.0, -0.5]), "instance_labels": np.array([0, 0])}]
    cal = calibrate_rows(rows, logit_input=False)
    assert cal.source == SOURCE_PATCH and (cal.n_pos, cal.n_neg) == (1, 3)
    again = Calibrator.from_dict(cal.to_dict())
    np.testing.assert_allclose(again(np.array([-1.0, 0.0, 3.0])), cal(np.array([-1.0, 0.0, 3.0])))


def test_one_class_cannot_calibrate():
    with pytest.raises(ValueError, match="both classes"):
        fit_calibrator(np.array([0.1, 0.2]), np.array([1, 1]))


def test_reliability_hand_computed():
    r = reliability(np.array([0, 1, 1, 1]), np.array([0.05, 0.15, 0.95, 0.85]), n_bins=2)
    # bin [0, .5): predicted 0.1, observed 0.5; bin [.5, 1]: predicted 0.9, observed 1
    np.testing.assert_allclose(r["predicted"], [0.1, 0.9])
    np.testing.assert_allclose(r["observed"], [0.5, 1.0])
    assert r["count"] == [2, 2] and r["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
