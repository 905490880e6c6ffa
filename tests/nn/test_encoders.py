"""Instance encoders: output sizes, the WENO encoders' layouts, clear errors."""

import pytest
import torch

from milkit.nn.encoders import EncoderConfig, build_encoder


@pytest.mark.parametrize("cfg, shape, dim", [
    ({"name": "lenet5", "in_channels": 1, "image_size": 28}, (3, 1, 28, 28), 500),
    ({"name": "small_cnn", "in_channels": 3}, (3, 3, 27, 27), 64),
    ({"name": "alexnet_cifar", "in_channels": 3, "image_size": 32, "out_dim": 64}, (3, 3, 32, 32), 64),
    ({"name": "resnet18", "in_channels": 3}, (3, 3, 64, 64), 512),
    ({"name": "linear", "in_dim": 10, "out_dim": 7}, (3, 10), 7),
    ({"name": "linear_ln", "in_dim": 10, "out_dim": 7}, (3, 10), 7),
])
def test_encoder_output_size(cfg, shape, dim):
    torch.manual_seed(0)
    enc, out = build_encoder(EncoderConfig(**cfg))
    enc.eval()
    assert out == dim
    assert enc(torch.randn(*shape)).shape == (shape[0], dim)


def test_alexnet_cifar_follows_weno_layout():
    enc, out = build_encoder(EncoderConfig(name="alexnet_cifar", in_channels=3, image_size=32))
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 192, 384, 384, 192]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert out == 4096 and enc.fc[0].in_features == 192 * 3 * 3  # 32 → 15 → 7 → 3 after three 3×3/2 pools


def test_encoder_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 15 px"):
        build_encoder(EncoderConfig(name="alexnet_cifar", image_size=8))
    with pytest.raises(ValueError, match="512-d"):
        build_encoder(EncoderConfig(name="resnet18", out_dim=128))
    with pytest.raises(ValueError, match="in_dim"):
        build_encoder(EncoderConfig(name="linear"))


def test_linear_ln_scores_an_instance_the_same_in_any_batch():
    torch.manual_seed(0)
    enc, _ = build_encoder(EncoderConfig(name="linear_ln", in_dim=6, out_dim=5))
    enc.train()
    x = torch.randn(8, 6)
    assert torch.allclose(enc(x)[:3], enc(x[:3]), atol=1e-6)
