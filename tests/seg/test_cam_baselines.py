"""The CAM / Deep-MIL entries of the segmentation-baseline registry build, train and reload."""

from __future__ import annotations

import pytest
import torch

from milkit.config import ConfigError, build_experiment
from milkit.methods.seg_baselines import BASELINES, SegBaselineMethod
from milkit.workflow import evaluate_run, train_run

MINE = ["cam_avg", "cam_max", "cam_lse", "wildcat", "grad_cam", "deep_mil", "resnet_mil", "vgg_mil"]
DATA = {"kind": "seg_synthetic", "image_size": 32, "n_train": 8, "n_val": 4, "n_test": 4}


@pytest.mark.parametrize("name", MINE)
def test_entry_builds_a_segmentation_net(name):
    exp = build_experiment({"data": DATA, "method": {"name": "segmentation_baseline", "baseline": name,
                                                     "options": {"backbone_stages": 2}}})
    net = SegBaselineMethod(exp)._build()
    p_img, p_pix = net.segment(torch.rand(2, 3, 32, 32))
    assert p_img.shape == (2,) and p_pix.shape == (2, 32, 32)
    assert 0 <= float(p_img.min()) <= float(p_img.max()) <= 1
    assert BASELINES[name].loss is not None and not BASELINES[name].train_with_masks


def test_bad_option_is_named():
    exp = build_experiment({"data": DATA, "method": {"name": "segmentation_baseline", "baseline": "wildcat",
                                                     "options": {"kmaxx": 0.2}}})
    with pytest.raises(ValueError, match="kmaxx"):
        SegBaselineMethod(exp)._build()


def test_wildcat_trains_and_reloads(tmp_path):
    exp = build_experiment({
        "data": DATA,
        "method": {"name": "segmentation_baseline", "baseline": "wildcat", "monitor": "val/classification_error",
                   "monitor_mode": "min", "options": {"backbone_stages": 1, "modalities": 2, "color_jitter": None}},
        "trainer": {"max_epochs": 1, "batch_size": 4, "progress_bar": False, "log_every_n_steps": 1},
    })
    m = train_run(exp, tmp_path / "wc")["wildcat"]["test"]
    assert m["n_images"] == 4 and m["f1_neg"] is not None
    assert evaluate_run(tmp_path / "wc")["wildcat"]["test"]["f1_neg"] == pytest.approx(m["f1_neg"])
    with pytest.raises(ConfigError, match="baseline"):
        build_experiment({"data": DATA, "method": {"name": "segmentation_baseline", "baseline": "cam_median"}})
