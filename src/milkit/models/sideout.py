"""IKD-MIL's side-output segmentation net (IKD-MIL §3.1, Fig. 3).

The first three convolutional blocks of a backbone; after each block a 1×1
convolution gives a one-channel map, bilinearly upsampled to the input size and
passed through a sigmoid (side outputs f_1, f_2, f_3); the fusion is
f_w = Σ_i w_i f_i with learnable weights. Here w = softmax(θ) so that f_w stays a
probability; θ is initialised to w = (0.3, 0.3, 0.4), the released code's fixed
weights (NOTES.md), and ``learn_fusion=False`` keeps them fixed.

Backbones (IKD Table 2: the framework takes any MIL segmentation backbone):
``vgg16`` (torchvision VGG-16 blocks 1–3, the paper's), ``resnet18`` (stem+layer1,
layer2, layer3) and ``vgg_small`` (VGG-style blocks with ``width`` channels and
BatchNorm, for CPU runs). ``pretrained_path``: a local torchvision state dict,
``imagenet`` (torchvision's download) or None (random init); see :mod:`milkit.nn.pretrained`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from milkit.nn.pretrained import load_pretrained

Backbone = Literal["vgg16", "resnet18", "vgg_small"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg_block(cin: int, cout: int, n_convs: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(n_convs):
        layers.append(nn.Conv2d(cin if k == 0 else cout, cout, 3, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def build_blocks(backbone: Backbone, width: int = 16, pretrained_path: str | None = None) -> tuple[nn.ModuleList, list[int]]:
    """Three feature blocks and their output channels."""
    if backbone == "vgg16":
        net = torchvision.models.vgg16(weights=None)
        load_pretrained(net, "vgg16", pretrained_path)
        f = list(net.features.children())
        return nn.ModuleList([nn.Sequential(*f[0:5]), nn.Sequential(*f[5:10]), nn.Sequential(*f[10:17])]), [64, 128, 256]
    if backbone == "resnet18":
        net = torchvision.models.resnet18(weights=None)
        load_pretrained(net, "resnet18", pretrained_path)
        blocks = [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1), net.layer2, net.layer3]
        return nn.ModuleList(blocks), [64, 128, 256]
    if backbone == "vgg_small":
        if pretrained_path:
            raise ValueError("backbone 'vgg_small' has no ImageNet weights; drop pretrained_path")
        ch = [width, 2 * width, 4 * width]
        return nn.ModuleList([_vgg_block(3, ch[0], 2, True), _vgg_block(ch[0], ch[1], 2, True), _vgg_block(ch[1], ch[2], 3, True)]), ch
    raise ValueError(f"unknown side-output backbone {backbone!r}; use vgg16, resnet18 or vgg_small")


@dataclass
class SideOutputs:
    """Side-output probabilities (3 × (B, H, W)) and their fusion (B, H, W)."""

    sides: list[Tensor]
    fused: Tensor


class SideOutputNet(nn.Module):
    """Backbone blocks → 1×1 conv per block → bilinear upsampling → sigmoid; learnable fusion."""

    def __init__(
        self,
        backbone: Backbone = "vgg16",
        width: int = 16,
        pretrained_path: str | None = None,
        fusion_init: tuple[float, float, float] = (0.3, 0.3, 0.4),
        learn_fusion: bool = True,
        normalize: bool = True,
    ):
        super().__init__()
        self.blocks, channels = build_blocks(backbone, width, pretrained_path)
        self.heads = nn.ModuleList([nn.Conv2d(c, 1, kernel_size=1) for c in channels])
        if len(fusion_init) != len(channels) or min(fusion_init) <= 0:
            raise ValueError(f"fusion_init needs {len(channels)} positive weights, got {fusion_init}")
        theta = torch.tensor([math.log(w) for w in fusion_init], dtype=torch.float32)
        self.fusion_logits = nn.Parameter(theta, requires_grad=learn_fusion)
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def fusion_weights(self) -> Tensor:
        """w = softmax(θ) (sums to one)."""
        return torch.softmax(self.fusion_logits, dim=0)

    def forward(self, x: Tensor) -> SideOutputs:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"SideOutputNet takes images (B, 3, H, W), got {tuple(x.shape)}")
        size = x.shape[-2:]
        h = (x - self.mean) / self.std if self.normalize else x
        sides = []
        for block, head in zip(self.blocks, self.heads):
            h = block(h)
            logit = F.interpolate(head(h), size=size, mode="bilinear", align_corners=False)
            sides.append(torch.sigmoid(logit[:, 0]))
        w = self.fusion_weights
        fused = sum(wi * f for wi, f in zip(w, sides))
        return SideOutputs(sides=sides, fused=fused)  # type: ignore[arg-type]

    def segment(self, x: Tensor) -> tuple[None, Tensor]:
        """Segmentation-net protocol: no image head (the labeler takes the map's max)."""
        return None, self.forward(x).fused
