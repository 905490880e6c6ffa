"""Segmentation baselines of Max-Min Tables 1–2 and IKD-MIL Table 1 (registry name
``segmentation_baseline``): one net trained in one stage (stage name = the baseline's name).

EXTENSION POINT (part B appends here, nothing else changes): add an entry to
``BASELINES`` at the bottom of this file::

    BASELINES["cam_avg"] = Baseline(
        build=lambda cfg: MyNet(...),            # cfg: SegBaselineMethod.Config; net has segment(images)
        loss=lambda cfg: my_loss_fn,             # (net, SegBatch) -> (loss, {name: value}); None = no training
        train_with_masks=False,                  # True only for fully supervised upper bounds
        options=MyOptions,                       # optional StrictModel validating cfg.options
        doc="CAM-Avg (GAP), Max-Min §5.1(b)",
    )

``cfg.options`` (a free dict in YAML) is validated by the entry's ``options`` model:
:func:`baseline_options` returns the validated object. The segmentation-net protocol
and training loop are in :mod:`milkit.methods.seg_base`.

Here: ``all_ones`` (every pixel foreground: the lower bound whose F1− is 0) and
``unet`` (a U-Net trained with the masks: the upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from milkit.config import StrictModel
from milkit.data.base import DataSplits
from milkit.losses.dice import soft_dice_loss
from milkit.methods.base import Labeler
from milkit.methods.seg_base import SegBatch, SegMethod
from milkit.models.unet import UNet
from milkit.run_dir import RunDir

LossFn = Callable[[nn.Module, SegBatch], "tuple[Tensor, dict[str, Tensor]]"]


@dataclass
class Baseline:
    """How to build, train and name one baseline."""

    build: Callable[[Any], nn.Module]
    loss: Callable[[Any], LossFn] | None = None
    train_with_masks: bool = False
    options: type[StrictModel] | None = None
    doc: str = ""


class SegBaselineConfig(StrictModel):
    """``method:`` section of a segmentation baseline."""

    name: Literal["segmentation_baseline"] = "segmentation_baseline"
    baseline: str = Field("unet", description="a key of seg_baselines.BASELINES")
    backbone: str = Field("resnet18", description="backbone of CAM/MIL baselines (Max-Min §5.1: ResNet-18)")
    pretrained_path: str | None = Field(
        None, description="ImageNet weights: a torchvision state dict file, 'imagenet' = torchvision download "
        "(internet), None = random init (CPU/test configs only; the paper configs name a file)")
    pixel_threshold: float = Field(0.5, gt=0, lt=1, description="mask = map >= threshold (IKD §4.2)")
    blur_sigma: float = Field(0.0, ge=0, description="Gaussian blur of the map before thresholding")
    monitor: str = Field(
        "val/classification_error",
        description="best checkpoint: validation classification error (Max-Min §3.3(b); needs no masks)")
    monitor_mode: Literal["max", "min"] | None = Field(
        None, description="None = from the monitor's name: min for errors/losses, max for scores (F1, AUROC)")
    unet_width: int = Field(16, ge=1, description="U-Net channels at the first level")
    unet_depth: int = Field(3, ge=1)
    options: dict[str, Any] = Field(default_factory=dict, description="baseline-specific options")

    @field_validator("baseline")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in BASELINES:
            raise ValueError(f"unknown baseline {v!r}; known: {', '.join(sorted(BASELINES))}")
        return v

    @model_validator(mode="after")
    def _mode(self) -> "SegBaselineConfig":
        if self.monitor_mode is None:
            self.monitor_mode = default_monitor_mode(self.monitor)
        return self


def default_monitor_mode(monitor: str) -> str:
    """``min`` for monitors that are errors or losses (``val/classification_error``,
    ``*loss*``, ``*bce*``, ``hd*``), ``max`` for scores (``val/f1``, ``val/image_auroc``)."""
    name = monitor.rsplit("/", 1)[-1].lower()
    return "min" if ("error" in name or "loss" in name or "bce" in name or name.startswith("hd")) else "max"


def baseline_options(cfg: SegBaselineConfig) -> StrictModel | None:
    """The validated ``options`` of the configured baseline (None when it takes none)."""
    spec = BASELINES[cfg.baseline]
    if spec.options is None:
        if cfg.options:
            raise ValueError(f"baseline {cfg.baseline!r} takes no options, got {sorted(cfg.options)}")
        return None
    return spec.options.model_validate(cfg.options)


class SegBaselineMethod(SegMethod):
    """One-stage baselines; the stage is named after the baseline."""

    Config: ClassVar[type[StrictModel]] = SegBaselineConfig

    @property
    def primary_stage(self) -> str:  # type: ignore[override]
        return self.cfg.baseline

    def _build(self) -> nn.Module:
        baseline_options(self.cfg)  # fail early on bad options
        return BASELINES[self.cfg.baseline].build(self.cfg)

    def fit(self, splits: DataSplits, run: RunDir) -> dict[str, Labeler]:
        spec = BASELINES[self.cfg.baseline]
        self.seed()
        net = self._build()
        name = self.cfg.baseline
        if spec.loss is None:
            from milkit import io

            io.save_state_dict(run.stage_dir(name) / "net.pt", {k: v.cpu() for k, v in net.state_dict().items()})
            return {name: self.make_labeler(net.eval())}
        net = self.fit_seg_stage(name, net, spec.loss(self.cfg), splits, run, train_with_masks=spec.train_with_masks)
        return {name: self.make_labeler(net)}

    def load(self, run: RunDir) -> dict[str, Labeler]:
        name = self.cfg.baseline
        return {name: self.make_labeler(self.load_net(self._build(), run, name))}


# ----------------------------------------------------------------------------- all ones


class AllOnes(nn.Module):
    """Every pixel foreground, every image positive (Max-Min Tables 1–2 lower bound)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_dummy", torch.zeros(1), persistent=True)

    def segment(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones(x.shape[0], device=x.device), torch.ones(x.shape[0], *x.shape[-2:], device=x.device)


# ----------------------------------------------------------------------------- U-Net


def unet_loss(net: nn.Module, batch: SegBatch) -> tuple[Tensor, dict[str, Tensor]]:
    """BCE + soft Dice against the truth masks (full supervision: upper bound only)."""
    if batch.masks is None:
        raise ValueError("the U-Net upper bound trains on masks, but the training batch has none")
    logits = net(batch.images)
    target = batch.masks.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = soft_dice_loss(torch.sigmoid(logits), target)
    return bce + dice, {"bce": bce.detach(), "dice": dice.detach()}


BASELINES: dict[str, Baseline] = {
    "all_ones": Baseline(build=lambda cfg: AllOnes(), loss=None, doc="All-ones mask (lower bound)"),
    "unet": Baseline(
        build=lambda cfg: UNet(width=cfg.unet_width, depth=cfg.unet_depth),
        loss=lambda cfg: unet_loss,
        train_with_masks=True,
        doc="U-Net trained with masks (upper bound)",
    ),
}
# Part B: append CAM-Avg/Max/LSE, WILDCAT, Grad-CAM and Deep-MIL entries below this line.

# ----------------------------------------------------------------------------- part B: CAM / MIL pixel baselines
# Max-Min §3.2(b) and Tables 1–2: CAM-Avg, CAM-Max, CAM-LSE, WILDCAT, Grad-CAM, Deep MIL
# (VGG-MIL / ResNet-MIL). Networks in milkit.models.cam; trained with the image CE only.


class CamBaselineOptions(StrictModel):
    """``options:`` of the CAM/MIL baselines (defaults: Max-Min §3.3, GlaS)."""

    backbone_stages: int = Field(4, ge=1, le=5, description="backbone stages kept (paper: full ResNet-18 = 4)")
    modalities: int = Field(5, ge=1, description="WILDCAT modalities per class (§3.3(a) GlaS 5, Camelyon 4)")
    kmax: float = Field(0.3, gt=0, description="WILDCAT kmax (§3.3(a) GlaS 0.3, Camelyon 0.1)")
    kmin: float = Field(0.0, ge=0, description="WILDCAT kmin (§3.3(a) GlaS 0, Camelyon 0.1)")
    alpha: float = Field(0.6, description="WILDCAT α (§3.3(a); NOTES.md)")
    dropout: float = Field(0.1, ge=0, lt=1, description="WILDCAT spatial dropout (§3.3(a))")
    lse_r: float = Field(10.0, gt=0, description="CAM-LSE sharpness r (paper silent; Pinheiro & Collobert use 5-10)")
    cam_class: Literal["predicted", "posterior", "positive"] = Field(
        "predicted", description="which class's CAM is the mask: the predicted one (GlaS benign glands are class 0), "
        "posterior-weighted (as Max-Min §3.3(a)) or class 1 (issue 12)")
    mil_hidden: int = Field(128, ge=1, description="Deep MIL attention hidden size (Ilse et al.: 128)")
    flips: bool = Field(True, description="random flips (§3.3)")
    rot90: bool = Field(True, description="random k·90° rotations (§3.3(a) Camelyon)")
    color_jitter: tuple[float, float, float, float] | None = Field(
        (0.5, 0.5, 0.5, 0.05), description="brightness, contrast, saturation, hue (§3.3); null = off")


def _cam_net(kind: str, backbone: str | None = None) -> Callable[[Any], nn.Module]:
    def build(cfg: SegBaselineConfig) -> nn.Module:
        from milkit.models.cam import build_cam_model

        o = baseline_options(cfg) or CamBaselineOptions()
        kw: dict[str, Any] = {"backbone": backbone or cfg.backbone, "stages": o.backbone_stages,
                              "pretrained_path": cfg.pretrained_path}
        if kind in ("cam_avg", "cam_max", "cam_lse", "wildcat", "grad_cam"):
            kw.update(cam_class=o.cam_class)
        if kind == "wildcat":
            kw.update(modalities=o.modalities, kmax=o.kmax, kmin=o.kmin, alpha=o.alpha, dropout=o.dropout)
        elif kind == "cam_lse":
            kw.update(lse_r=o.lse_r)
        elif kind == "deep_mil":
            kw.update(hidden=o.mil_hidden)
        return build_cam_model(kind, **kw)

    return build


def _cam_loss(cfg: SegBaselineConfig) -> LossFn:
    """Image cross-entropy on augmented images (§3.2(b): image labels only)."""
    from milkit.methods.maxmin import augment_images

    o = baseline_options(cfg) or CamBaselineOptions()

    def loss(net: nn.Module, batch: SegBatch) -> tuple[Tensor, dict[str, Tensor]]:
        x = augment_images(batch.images, o.flips, o.rot90, o.color_jitter)
        out = net(x, with_map=False)
        ce = F.cross_entropy(out.logits, batch.labels.long())
        return ce, {"ce": ce.detach()}

    return loss


for _name, _kind, _bb, _doc in [
    ("cam_avg", "cam_avg", None, "CAM-Avg: global average pooling of class maps (Zhou et al. 2016)"),
    ("cam_max", "cam_max", None, "CAM-Max: global max pooling of class maps (Oquab et al. 2015)"),
    ("cam_lse", "cam_lse", None, "CAM-LSE: log-sum-exp pooling (Pinheiro & Collobert 2015)"),
    ("wildcat", "wildcat", None, "WILDCAT: multi-map + kmax/kmin pooling (Durand et al. 2017)"),
    ("grad_cam", "grad_cam", None, "Grad-CAM of a GAP classifier (Selvaraju et al. 2017)"),
    ("deep_mil", "deep_mil", None, "Deep MIL: attention over feature-map cells (Ilse et al. 2018)"),
    ("resnet_mil", "deep_mil", "resnet18", "Deep MIL on ResNet-18 (IKD-MIL Table 2)"),
    ("vgg_mil", "deep_mil", "vgg16", "Deep MIL on VGG-16 blocks (IKD-MIL Table 1)"),
]:
    BASELINES[_name] = Baseline(build=_cam_net(_kind, _bb), loss=_cam_loss, options=CamBaselineOptions, doc=_doc)
