"""WILDCAT pooling (Durand et al., CVPR 2017), as used by Max-Min uncertainty §3.3(a).

Three steps turn a feature map into class scores and class activation maps (CAMs):

1. *multi-map transfer*: a 1×1 convolution maps D features to C·M maps, M "modalities"
   per class (Durand §3.1);
2. *class-wise pooling*: the M modalities of each class are averaged → C CAMs
   (Durand Eq. 1);
3. *spatial pooling*: score_c = mean of the k⁺ highest cells + α · mean of the k⁻
   lowest cells (Durand Eq. 2). k⁺/k⁻ below 1 are fractions of the cells, ≥ 1 counts.

``dropout`` follows the WILDCAT code used by the Max-Min authors: during training a
random fraction of the spatial cells is left out of the top/bottom-k selection.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _k_of(k: float, n: int) -> int:
    """Number of cells selected: a fraction of ``n`` when ``k < 1`` (at least one), else ``k``."""
    if k <= 0:
        return 0
    if k < 1:
        return max(1, int(math.ceil(k * n)))
    return min(int(round(k)), n)


def wildcat_spatial_pool(
    maps: Tensor,
    kmax: float,
    kmin: float = 0.0,
    alpha: float = 1.0,
    keep: Tensor | None = None,
) -> Tensor:
    """Durand Eq. 2 on class maps ``maps`` (B, C, h, w) → scores (B, C).

    ``keep`` (B, h·w) bool, optional: cells allowed in the selection (spatial dropout).
    """
    if maps.dim() != 4:
        raise ValueError(f"wildcat_spatial_pool expects maps of shape (B, C, h, w), got {tuple(maps.shape)}")
    b, c, h, w = maps.shape
    flat = maps.reshape(b, c, h * w)
    n = h * w
    n_keep = n
    if keep is not None:
        n_keep = int(keep.sum(dim=1).min().item())
    k_hi = _k_of(kmax, n_keep)
    k_lo = _k_of(kmin, n_keep)
    if k_hi == 0:
        raise ValueError(f"kmax={kmax} selects no cell of a {h}x{w} map")
    big = torch.finfo(flat.dtype).max
    hi_src = flat if keep is None else flat.masked_fill(~keep[:, None, :], -big)
    score = hi_src.topk(k_hi, dim=-1).values.mean(dim=-1)
    if k_lo > 0 and alpha != 0:
        lo_src = flat if keep is None else flat.masked_fill(~keep[:, None, :], big)
        score = score + alpha * lo_src.topk(k_lo, dim=-1, largest=False).values.mean(dim=-1)
    return score


class WildcatPool(nn.Module):
    """Class-wise pooling of M modalities + spatial kmax/kmin pooling (Durand Eqs. 1–2)."""

    def __init__(self, n_classes: int, modalities: int = 5, kmax: float = 0.3, kmin: float = 0.0,
                 alpha: float = 0.6, dropout: float = 0.1):
        super().__init__()
        if n_classes < 1 or modalities < 1:
            raise ValueError(f"WildcatPool needs n_classes >= 1 and modalities >= 1, got {n_classes}, {modalities}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WildcatPool dropout must be in [0, 1), got {dropout}")
        self.n_classes = n_classes
        self.modalities = modalities
        self.kmax, self.kmin, self.alpha, self.dropout = kmax, kmin, alpha, dropout

    def class_maps(self, maps: Tensor) -> Tensor:
        """(B, C·M, h, w) → (B, C, h, w): average of each class's M modalities (Durand Eq. 1)."""
        b, cm, h, w = maps.shape
        if cm != self.n_classes * self.modalities:
            raise ValueError(f"expected {self.n_classes * self.modalities} maps (C·M), got {cm}")
        return maps.reshape(b, self.n_classes, self.modalities, h, w).mean(dim=2)

    def forward(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C·M, h, w) → (scores (B, C), CAMs (B, C, h, w))."""
        cams = self.class_maps(maps)
        keep = None
        if self.training and self.dropout > 0:
            b, _, h, w = cams.shape
            keep = torch.rand(b, h * w, device=cams.device) >= self.dropout
            # never drop every cell of an image
            keep[keep.sum(dim=1) == 0] = True
        return wildcat_spatial_pool(cams, self.kmax, self.kmin, self.alpha, keep), cams


class WildcatHead(nn.Module):
    """Multi-map transfer (1×1 conv to C·M maps) followed by :class:`WildcatPool`."""

    def __init__(self, in_channels: int, n_classes: int = 2, modalities: int = 5, kmax: float = 0.3,
                 kmin: float = 0.0, alpha: float = 0.6, dropout: float = 0.1):
        super().__init__()
        self.transfer = nn.Conv2d(in_channels, n_classes * modalities, kernel_size=1)
        self.pool = WildcatPool(n_classes, modalities, kmax, kmin, alpha, dropout)

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Feature map (B, D, h, w) → (class scores (B, C), CAMs (B, C, h, w))."""
        return self.pool(self.transfer(feats))
