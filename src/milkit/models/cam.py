"""Weakly supervised pixel baselines of Max-Min's Tables 1–2 (§3.2(b)).

Every network maps an image batch (B, 3, H, W) to a :class:`SegOutput`: class scores
(B, C) — the image logit is ``logits[:, 1] − logits[:, 0]`` for the binary task — and a
pixel map (B, H, W) in [0, 1]. Which class's map (``cam_class``, issue 12): ``predicted``
(default: the CAM of the predicted class — on GlaS benign images the glands are class 0's
evidence), ``posterior`` (Σ_c p̂_c·CAM_c, Max-Min's "winning CAM"), ``positive`` (class 1):

- :class:`CAMNet` with ``pooling``: ``"avg"`` CAM-Avg (GAP, Zhou et al. 2016),
  ``"max"`` CAM-Max (Oquab et al. 2015), ``"lse"`` CAM-LSE (log-sum-exp, Pinheiro &
  Collobert 2015), ``"wildcat"`` WILDCAT (Durand et al. 2017, :mod:`milkit.nn.wildcat`);
- :class:`GradCAMNet`: a GAP + linear classifier read by Grad-CAM (Selvaraju et al. 2017);
- :class:`DeepMILNet`: attention MIL (Ilse et al. 2018) over feature-map cells, the
  pixel map being the attention weights; VGG-MIL or ResNet-MIL by the backbone.

Backbones are torchvision ResNet-18 / VGG-16 feature extractors: random initialisation,
ImageNet weights from a local file, or torchvision's download (``pretrained_path:
imagenet``; :mod:`milkit.nn.pretrained`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers

from milkit.nn.pretrained import load_pretrained
from milkit.nn.attention import AttentionPool
from milkit.nn.wildcat import WildcatHead

#: output channels of ResNet-18 after each residual stage
_RESNET18_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512}
#: last layer index (exclusive) and channels of VGG-16 ``features`` after each block
_VGG16_BLOCKS = {1: (5, 64), 2: (10, 128), 3: (17, 256), 4: (24, 512), 5: (31, 512)}


def build_backbone(name: str = "resnet18", stages: int = 4, pretrained_path: str | None = None) -> tuple[nn.Module, int]:
    """A convolutional feature extractor and its output channels.

    ``resnet18``: stem + the first ``stages`` residual stages (output stride 4·2^(stages−1));
    ``vgg16``: the first ``stages`` convolutional blocks. Max-Min §3.3 uses the full
    ResNet-18 (``stages=4``); fewer stages keep small CPU images spatially resolved.
    """
    if name == "resnet18":
        if stages not in _RESNET18_CHANNELS:
            raise ValueError(f"resnet18 backbone has stages 1..4, got {stages}")
        net = torchvision.models.resnet18(weights=None)
        load_pretrained(net, "resnet18", pretrained_path)
        layers = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4]
        return nn.Sequential(*layers[: 4 + stages]), _RESNET18_CHANNELS[stages]
    if name == "vgg16":
        if stages not in _VGG16_BLOCKS:
            raise ValueError(f"vgg16 backbone has blocks 1..5, got {stages}")
        # only the convolutional part: VGG-16's 120M-parameter classifier is never used
        holder = nn.Module()
        holder.features = make_layers(vgg_cfgs["D"], batch_norm=False)
        load_pretrained(holder, "vgg16", pretrained_path)
        end, ch = _VGG16_BLOCKS[stages]
        return nn.Sequential(*list(holder.features.children())[:end]), ch
    raise ValueError(f"unknown backbone {name!r}; use 'resnet18' or 'vgg16'")


def minmax_per_image(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """(B, H, W) → each map rescaled to [0, 1]."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    return (maps - lo) / (hi - lo + eps)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of (B, h, w) maps to (B, H, W)."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


@dataclass
class SegOutput:
    """Class scores (B, C), low-resolution maps (B, C, h, w) and the pixel map (B, H, W) in [0, 1]."""

    logits: Tensor
    cams: Tensor | None = None
    pixel_map: Tensor | None = None

    @property
    def image_logit(self) -> Tensor:
        """Binary image logit (B,): log p̂₁ − log p̂₀ = l₁ − l₀."""
        return self.logits[:, 1] - self.logits[:, 0]


