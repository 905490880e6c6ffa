"""U-Net upper bound and All-ones lower bound; SegLabeler post-processing and outputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from milkit.config import ConfigError, build_experiment
from milkit.methods.seg_base import SegLabeler, gaussian_blur
from milkit.workflow import train_run

DATA = {"kind": "seg_synthetic", "image_size": 32, "n_train": 32, "n_val": 8, "n_test": 12,
        "min_radius": 0.15, "max_radius": 0.25}


class _Const(torch.nn.Module):
    def segment(self, x):
        m = torch.zeros(x.shape[0], *x.shape[-2:])
        m[:, 10:20, 10:20] = 0.9
        return None, m


def test_labeler_blur_threshold_and_image_prob():
    lab = SegLabeler(_Const(), threshold=0.5, blur_sigma=0.0)
    p_img, p_pix = lab(torch.rand(2, 3, 32, 32))
    assert p_img.tolist() == pytest.approx([0.9, 0.9])  # max of the map
    assert int(lab.mask(p_pix)[0].sum()) == 100
    blurred = SegLabeler(_Const(), threshold=0.5, blur_sigma=3.0)
    _, q = blurred(torch.rand(1, 3, 32, 32))
    assert float(q[0, 15, 15]) < 0.9 and float(q[0, 0, 0]) < float(q[0, 15, 15])
    assert torch.allclose(gaussian_blur(torch.ones(1, 8, 8), 2.0), torch.ones(1, 8, 8), atol=1e-5)
    with pytest.raises(TypeError, match="segment"):
        SegLabeler(torch.nn.Linear(2, 2))


def test_unknown_baseline_is_a_config_error():
    with pytest.raises(ConfigError, match="baseline"):
        build_experiment({"data": DATA, "method": {"name": "segmentation_baseline", "baseline": "nope"}})


def test_unet_upper_bound_beats_all_ones(tmp_path):
    trainer = {"max_epochs": 6, "batch_size": 8, "lr": 3e-3, "progress_bar": False, "log_every_n_steps": 1}
    ones = train_run(build_experiment({"data": DATA, "method": {"name": "segmentation_baseline",
                                       "baseline": "all_ones"}, "trainer": trainer}), tmp_path / "a")["all_ones"]["test"]
    unet = train_run(build_experiment({"data": DATA, "method": {"name": "segmentation_baseline", "baseline": "unet",
                                       "unet_width": 8}, "trainer": trainer}), tmp_path / "u")["unet"]["test"]
    assert ones["f1_neg"] == 0.0 and ones["classification_error"] == pytest.approx(0.5)
    assert unet["f1_neg"] > 0.8
    assert unet["f1_pos_on_pos"] > ones["f1_pos_on_pos"] + 0.2
    assert unet["confusion"]["tn"] > ones["confusion"]["tn"]
    # All-ones labels: a probability map that is white everywhere (16-bit PNG)
    from milkit.workflow import label_run

    paths = label_run(tmp_path / "a", tmp_path / "lab", None, "test", None)
    prob = [p for p in paths if p.parent.name == "prob"][0]
    arr = np.asarray(Image.open(prob))
    assert arr.dtype == np.uint16 or arr.max() == 65535
