"""Max-Min uncertainty network (Belharbi et al., Fig. 2 and Algorithm 1).

A localizer 𝓜 and a classifier 𝓒 share one ResNet-18 backbone (§3.3(a)); each has its
own WILDCAT head (multi-map transfer + class-wise/spatial pooling, :mod:`milkit.nn.wildcat`).

Forward (Algorithm 1, lines 1–4): X → 𝓜 → CAMs and posterior p̂ → M⁺ = Eq. 12 of the
posterior-weighted CAM (upsampled to the image, min–max normalised per image, or raw for
Camelyon16: ``mask_normalisation``), M⁻ = 1 − M⁺ →
𝓒(X⊙M⁺), 𝓒(X⊙M⁻). At test time (lines 7–11) the image class is argmax 𝓒(X⊙M⁺) and
the mask is M⁺.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from milkit.losses.maxmin import foreground_mask
import torch

from milkit.models.cam import build_backbone, imagenet_normalise
from milkit.nn.wildcat import WildcatHead


@dataclass
class MaxMinOutput:
    """Everything one forward pass of Algorithm 1 produces."""

    loc_logits: Tensor  # (B, C) localizer on X
    cams: Tensor  # (B, C, h, w) localizer CAMs
    mask_fg: Tensor  # (B, H, W) M⁺ in (0, 1)
    fg_logits: Tensor  # (B, C) classifier on X⊙M⁺
    bg_logits: Tensor | None  # (B, C) classifier on X⊙M⁻ (None when not asked for)

    @property
    def image_logit(self) -> Tensor:
        """Binary image logit (B,) of the final decision 𝓒(X⊙M⁺): l₁ − l₀."""
        return self.fg_logits[:, 1] - self.fg_logits[:, 0]


class MaxMinNet(nn.Module):
    """Localizer + classifier on a shared backbone (§3.3(a)); defaults are the GlaS settings."""

    def __init__(self, backbone: str = "resnet18", stages: int = 4, pretrained_path: str | None = None,
                 n_classes: int = 2, modalities: int = 5, kmax: float = 0.3, kmin: float = 0.0,
                 alpha: float = 0.6, dropout: float = 0.1, sigma: float = 0.15, omega: float = 5.0,
                 mask_normalisation: str = "image"):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"Max-Min needs a softmax over at least 2 classes, got n_classes={n_classes}")
        self.features, ch = build_backbone(backbone, stages, pretrained_path)
        self.localizer_head = WildcatHead(ch, n_classes, modalities, kmax, kmin, alpha, dropout)
        self.classifier_head = WildcatHead(ch, n_classes, modalities, kmax, kmin, alpha, dropout)
        if mask_normalisation not in ("image", "batch", "none"):
            raise ValueError(f"unknown mask normalisation {mask_normalisation!r}; use image, batch or none")
        self.sigma, self.omega, self.mask_normalisation = sigma, omega, mask_normalisation

    def localize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Algorithm 1 lines 1–2 on a normalised image: (localizer logits (B, C),
        CAMs (B, C, h, w), M⁺ (B, H, W))."""
        logits, cams = self.localizer_head(self.features(x))
        m = foreground_mask(cams, logits, tuple(x.shape[-2:]), self.sigma, self.omega, self.mask_normalisation)
        return logits, cams, m

    def classify(self, x: Tensor) -> Tensor:
        """The classifier 𝓒 on a (masked) image: (B, C) scores."""
        return self.classifier_head(self.features(x))[0]

    def forward(self, x: Tensor, with_background: bool = True) -> MaxMinOutput:
        """Algorithm 1 lines 1–4 on images in [0, 1] (B, 3, H, W); masks act on the
        ImageNet-normalised image, as the network sees it."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB images of shape (B, 3, H, W), got {tuple(x.shape)}")
        x = imagenet_normalise(x)
        loc_logits, cams, m = self.localize(x)
        fg = self.classify(x * m[:, None])
        bg = self.classify(x * (1.0 - m)[:, None]) if with_background else None
        return MaxMinOutput(loc_logits=loc_logits, cams=cams, mask_fg=m, fg_logits=fg, bg_logits=bg)

    @torch.no_grad()
    def segment(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Algorithm 1 lines 7–11: (p̂⁺ of the positive class (B,), M⁺ (B, H, W)).

        M⁺ ≥ 0.5 exactly where the (normalised) posterior-weighted CAM exceeds σ (Eq. 12).
        """
        out = self(images, with_background=False)
        return torch.softmax(out.fg_logits, dim=-1)[:, 1], out.mask_fg