#: ImageNet channel statistics (torchvision's pretrained ResNet/VGG expect them)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalise(x: Tensor) -> Tensor:
    """Images in [0, 1] (milkit's segmentation convention) → ImageNet-normalised input."""
    mean = x.new_tensor(IMAGENET_MEAN)[None, :, None, None]
    std = x.new_tensor(IMAGENET_STD)[None, :, None, None]
    return (x - mean) / std


def _check_images(x: Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (B, 3, H, W), got {tuple(x.shape)}")


class SegmentsMixin:
    """``segment(images) -> (image probability (B,), pixel map (B, H, W))`` — the
    segmentation-net contract of :mod:`milkit.methods.seg_base`; images in [0, 1]."""

    def segment(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self(images, with_map=True)  # type: ignore[operator]
        return torch.softmax(out.logits, dim=-1)[:, 1].detach(), out.pixel_map.detach()


CAM_CLASSES = ("predicted", "posterior", "positive")


def _check_cam_class(cam_class: str) -> None:
    if cam_class not in CAM_CLASSES:
        raise ValueError(f"unknown cam_class {cam_class!r}; use one of {', '.join(CAM_CLASSES)}")


def class_map(cams: Tensor, logits: Tensor, cam_class: str = "predicted") -> Tensor:
    """(B, C, h, w) class maps → (B, h, w): the predicted class's map, the
    posterior-weighted sum Σ_c p̂_c·CAM_c (Max-Min §3.3(a)) or the positive class's."""
    _check_cam_class(cam_class)
    if cam_class == "positive":
        return cams[:, -1]
    if cam_class == "predicted":
        idx = logits.argmax(dim=-1)
        return cams[torch.arange(cams.shape[0], device=cams.device), idx]
    return torch.einsum("bc,bchw->bhw", torch.softmax(logits, dim=-1), cams)


def lse_pool(maps: Tensor, r: float) -> Tensor:
    """Log-sum-exp pooling (1/r)·log(mean exp(r·z)) over the cells of (B, C, h, w) → (B, C)."""
    flat = maps.flatten(2)
    n = flat.shape[-1]
    return (torch.logsumexp(r * flat, dim=-1) - torch.log(torch.tensor(float(n), device=maps.device))) / r


class CAMNet(SegmentsMixin, nn.Module):
    """Backbone → class maps → spatial pooling (avg / max / lse / wildcat) → class scores."""

    POOLINGS = ("avg", "max", "lse", "wildcat")

    def __init__(self, pooling: str = "avg", backbone: str = "resnet18", stages: int = 4,
                 pretrained_path: str | None = None, n_classes: int = 2, lse_r: float = 10.0,
                 modalities: int = 5, kmax: float = 0.3, kmin: float = 0.0, alpha: float = 0.6,
                 dropout: float = 0.1, cam_class: str = "predicted"):
        super().__init__()
        if pooling not in self.POOLINGS:
            raise ValueError(f"unknown CAM pooling {pooling!r}; use one of {self.POOLINGS}")
        _check_cam_class(cam_class)
        self.pooling, self.lse_r, self.n_classes, self.cam_class = pooling, lse_r, n_classes, cam_class
        self.features, ch = build_backbone(backbone, stages, pretrained_path)
        if pooling == "wildcat":
            self.head = WildcatHead(ch, n_classes, modalities, kmax, kmin, alpha, dropout)
        else:
            self.head = nn.Conv2d(ch, n_classes, kernel_size=1)

    def forward(self, x: Tensor, with_map: bool = True) -> SegOutput:
        _check_images(x)
        feats = self.features(imagenet_normalise(x))
        if self.pooling == "wildcat":
            logits, cams = self.head(feats)
        else:
            cams = self.head(feats)
            if self.pooling == "avg":
                logits = cams.mean(dim=(2, 3))
            elif self.pooling == "max":
                logits = cams.amax(dim=(2, 3))
            else:
                logits = lse_pool(cams, self.lse_r)
        pix = None
        if with_map:
            pix = minmax_per_image(upsample(class_map(cams, logits.detach(), self.cam_class), x.shape[-2:]))
        return SegOutput(logits=logits, cams=cams, pixel_map=pix)


class GradCAMNet(SegmentsMixin, nn.Module):
    """GAP + linear classifier; the pixel map is Grad-CAM ReLU(Σ_k α_k A_k) with α_k the
    spatial mean of ∂(c·(l₁ − l₀))/∂A_k (Selvaraju et al. Eq. 1–2), c = ±1 for the predicted
    class (``cam_class: predicted``), p̂₁ − p̂₀ (``posterior``) or 1 (``positive``)."""

    def __init__(self, backbone: str = "resnet18", stages: int = 4, pretrained_path: str | None = None,
                 n_classes: int = 2, cam_class: str = "predicted"):
        super().__init__()
        _check_cam_class(cam_class)
        self.cam_class = cam_class
        self.features, ch = build_backbone(backbone, stages, pretrained_path)
        self.fc = nn.Linear(ch, n_classes)

    def forward(self, x: Tensor, with_map: bool = True) -> SegOutput:
        _check_images(x)
        with torch.enable_grad():
            feats = self.features(imagenet_normalise(x))
            if with_map and not feats.requires_grad:
                feats = feats.detach().requires_grad_(True)
            logits = self.fc(feats.mean(dim=(2, 3)))
            if not with_map:
                return SegOutput(logits=logits)
            diff = logits[:, 1] - logits[:, 0]
            if self.cam_class == "predicted":
                coef = torch.where(diff.detach() >= 0, 1.0, -1.0)
            elif self.cam_class == "posterior":
                p = torch.softmax(logits.detach(), dim=-1)
                coef = p[:, 1] - p[:, 0]
            else:
                coef = torch.ones_like(diff)
            score = (coef * diff).sum()
            (grad,) = torch.autograd.grad(score, feats, retain_graph=self.training, create_graph=False)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * feats.detach()).sum(dim=1))
        pix = minmax_per_image(upsample(cam, x.shape[-2:]))
        if not torch.is_grad_enabled():
            logits = logits.detach()
        return SegOutput(logits=logits, cams=cam[:, None], pixel_map=pix)


