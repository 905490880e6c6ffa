"""Pixel metrics against hand-computed masks (metrics/pixel.py)."""

import math

import numpy as np
import pytest

from milkit.metrics.pixel import PixelMetricAccumulator, dice, hausdorff, image_level, image_metrics, iou


def _masks():
    truth = np.zeros((4, 4), np.uint8)
    truth[0:2, 0:2] = 1  # 4 pixels
    pred = np.zeros((4, 4), np.uint8)
    pred[0:2, 1:3] = 1  # 4 pixels, 2 overlap
    return pred, truth


def test_dice_iou_hand_computed():
    pred, truth = _masks()
    m = image_metrics(pred, truth)
    assert m["f1_pos"] == pytest.approx(2 * 2 / (4 + 4))
    # background: truth 12 px, pred 12 px, overlap 10
    assert m["f1_neg"] == pytest.approx(2 * 10 / 24)
    assert m["iou"] == pytest.approx(2 / 6)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 2, 2, 10)
    assert m["positive"] and m["f1"] == m["f1_pos"]


def test_empty_conventions_and_negative_image():
    z = np.zeros((3, 3))
    assert dice(z, z) == 1.0 and iou(z, z) == 1.0
    pred = np.zeros((3, 3))
    pred[0, 0] = 1
    m = image_metrics(pred, z)
    assert not m["positive"]
    assert m["f1_pos"] == 0.0
    assert m["f1_neg"] == pytest.approx(2 * 8 / (9 + 8))
    assert m["f1"] == m["f1_neg"]  # IKD's F1 on a negative image is the background F1
    assert math.isnan(m["hd"])
    # IoU on a normal image is the background IoU (truth 9 px, pred 8 px, all inside): 8/9
    assert m["iou"] == m["iou_bg"] == pytest.approx(8 / 9)
    assert m["iou_fg"] == 0.0


def test_hausdorff_hand_computed():
    truth = np.zeros((5, 5))
    truth[0, 0] = 1
    pred = np.zeros((5, 5))
    pred[0, 0] = 1
    pred[3, 4] = 1  # farthest predicted pixel from the truth: distance 5
    assert hausdorff(pred, truth) == pytest.approx(5.0)
    assert hausdorff(pred, truth, borders=False) == pytest.approx(5.0)
    assert hausdorff(np.zeros((5, 5)), truth) == pytest.approx(math.hypot(5, 5))  # empty prediction


def test_all_ones_has_zero_background_f1():
    _, truth = _masks()
    m = image_metrics(np.ones_like(truth), truth)
    assert m["f1_neg"] == 0.0
    assert m["f1_pos"] == pytest.approx(2 * 4 / (16 + 4))


def test_accumulator_averages_per_image_and_confusion():
    pred, truth = _masks()
    acc = PixelMetricAccumulator()
    acc.add(pred, truth, 1, 0.9)
    acc.add(np.zeros((4, 4)), np.zeros((4, 4)), 0, 0.7)
    s = acc.summary()
    assert s["f1_pos_all"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["f1_pos"] == s["f1_pos_on_pos"] == pytest.approx(0.5)  # F1+ on tumour images only
    assert s["hd_pos"] == pytest.approx(hausdorff(pred, truth))
    assert s["confusion"]["tn"] == 10 + 16
    assert s["classification_error"] == pytest.approx(0.5)  # the negative scored 0.7
    assert s["image_auroc"] == pytest.approx(1.0)


def test_shape_errors_and_image_level():
    with pytest.raises(ValueError, match="shape"):
        image_metrics(np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="2-D"):
        image_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))
    out = image_level([0, 1, 1], [0.2, 0.4, 0.9])
    assert out["classification_error"] == pytest.approx(1 / 3)


def test_hausdorff_is_between_borders_not_filled_regions():
    # truth: the square [2:18, 2:18] with a 2×2 hole at [9:11, 9:11]; prediction: the
    # filled square. Filled sets: every hole pixel is 1 px from the truth → HD = 1.
    # Borders: the hole's rim (e.g. (8, 9)) is 6 px from the square's outer rim (row 2).
    truth = np.zeros((20, 20), np.uint8)
    truth[2:18, 2:18] = 1
    truth[9:11, 9:11] = 0
    pred = np.zeros((20, 20), np.uint8)
    pred[2:18, 2:18] = 1
    assert hausdorff(pred, truth, borders=False) == pytest.approx(1.0)
    assert hausdorff(pred, truth) == pytest.approx(6.0)
    assert image_metrics(pred, truth)["hd"] == pytest.approx(6.0)


def test_iou_as_f1_tumour_and_normal_images():
    pred, truth = _masks()
    acc = PixelMetricAccumulator()
    acc.add(pred, truth)  # tumour image: IoU+ = 2/6
    neg_pred = np.zeros((4, 4))
    neg_pred[0, 0:2] = 1  # normal image, 2 false-positive pixels: IoU− = 14/16, IoU+ = 0
    acc.add(neg_pred, np.zeros((4, 4)))
    s = acc.summary()
    assert s["iou"] == pytest.approx((2 / 6 + 14 / 16) / 2)
    assert s["iou_pos"] == pytest.approx(2 / 6)
    assert s["iou_neg"] == pytest.approx(14 / 16)
    assert s["iou_fg"] == pytest.approx((2 / 6 + 0.0) / 2)
