"""Max-Min fidelity fixes (issue 12): Camelyon16 masks without min–max, footnote 5's
classifier learning rate, F1+ on tumour patches only."""

from pathlib import Path

import numpy as np
import pytest
import torch

from milkit.config import TrainerConfig, load_experiment
from milkit.losses.maxmin import foreground_mask, pseudo_binary_mask
from milkit.methods.maxmin import MaxMinModule, classifier_lr
from milkit.metrics.pixel import PixelMetricAccumulator
from milkit.models.maxmin import MaxMinNet

ROOT = Path(__file__).resolve().parents[2] / "configs"


def _normal_patch_cams():
    # a normal patch: both class maps negative everywhere (no tumour evidence anywhere)
    cams = -torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) - 0.5
    logits = torch.tensor([[2.0, -2.0]])
    return cams, logits


def test_min_max_forces_a_foreground_pixel_on_every_image():
    cams, logits = _normal_patch_cams()
    m = foreground_mask(cams, logits, (8, 8), sigma=0.15, omega=5.0, normalisation="image")
    # the top pixel normalises to 1 → sigmoid(5·(1 − 0.15)) = 0.986: never an empty mask
    assert float(m.max()) == pytest.approx(float(pseudo_binary_mask(torch.tensor(1.0))), abs=1e-4)
    assert bool((m >= 0.5).any())


def test_camelyon_reading_lets_a_normal_patch_be_empty():
    cams, logits = _normal_patch_cams()
    m = foreground_mask(cams, logits, (8, 8), sigma=0.0, omega=5.0, normalisation="none")
    assert not bool((m >= 0.5).any())
    # and it is sigmoid(ω·CAM) of the upsampled posterior-weighted CAM
    p = torch.softmax(logits, -1)
    raw = torch.einsum("bc,bchw->bhw", p, cams)
    up = torch.nn.functional.interpolate(raw[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(m, torch.sigmoid(5.0 * up))


def test_camelyon_configs_use_the_raw_cam_and_footnote_5():
    for name in ("camelyon16_eem", "camelyon16_sem"):
        c = load_experiment(ROOT / "maxmin" / f"{name}.yaml").method
        assert (c.mask_normalisation, c.sigma, c.classifier_lr_mult, c.classifier_lr_max) == ("none", 0.0, 10.0, 0.01)
    g = load_experiment(ROOT / "maxmin" / "glas_eem.yaml").method
    assert (g.mask_normalisation, g.sigma, g.classifier_lr_mult) == ("image", 0.15, 1.0)


def test_classifier_lr_hand_computed():
    assert classifier_lr(1e-3, 10.0, 0.01) == pytest.approx(0.01)
    assert classifier_lr(5e-4, 10.0, 0.01) == pytest.approx(5e-3)
    assert classifier_lr(5e-3, 10.0, 0.01) == pytest.approx(0.01)  # capped
    assert classifier_lr(0.05, 10.0, 0.01) == pytest.approx(0.05)  # never below the base lr
    assert classifier_lr(1e-3, 1.0, 0.01) == pytest.approx(1e-3)


def test_module_gives_the_classifier_head_its_own_lr():
    net = MaxMinNet(stages=1, modalities=2)
    cfg = TrainerConfig(optimizer="sgd", lr=1e-3, lr_milestones=[2], lr_gamma=0.1)
    mod = MaxMinModule(net, lambda m, b: None, cfg, schedule=(10.0, 1.1, 30.0), classifier_lr=(10.0, 0.01))
    out = mod.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-2])
    head = {id(p) for p in net.classifier_head.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == head
    assert not head & {id(p) for p in opt.param_groups[0]["params"]}
    n_all = sum(1 for _ in net.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == n_all
    for _ in range(2):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-3])  # the halfway ÷10 applies to both
    plain = MaxMinModule(net, lambda m, b: None, cfg, schedule=(5.0, 1.0, 5.0)).configure_optimizers()
    assert len(plain["optimizer"].param_groups) == 1


def test_f1_pos_is_reported_on_tumour_patches_only():
    acc = PixelMetricAccumulator()
    t = np.zeros((4, 4), np.uint8)
    t[:2, :2] = 1
    acc.add(t, t)  # a perfect tumour patch
    p = np.zeros((4, 4), np.uint8)
    p[0, 0] = 1
    acc.add(p, np.zeros((4, 4), np.uint8))  # a normal patch with one false-positive pixel
    s = acc.summary()
    assert s["f1_pos"] == pytest.approx(1.0)  # was (1 + 0) / 2 over all patches
    assert s["f1_pos_all"] == pytest.approx(0.5)