class DeepMILNet(SegmentsMixin, nn.Module):
    """Attention MIL over feature-map cells (Ilse et al. 2018): cells are instances, the
    image embedding z = Σ a_k h_k feeds a linear classifier, the pixel map is a (upsampled)."""

    def __init__(self, backbone: str = "resnet18", stages: int = 4, pretrained_path: str | None = None,
                 n_classes: int = 2, hidden: int = 128, gated: bool = True):
        super().__init__()
        self.features, ch = build_backbone(backbone, stages, pretrained_path)
        self.pool = AttentionPool(ch, hidden=hidden, gated=gated)
        self.fc = nn.Linear(ch, n_classes)

    def forward(self, x: Tensor, with_map: bool = True) -> SegOutput:
        _check_images(x)
        feats = self.features(imagenet_normalise(x))
        b, d, h, w = feats.shape
        cells = feats.flatten(2).transpose(1, 2)  # (B, h·w, D)
        mask = torch.ones(b, h * w, dtype=torch.bool, device=x.device)
        z, a, _ = self.pool(cells, mask)
        logits = self.fc(z)
        att = a.reshape(b, 1, h, w)
        pix = minmax_per_image(upsample(att[:, 0], x.shape[-2:])) if with_map else None
        return SegOutput(logits=logits, cams=att, pixel_map=pix)


#: name → (class, fixed keyword arguments) for the baselines of Tables 1–2
CAM_MODELS: dict[str, tuple[type[nn.Module], dict]] = {
    "cam_avg": (CAMNet, {"pooling": "avg"}),
    "cam_max": (CAMNet, {"pooling": "max"}),
    "cam_lse": (CAMNet, {"pooling": "lse"}),
    "wildcat": (CAMNet, {"pooling": "wildcat"}),
    "grad_cam": (GradCAMNet, {}),
    "deep_mil": (DeepMILNet, {}),
}


def build_cam_model(name: str, **kwargs) -> nn.Module:
    """Build a baseline by name; ``kwargs`` that the class does not take are an error."""
    if name not in CAM_MODELS:
        raise ValueError(f"unknown pixel baseline {name!r}; known: {', '.join(sorted(CAM_MODELS))}")
    cls, fixed = CAM_MODELS[name]
    return cls(**fixed, **kwargs)
