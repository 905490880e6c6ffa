"""Shapes, gradients and local-weight loading of the CAM / Deep-MIL pixel baselines."""

from __future__ import annotations

import pytest
import torch
import torchvision

from milkit.models.cam import CAM_MODELS, build_backbone, build_cam_model, lse_pool


@pytest.mark.parametrize("name", sorted(CAM_MODELS))
def test_every_baseline_shapes_and_gradients(name):
    torch.manual_seed(0)
    net = build_cam_model(name, backbone="resnet18", stages=2)
    x = torch.randn(2, 3, 32, 40)
    out = net(x)
    assert out.logits.shape == (2, 2) and out.image_logit.shape == (2,)
    assert out.pixel_map.shape == (2, 32, 40)
    assert out.pixel_map.min() >= 0 and out.pixel_map.max() <= 1 + 1e-6
    loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1]))
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert out.pixel_map.shape == (2, 32, 40) and not out.logits.requires_grad


def test_vgg_backbone_deep_mil():
    torch.manual_seed(0)
    net = build_cam_model("deep_mil", backbone="vgg16", stages=2)
    out = net(torch.randn(1, 3, 32, 32))
    assert out.cams.shape == (1, 1, 8, 8)  # two VGG blocks: stride 4
    assert out.cams.sum().item() == pytest.approx(1.0, abs=1e-5)  # attention over cells sums to one


def test_lse_pool_limits():
    m = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert lse_pool(m, 1e-4).item() == pytest.approx(2.5, abs=1e-3)  # r → 0: average
    assert lse_pool(m, 200.0).item() == pytest.approx(4.0 - torch.log(torch.tensor(4.0)).item() / 200, abs=1e-4)


def test_grad_cam_is_relu_of_gradient_weighted_features():
    torch.manual_seed(0)
    net = build_cam_model("grad_cam", backbone="resnet18", stages=1, cam_class="positive").eval()
    x = torch.randn(1, 3, 16, 16)
    from milkit.models.cam import imagenet_normalise

    feats = net.features(imagenet_normalise(x)).detach()
    w = (net.fc.weight[1] - net.fc.weight[0]).detach() / (feats.shape[2] * feats.shape[3])
    expected = torch.relu((w[None, :, None, None] * feats).sum(1))
    with torch.no_grad():
        out = net(x)
    assert torch.allclose(out.cams[:, 0], expected, atol=1e-5)


def test_local_weights_are_loaded_and_bad_files_named(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), path)
    feats, ch = build_backbone("resnet18", 4, str(path))
    assert ch == 512 and torch.equal(feats[0].weight, ref.conv1.weight)
    bad = tmp_path / "bad.pt"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pt"):
        build_backbone("resnet18", 4, str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_backbone("resnet18", 4, str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("alexnet")
    with pytest.raises(ValueError, match="unknown pixel baseline"):
        build_cam_model("cam_median")


def test_local_vgg_weights_are_loaded(tmp_path):
    torch.manual_seed(2)
    from torchvision.models.vgg import cfgs, make_layers

    feats = make_layers(cfgs["D"])
    path = tmp_path / "vgg16.pt"
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)
    net, ch = build_backbone("vgg16", 3, str(path))
    assert ch == 256 and torch.equal(net[0].weight, feats[0].weight)
