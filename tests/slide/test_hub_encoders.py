"""Foundation-model presets (milkit.slide.hub_encoders) against a stand-in timm module: the hub id and
the model card's create_model arguments reach timm, the embedding is read off the output as the card
says, weights files must fit every key, and a hub failure is one line naming the card. No download."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from milkit.slide.extract import IMAGENET_MEAN, build_patch_encoder
from milkit.slide.hub_encoders import HUB_ENCODERS


class _FakeViT(nn.Module):
    """Token or pooled output of the preset's width; 5 prefix tokens (class + 4 registers) as Virchow2."""

    def __init__(self, width: int, tokens: bool):
        super().__init__()
        self.proj = nn.Linear(3, width)
        self.tokens, self.num_prefix_tokens = tokens, 5

    def forward(self, x):
        t = self.proj(x.mean((2, 3)))[:, None, :] * torch.arange(1, 262, dtype=x.dtype)[None, :, None]
        return t if self.tokens else t[:, 0]


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        if "fail" in name:
            raise RuntimeError("401 Client Error: gated repo")
        spec = next(s for s in HUB_ENCODERS.values() if s.hub_id == name)
        tokens = spec.embedding == "cls+mean"
        return _FakeViT(spec.dim // 2 if tokens else spec.dim, tokens)

    swiglu = type("SwiGLUPacked", (), {})
    mod = types.SimpleNamespace(create_model=create_model, layers=types.SimpleNamespace(SwiGLUPacked=swiglu))
    monkeypatch.setitem(sys.modules, "timm", mod)
    return calls, swiglu


@pytest.mark.parametrize("name", sorted(HUB_ENCODERS))
def test_every_preset_reaches_timm_with_its_card_arguments_and_gives_its_feature_size(fake_timm, name):
    calls, swiglu = fake_timm
    enc = build_patch_encoder(name, "imagenet")
    spec = HUB_ENCODERS[name]
    hub, pretrained, kwargs = calls[-1]
    assert hub == spec.hub_id and pretrained is True and enc.name == f"{name}:hub"
    assert enc.dim == spec.dim and enc.input_size == 224
    for k, v in spec.kwargs.items():  # the layer names became the layer classes
        assert kwargs[k] is {"SwiGLUPacked": swiglu, "SiLU": torch.nn.SiLU}.get(v, v) if isinstance(v, str) else kwargs[k] == v
    assert build_patch_encoder(name, "none").name == f"{name}:none" and calls[-1][1] is False


def test_card_specifics(fake_timm):
    calls, swiglu = fake_timm
    build_patch_encoder("uni")
    assert calls[-1][2] == {"init_values": 1e-5, "dynamic_img_size": True}
    u2 = build_patch_encoder("uni2-h")
    assert calls[-1][2]["reg_tokens"] == 8 and calls[-1][2]["mlp_layer"] is swiglu and u2.dim == 1536
    h = build_patch_encoder("h-optimus-0")
    assert h.mean == (0.707223, 0.578729, 0.703617) and h.std == (0.211883, 0.230117, 0.177517)
    assert build_patch_encoder("gigapath").mean == IMAGENET_MEAN


def test_virchow2_embedding_is_class_token_beside_the_mean_of_the_patch_tokens(fake_timm):
    enc = build_patch_encoder("virchow2")
    x = torch.rand(2, 3, 224, 224)
    tokens = enc.model.vit(x)  # (2, 261, 1280): class, 4 registers, 256 patch tokens
    want = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1)
    torch.testing.assert_close(enc.model(x), want)
    assert want.shape == (2, 2560)


def test_weights_file_must_fit_every_key(fake_timm, tmp_path):
    good = build_patch_encoder("uni", "none").model.state_dict()
    torch.save(good, tmp_path / "uni.pth")
    build_patch_encoder("uni", str(tmp_path / "uni.pth"))
    torch.save({**good, "extra.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth: does not fit the encoder \(0 missing keys.*1 unexpected"):
        build_patch_encoder("uni", str(tmp_path / "bad.pth"))


def test_hub_failure_is_one_line_naming_the_card(fake_timm, monkeypatch):
    monkeypatch.setitem(HUB_ENCODERS, "uni", HUB_ENCODERS["uni"].__class__("hf-hub:fail/uni", 1024, "https://card"))
    with pytest.raises(ValueError, match=r"encoder 'uni': could not load hf-hub:fail/uni \(RuntimeError: 401.*"
                                         r"accept the licence at https://card"):
        build_patch_encoder("uni")


def test_without_timm_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ValueError, match=r"encoder 'virchow2' needs timm"):
        build_patch_encoder("virchow2")
