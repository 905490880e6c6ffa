"""CAM baselines take the predicted class's CAM by default (issue 12); the segmentation
baseline monitors classification error by default."""

import pytest
import torch
from torch import nn

from milkit.methods.seg_baselines import SegBaselineConfig, CamBaselineOptions
from milkit.models.cam import CAMNet, GradCAMNet, class_map


def test_class_map_hand_computed():
    cams = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 3.0)])[None]  # (1, 2, 2, 2)
    logits = torch.tensor([[2.0, 0.0]])  # class 0 predicted
    assert torch.equal(class_map(cams, logits, "predicted"), cams[:, 0])
    assert torch.equal(class_map(cams, logits, "positive"), cams[:, 1])
    p = torch.softmax(logits, -1)[0]
    assert torch.allclose(class_map(cams, logits, "posterior"), (p[0] * 1.0 + p[1] * 3.0).expand(1, 2, 2))
    with pytest.raises(ValueError, match="cam_class"):
        class_map(cams, logits, "largest")


def _toy_cam(cam_class):
    """Identity features; class 0's map = +channel 0, class 1's map = −channel 0."""
    net = CAMNet("avg", backbone="resnet18", stages=1, cam_class=cam_class)
    net.features = nn.Identity()
    net.head = nn.Conv2d(3, 2, kernel_size=1, bias=False)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.weight[0, 0] = 1.0
        net.head.weight[1, 0] = -1.0
    return net.eval()


def _spot_image():
    x = torch.full((1, 3, 8, 8), 0.9)  # bright: class 0's map is positive on average → class 0 predicted
    x[0, 0, 2:4, 2:4] = 1.0  # the brightest spot: class 0's evidence
    return x


def test_predicted_class_map_marks_the_class0_evidence():
    x = _spot_image()
    out = _toy_cam("predicted")(x)
    assert int(out.logits.argmax()) == 0
    assert float(out.pixel_map[0, 2:4, 2:4].mean()) > 0.9  # the spot is the top of the predicted map
    old = _toy_cam("positive")(x)  # the class-1 map (the old behaviour) puts the spot at the bottom
    assert float(old.pixel_map[0, 2:4, 2:4].mean()) < 0.1


def test_grad_cam_follows_the_predicted_class():
    torch.manual_seed(0)
    net = GradCAMNet(stages=1, cam_class="predicted")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        net.fc.bias.copy_(torch.tensor([50.0, -50.0]))  # both images predicted class 0
    pred = net(x)
    pos = GradCAMNet(stages=1, cam_class="positive")
    pos.load_state_dict(net.state_dict())
    ref = pos(x)
    # class 0's Grad-CAM is ReLU of the negated class-1 combination: different maps
    assert not torch.allclose(pred.pixel_map, ref.pixel_map)
    with torch.no_grad():
        net.fc.bias.copy_(torch.tensor([-50.0, 50.0]))  # now class 1 predicted: same as positive
        pos.fc.bias.copy_(torch.tensor([-50.0, 50.0]))
    assert torch.allclose(net(x).pixel_map, pos(x).pixel_map, atol=1e-6)


def test_defaults():
    assert CamBaselineOptions().cam_class == "predicted"
    c = SegBaselineConfig()
    assert (c.monitor, c.monitor_mode) == ("val/classification_error", "min")


def test_monitor_mode_follows_the_monitor_unless_given():
    # a config that names a score monitor without a mode must not keep the worst epoch
    assert SegBaselineConfig(monitor="val/f1").monitor_mode == "max"
    assert SegBaselineConfig(monitor="val/image_auroc").monitor_mode == "max"
    assert SegBaselineConfig(monitor="val/classification_error").monitor_mode == "min"
    assert SegBaselineConfig(monitor="val/f1", monitor_mode="min").monitor_mode == "min"


def test_unet_benchmark_config_keeps_its_best_f1():
    from pathlib import Path

    from milkit.config import load_experiment

    root = Path(__file__).resolve().parents[2] / "configs" / "segmentation_benchmark"
    m = load_experiment(root / "unet.yaml").method
    assert (m.monitor, m.monitor_mode) == ("val/f1", "max")
