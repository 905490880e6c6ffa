"""Distill-to-Label §IV instance encoders for histology patches.

D2L §IV: "a stack of convolution layers with ReLU activation followed by max
pooling, and 3 fully connected layers, while the classifier contains a single
fully connected layer" — 2 conv layers for the colon set (27×27 patches), 5 for
the breast set (32×32 patches). The paper gives no widths or kernel sizes:

- colon: conv(4×4, 36)–ReLU–maxpool(2)–conv(3×3, 48)–ReLU–maxpool(2), the
  feature extractor Ilse et al. (2018, appendix) used on the same colon data
  (after Sirinukunwattana et al. 2016); 27 → 24 → 12 → 10 → 5.
- breast: five conv(3×3, padding 1)–ReLU–maxpool(2) blocks with widths
  (32, 32, 64, 64, 128) (paper silent; our choice); 32 → 16 → 8 → 4 → 2 → 1.

Both end with three fully connected layers FC(512)–ReLU–FC(512)–ReLU–FC(out_dim)–ReLU
(widths paper silent; 512 as Ilse et al.'s colon/breast FC layers). The single
FC classifier and the attention pooling belong to the MIL model (models/abmil.py).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class D2LConvEncoder(nn.Module):
    """conv–ReLU–maxpool blocks, then three fully connected layers (D2L §IV).

    Input (N, in_channels, image_size, image_size) → output (N, out_dim).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: Sequence[int],
        kernel_sizes: Sequence[int],
        paddings: Sequence[int],
        hidden: Sequence[int] = (512, 512),
        out_dim: int = 512,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not (len(channels) == len(kernel_sizes) == len(paddings)):
            raise ValueError("channels, kernel_sizes and paddings must have the same length")
        if len(hidden) != 2:
            raise ValueError("D2L §IV uses 3 fully connected layers: give 2 hidden widths plus out_dim")
        blocks: list[nn.Module] = []
        side, c_in = image_size, in_channels
        for c, k, p in zip(channels, kernel_sizes, paddings):
            side = (side + 2 * p - k + 1) // 2
            if side < 1:
                raise ValueError(
                    f"{type(self).__name__}: patches of {image_size} px are too small for {len(channels)} conv blocks"
                )
            blocks += [nn.Conv2d(c_in, c, kernel_size=k, padding=p), nn.ReLU(), nn.MaxPool2d(2, 2)]
            c_in = c
        self.features = nn.Sequential(*blocks)
        dims = [c_in * side * side, *hidden, out_dim]
        fc: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            fc += [nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout)]
        self.fc = nn.Sequential(*fc)
        self.in_channels = in_channels
        self.image_size = image_size
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"{type(self).__name__} expects (N, {self.in_channels}, {self.image_size}, {self.image_size}) "
                f"patches, got {tuple(x.shape)}"
            )
        return self.fc(self.features(x).flatten(1))


class ColonEncoder(D2LConvEncoder):
    """2 conv layers + 3 FC (D2L §IV, colon cancer, 27×27 patches)."""

    def __init__(self, in_channels: int = 3, image_size: int = 27, out_dim: int = 512, dropout: float = 0.0):
        super().__init__(in_channels, image_size, channels=(36, 48), kernel_sizes=(4, 3), paddings=(0, 0),
                         out_dim=out_dim, dropout=dropout)


class BreastEncoder(D2LConvEncoder):
    """5 conv layers + 3 FC (D2L §IV, breast cancer, 32×32 patches)."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, out_dim: int = 512, dropout: float = 0.0):
        super().__init__(in_channels, image_size, channels=(32, 32, 64, 64, 128), kernel_sizes=(3,) * 5,
                         paddings=(1,) * 5, out_dim=out_dim, dropout=dropout)


def count_conv_layers(encoder: nn.Module) -> int:
    """Number of Conv2d layers (tests check 2 for colon, 5 for breast)."""
    return sum(isinstance(m, nn.Conv2d) for m in encoder.modules())


def count_linear_layers(encoder: nn.Module) -> int:
    """Number of Linear layers (3 in both D2L encoders)."""
    return sum(isinstance(m, nn.Linear) for m in encoder.modules())


__all__ = ["D2LConvEncoder", "ColonEncoder", "BreastEncoder", "count_conv_layers", "count_linear_layers"]
