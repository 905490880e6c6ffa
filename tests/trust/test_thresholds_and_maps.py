"""F1 thresholds by default (named in every output) and probability maps on one fixed scale."""

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from milkit.config import TrainerConfig
from milkit.metrics.classification import choose_threshold
from milkit.slide.outputs import SlideScores, read_instances_h5, write_slide_outputs


def test_f1_youden_and_product_criteria_hand_computed():
    y = np.array([0, 0, 0, 0, 0, 0, 1, 0, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 0.9])
    # at 0.65: tpr 1, fpr 2/8 → product 0.75, J 0.75; at 0.9: tpr 0.5, fpr 0 → 0.5, 0.5
    assert choose_threshold(y, s, "youden_product") == pytest.approx(0.65)
    assert choose_threshold(y, s, "youden") == pytest.approx(0.65)
    y2, s2 = np.array([0, 0, 1, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    # F1: ≥.3 → TP 3, FP 1: 6/7 = .857 (best); ≥.5 → 4/5 = .8; ≥.2 → 6/8; ≥.4 → 4/6
    assert choose_threshold(y2, s2, "f1") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="criterion"):
        choose_threshold(y, s, "accuracy")
    assert TrainerConfig().threshold_criterion == "f1" and TrainerConfig().seeds == 1


def test_rare_positives_f1_threshold_is_higher_and_scores_better_f1():
    """Issue 11 §4: tpr·(1−fpr) picks low thresholds when positives are rare."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(2000, int), np.ones(40, int)]
    s = np.r_[rng.normal(0, 1, 2000), rng.normal(2.5, 1, 40)]
    t_f1, t_yp = choose_threshold(y, s, "f1"), choose_threshold(y, s, "youden_product")
    assert t_f1 > t_yp + 0.5
    assert f1_score(y, s >= t_f1) > f1_score(y, s >= t_yp) + 0.1


def _slide(prob: np.ndarray, raw: np.ndarray, unc=None) -> SlideScores:
    n = int(np.sqrt(len(prob)))
    xs, ys = np.meshgrid(np.arange(n) * 64, np.arange(n) * 64)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    return SlideScores(slide_id="neg", coords=coords, scores=raw, labels=(prob >= 0.5).astype(int), threshold=0.5,
                       score_kind="score", size_level0=64, stride_level0=64, level0_size=(64 * n, 64 * n), mpp=0.5,
                       bag_prob=0.05, probability=prob, uncertainty=unc, threshold_criterion="f1",
                       calibration="validation patch labels")


def test_negative_slide_looks_cold_on_the_fixed_scale(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.normal(0, 3, 64)  # raw scores that a per-slide normalisation would stretch to [0, 1]
    prob = np.full(64, 0.02)
    s = _slide(prob, raw)
    thumb = np.full((128, 128, 3), 230, np.uint8)
    paths = write_slide_outputs(tmp_path, s, thumb, 4.0)
    assert {p.name for p in paths} >= {"instances.csv", "instances.h5", "probability.tif", "heatmap.png",
                                       "review.geojson", "detections.geojson"}
    with tifffile.TiffFile(tmp_path / "neg" / "probability.tif") as tif:
        page = tif.pages[0]
        desc = json.loads(page.description)
        v = page.asarray()
    assert desc["scale"] == [0.0, 1.0] and desc["value"] == "calibrated probability"
    assert v.max() == 1 + round(254 * 0.02)  # every patch cold, none stretched to 255
    img = np.asarray(Image.open(tmp_path / "neg" / "heatmap.png").convert("RGB")).astype(int)
    assert img.shape[1] > 128  # the colour bar sits beside the thumbnail
    over = img[:128, :128]
    assert (over[..., 2] - over[..., 0]).mean() > 20  # blue, not red
    back = read_instances_h5(tmp_path / "neg" / "instances.h5")
    np.testing.assert_allclose(back.probability, prob, atol=1e-6)
    assert back.uncertainty is None and back.threshold_criterion == "f1"
    import h5py

    with h5py.File(tmp_path / "neg" / "instances.h5") as f:
        assert f.attrs["uncertainty"].startswith("unavailable")
    rows = (tmp_path / "neg" / "instances.csv").read_text().splitlines()
    assert rows[0] == "slide_id,x,y,score,probability,uncertainty,label,criterion"
    assert rows[1].split(",")[5] == "" and rows[1].endswith(",f1")


def test_slide_review_regions_follow_the_seed_spread(tmp_path):
    prob = np.full(64, 0.3)
    unc = np.zeros(64)
    unc[[9, 10]] = 0.25  # two neighbouring patches
    write_slide_outputs(tmp_path, _slide(prob, prob, unc), None, 1.0)
    fc = json.loads((tmp_path / "neg" / "review.geojson").read_text())
    assert "seed spread" in fc["properties"]["basis"]
    top = fc["features"][0]
    assert top["properties"]["measurements"]["n_patches"] == 2
    assert top["properties"]["measurements"]["review_score_mean"] == pytest.approx(0.25)
