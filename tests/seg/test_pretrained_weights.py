"""pretrained_path: a file, 'imagenet' (torchvision download, here faked offline), or None."""

import pytest
import torch
import torchvision

from milkit.models.cam import build_backbone
from milkit.models.sideout import SideOutputNet
from milkit.nn import pretrained


def test_missing_file_is_a_named_error(tmp_path):
    missing = tmp_path / "weights" / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError, match="method.pretrained_path: .*vgg16-397923af.pth does not exist"):
        SideOutputNet(backbone="vgg16", pretrained_path=str(missing))
    with pytest.raises(FileNotFoundError, match="imagenet"):
        build_backbone("resnet18", 2, str(missing))


def test_local_file_is_loaded(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    feats, _ = build_backbone("resnet18", 2, str(path))
    assert torch.equal(feats[0].weight, ref.conv1.weight)


def test_imagenet_downloads_through_torchvision(monkeypatch):
    ref = torchvision.models.vgg16(weights=None)
    seen = {}

    def fake(url, **kw):
        seen["url"], seen["kw"] = url, kw
        return ref.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    net = SideOutputNet(backbone="vgg16", pretrained_path="imagenet")
    assert seen["url"].endswith("vgg16-397923af.pth")
    assert seen["kw"]["weights_only"] is True and seen["kw"]["check_hash"] is True
    assert torch.equal(net.blocks[0][0].weight, ref.features[0].weight)


def test_imagenet_without_internet_is_one_line(monkeypatch):
    def offline(url, **kw):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(OSError) as err:
        build_backbone("resnet18", 4, "imagenet")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("method.pretrained_path: imagenet: cannot download")
    assert "resnet18-f37072fd.pth" in msg


def test_paper_config_without_weights_exits_2_naming_the_option(tmp_path, capsys):
    """A paper config (ImageNet weights required) with no weights file: exit 2, one line."""
    cfg = tmp_path / "ikd.yaml"
    cfg.write_text(
        "seed: 0\n"
        "data: {kind: seg_synthetic, image_size: 32, n_train: 8, n_val: 4, n_test: 4}\n"
        "method: {name: ikd, backbone: vgg16, pretrained_path: " + str(tmp_path / "nope.pth") + "}\n"
        "trainer: {max_epochs: 1, progress_bar: false}\n"
    )
    from milkit.cli import main  # in process: a subprocess would spend ~11 s importing torch and Lightning

    rc = main(["train", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "method.pretrained_path" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written
