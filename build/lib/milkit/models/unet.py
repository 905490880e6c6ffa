"""A small U-Net (Ronneberger et al. 2015) trained with masks: the fully supervised
upper bound of Max-Min Tables 1–2 and IKD Table 1 (CAC-Unet's role).

``depth`` down/up levels of two 3×3 conv + BatchNorm + ReLU, ``width`` channels at
the first level doubling per level, skip connections, a 1×1 conv to one logit.
Input sides need not be multiples of 2^depth (decoder features are resized).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Image (B, 3, H, W) in [0, 1] → pixel logits (B, H, W)."""

    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        if depth < 1:
            raise ValueError(f"U-Net depth must be >= 1, got {depth}")
        ch = [width * 2**k for k in range(depth + 1)]
        self.down = nn.ModuleList([_double_conv(3, ch[0])] + [_double_conv(ch[k], ch[k + 1]) for k in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[k + 1], ch[k], 2, stride=2) for k in reversed(range(depth))])
        self.dec = nn.ModuleList([_double_conv(2 * ch[k], ch[k]) for k in reversed(range(depth))])
        self.head = nn.Conv2d(ch[0], 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"UNet takes images (B, 3, H, W), got {tuple(x.shape)}")
        skips = []
        h = x - 0.5
        for k, block in enumerate(self.down):
            h = block(h if k == 0 else F.max_pool2d(h, 2, ceil_mode=True))
            skips.append(h)
        h = skips.pop()
        for up, dec in zip(self.up, self.dec):
            skip = skips.pop()
            h = up(h)
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = dec(torch.cat([skip, h], dim=1))
        return self.head(h)[:, 0]

    def segment(self, x: Tensor) -> tuple[None, Tensor]:
        """Segmentation-net protocol: pixel probabilities; image probability = the map's max."""
        return None, torch.sigmoid(self.forward(x))
