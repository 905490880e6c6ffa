"""Instance encoders: one instance (a patch or a feature vector) → one embedding.

- ``lenet5``: the LeNet-5 variant of Ilse et al. (2018) used for MNIST-bags in
  Distill-to-Label §III-B: conv(20,5)–ReLU–maxpool–conv(50,5)–ReLU–maxpool–FC(500)–ReLU.
- ``identity`` / ``linear`` / ``linear_bn`` / ``linear_ln``: for pre-extracted features (N, D);
  ``linear_ln`` normalises each instance alone (LayerNorm), so a bag's score does not
  depend on which other instances share its batch, as it does with ``linear_bn``.
- ``d2l_colon`` / ``d2l_breast``: Distill-to-Label §IV encoders (milkit.nn.d2l_encoders).
- ``alexnet_cifar``: WENO §4.3's AlexNet for CIFAR-10-MIL, as the authors' released code
  builds it for 32-px images: five 3×3 conv–BN–ReLU layers (96, 192, 384, 384, 192) with
  3×3/2 max-pooling after the 1st, 2nd and 5th, then FC 4096–ReLU–FC 4096–ReLU.
  ``alexnet_cifar_conv`` is the conv part alone (192·3·3 = 1728-d on 32 px): the part
  the released code shares between teacher and student, whose FC 4096–4096 layers sit
  in each branch (WENO's ``teacher_trunk`` / ``student_hidden``).
- ``resnet18``: WENO §4.3's ResNet-18 for the other datasets (torchvision, no pre-training
  as §4.3 says; the 512-d pooled features).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from milkit.config import StrictModel


class EncoderConfig(StrictModel):
    """Which encoder and its sizes."""

    name: Literal["lenet5", "identity", "linear", "linear_bn", "linear_ln", "d2l_colon", "d2l_breast", "small_cnn",
                  "alexnet_cifar", "alexnet_cifar_conv", "resnet18"] = "lenet5"
    in_channels: int = Field(1, ge=1, description="image channels (patch encoders)")
    image_size: int = Field(28, ge=8, description="patch side in pixels (patch encoders)")
    in_dim: int | None = Field(None, ge=1, description="feature size (feature encoders)")
    out_dim: int | None = Field(None, ge=1, description="embedding size; LeNet-5 default 500 (Ilse et al.)")
    dropout: float = Field(0.0, ge=0, lt=1)


class LeNet5(nn.Module):
    """Ilse et al.'s LeNet-5 feature extractor (AttentionDeepMIL), D2L §III-B."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, out_dim: int = 500, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet-5 needs patches of at least 16 px, got {image_size}")
        self.fc = nn.Sequential(nn.Linear(50 * side * side, out_dim), nn.ReLU(), nn.Dropout(dropout))
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


class SmallCNN(nn.Module):
    """A tiny 3-block CNN for RGB patches (tests, quick experiments)."""

    def __init__(self, in_channels: int = 3, out_dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, out_dim, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AlexNetCIFAR(nn.Module):
    """WENO §4.3's AlexNet for 32-px CIFAR-10 instances (released-code layout, see module doc)."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, out_dim: int = 4096, dropout: float = 0.0,
                 fc: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for width, pool in ((96, True), (192, True), (384, False), (384, False), (192, True)):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(3, 2))
            c = width
        self.features = nn.Sequential(*layers)
        side = image_size
        for _ in range(3):
            side = (side - 3) // 2 + 1
        if side < 1:
            raise ValueError(f"alexnet_cifar needs patches of at least 15 px, got {image_size}")
        if fc:
            self.fc: nn.Module = nn.Sequential(nn.Linear(c * side * side, out_dim), nn.ReLU(), nn.Dropout(dropout),
                                               nn.Linear(out_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))
            self.out_dim = out_dim
        else:  # conv features only (the released code's shared part)
            self.fc = nn.Identity()
            self.out_dim = c * side * side

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


def resnet18_encoder(in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18 without its classifier (512-d), randomly initialised (WENO §4.3)."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


def build_encoder(cfg: EncoderConfig) -> tuple[nn.Module, int]:
    """The encoder named by ``cfg`` and its output size."""
    if cfg.name == "lenet5":
        out = cfg.out_dim or 500
        return LeNet5(cfg.in_channels, cfg.image_size, out, cfg.dropout), out
    if cfg.name == "small_cnn":
        out = cfg.out_dim or 64
        return SmallCNN(cfg.in_channels, out), out
    if cfg.name == "alexnet_cifar":
        out = cfg.out_dim or 4096
        return AlexNetCIFAR(cfg.in_channels, cfg.image_size, out, cfg.dropout), out
    if cfg.name == "alexnet_cifar_conv":
        if cfg.out_dim is not None:
            raise ValueError("encoder 'alexnet_cifar_conv' is the conv part only: its size follows image_size; drop out_dim")
        enc = AlexNetCIFAR(cfg.in_channels, cfg.image_size, fc=False)
        return enc, enc.out_dim
    if cfg.name == "resnet18":
        if cfg.out_dim not in (None, 512):
            raise ValueError(f"encoder 'resnet18' gives 512-d features; out_dim {cfg.out_dim} is not possible")
        return resnet18_encoder(cfg.in_channels), 512
    if cfg.name in ("identity", "linear", "linear_bn", "linear_ln"):
        if cfg.in_dim is None:
            raise ValueError(f"encoder {cfg.name!r} needs 'in_dim' (the feature size)")
        if cfg.name == "identity":
            return nn.Identity(), cfg.in_dim
        out = cfg.out_dim or 512
        layers: list[nn.Module] = [nn.Linear(cfg.in_dim, out)]
        if cfg.name == "linear_bn":
            layers.append(nn.BatchNorm1d(out))
        elif cfg.name == "linear_ln":
            layers.append(nn.LayerNorm(out))
        layers += [nn.ReLU(), nn.Dropout(cfg.dropout)]
        return nn.Sequential(*layers), out
    if cfg.name in ("d2l_colon", "d2l_breast"):
        from milkit.nn import d2l_encoders

        cls = d2l_encoders.ColonEncoder if cfg.name == "d2l_colon" else d2l_encoders.BreastEncoder
        enc = cls(in_channels=cfg.in_channels, image_size=cfg.image_size, out_dim=cfg.out_dim or 512, dropout=cfg.dropout)
        return enc, enc.out_dim
    raise ValueError(f"unknown encoder {cfg.name!r}")


def infer_out_dim(encoder: nn.Module, example: Tensor) -> int:
    """Output size of ``encoder`` on one example instance."""
    with torch.no_grad():
        return int(encoder(example[:1]).shape[-1])
