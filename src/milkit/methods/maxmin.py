"""Max-Min uncertainty (Belharbi et al.): one stage, ``seg``, trained on image labels only.

Each step (Algorithm 1): the localizer 𝓜 gives M⁺ (posterior-weighted WILDCAT CAM,
Eq. 12), the classifier 𝓒 sees X⊙M⁺ and X⊙M⁻, and the loss is Eq. 7 — CE on the
foreground, λ·R on the background (EEM Eq. 4 or SEM Eq. 6), extended log-barrier size
terms with t growing per epoch — plus the localizer's own CE on X (Fig. 2).

Table 4's ablation is three switches: ``use_background: false, use_size: false``
(FG only), ``use_size: false`` (FG + BG), both true (FG + BG + ASC).

Camelyon16 (issue 12): the per-image min–max before Eq. 12 makes the top pixel of every
image ≥ σ, so a normal patch can never have an empty mask; the Camelyon configs use the
authors' M⁺ = sigmoid(ω·CAM) on the raw CAM (``mask_normalisation: none``, ``sigma: 0``).
Footnote 5 (Camelyon16): the classifier's learning rate is ×10, up to 0.01
(``classifier_lr_mult``, ``classifier_lr_max``; :func:`classifier_lr`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from milkit.config import StrictModel
from milkit.data.base import DataSplits
from milkit.engine import fit_stage
from milkit import io
from milkit.losses.maxmin import MaxMinTerms, maxmin_loss, t_schedule
from milkit.methods.base import Labeler
from milkit.methods.seg_base import SegBatch, SegLabeler, SegMethod, SegModule, seg_loader
from milkit.models.maxmin import MaxMinNet
from milkit.run_dir import RunDir


def augment_images(x: Tensor, flips: bool, rot90: bool, jitter: tuple[float, float, float, float] | None) -> Tensor:
    """Per-image random flips, rotations by k·90° (square images) and colour jitter (§3.3).

    Randomness comes from torch's global generator, seeded by ``engine.fit_stage``.
    """
    out = []
    cj = None
    if jitter is not None and any(v > 0 for v in jitter):
        from torchvision.transforms import v2

        b, c, s, h = jitter
        cj = v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)
    square = x.shape[-1] == x.shape[-2]
    for img in x:
        if flips:
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
            if torch.rand(()) < 0.5:
                img = img.flip(-2)
        if rot90 and square:
            img = torch.rot90(img, int(torch.randint(0, 4, ())), dims=(-2, -1))
        if cj is not None:
            img = cj(img).clamp(0, 1)
        out.append(img)
    return torch.stack(out)


class MaxMinLoss:
    """``loss_fn(model, batch)`` of one Max-Min step; ``t`` is set per epoch by the module."""

    def __init__(self, terms: MaxMinTerms, t: float, flips: bool, rot90: bool,
                 jitter: tuple[float, float, float, float] | None):
        self.terms, self.t = terms, t
        self.flips, self.rot90, self.jitter = flips, rot90, jitter

    def __call__(self, model: MaxMinNet, batch: SegBatch) -> tuple[Tensor, dict[str, Tensor]]:
        x = augment_images(batch.images, self.flips, self.rot90, self.jitter)
        out = model(x, with_background=self.terms.use_background)
        loss, logs = maxmin_loss(out.fg_logits, out.bg_logits, out.loc_logits, out.mask_fg,
                                 batch.labels.long(), self.t, self.terms)
        logs["t"] = torch.tensor(self.t)
        return loss, logs


def classifier_lr(lr: float, mult: float, cap: float | None) -> float:
    """Footnote 5: the classifier's learning rate, ``lr``·``mult`` but at most ``cap``
    (never below ``lr``): 1e-3 × 10 → 0.01."""
    out = lr * mult
    if cap is not None:
        out = min(out, max(cap, lr))
    return float(out)


class MaxMinModule(SegModule):
    """:class:`SegModule` that updates the log-barrier ``t`` at the start of every epoch (§3.3(a))
    and gives the classifier head its own learning rate (footnote 5)."""

    def __init__(self, *args, schedule: tuple[float, float, float], classifier_lr: tuple[float, float | None] = (1.0, None),
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = schedule
        self.classifier_lr = classifier_lr

    def on_train_epoch_start(self) -> None:
        self.loss_fn.t = t_schedule(self.current_epoch, *self.schedule)

    def configure_optimizers(self):  # noqa: D102
        from milkit.engine import build_optimizer, build_scheduler

        mult, cap = self.classifier_lr
        if mult == 1.0:
            return super().configure_optimizers()
        cfg = self.trainer_cfg
        head = [p for p in self.model.classifier_head.parameters() if p.requires_grad]
        ids = {id(p) for p in head}
        opt = build_optimizer([p for p in self.model.parameters() if id(p) not in ids], cfg)
        opt.add_param_group({"params": head, "lr": classifier_lr(cfg.lr, mult, cap)})
        sched = build_scheduler(opt, cfg)  # the per-epoch schedule scales both groups alike
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class MaxMinMethod(SegMethod):
    """Max-Min uncertainty; defaults are the paper's GlaS settings (§3.3(a))."""

    primary_stage = "seg"

    class Config(StrictModel):
        name: Literal["maxmin"] = "maxmin"
        # -- network (§3.3(a): ResNet-18 shared by 𝓜 and 𝓒, WILDCAT pooling) --------
        backbone: Literal["resnet18"] = "resnet18"
        backbone_stages: int = Field(4, ge=1, le=4, description="ResNet-18 residual stages kept (paper: all 4)")
        pretrained_path: str | None = Field(
            None, description="ImageNet weights: a torchvision state dict file, 'imagenet' = torchvision download "
            "(internet), None = random init (CPU/test configs only; the paper configs name a file)")
        modalities: int = Field(5, ge=1, description="WILDCAT modalities per class (§3.3(a) GlaS 5, Camelyon 4)")
        kmax: float = Field(0.3, gt=0, description="§3.3(a) GlaS 0.3, Camelyon 0.1")
        kmin: float = Field(0.0, ge=0, description="§3.3(a) GlaS 0, Camelyon 0.1")
        alpha: float = Field(0.6, description="WILDCAT α (§3.3(a) Camelyon; NOTES.md)")
        dropout: float = Field(0.1, ge=0, lt=1, description="WILDCAT spatial dropout (§3.3(a))")
        # -- mask (Eq. 12) --------------------------------------------------------------
        sigma: float = Field(0.15, description="Eq. 12 σ (§3.3(a))")
        omega: float = Field(5.0, gt=0, description="Eq. 12 ω (§3.3(a))")
        mask_normalisation: Literal["image", "batch", "none"] = Field(
            "image", description="min–max of the CAM before Eq. 12: per image (NOTES.md, GlaS); 'batch' = released "
            "code; 'none' = raw CAM (Camelyon16 configs: sigmoid(ω·CAM) with sigma 0, so normal patches can be empty)")
        # -- loss (Eq. 7, Table 4 switches) ---------------------------------------------
        variant: Literal["eem", "sem"] = Field("sem", description="R of Eq. 8: eem = −H(p̂⁻), sem = H(q, p̂⁻)")
        lam: float = Field(1e-7, ge=0, description="λ of Eq. 7 (§3.3(a) GlaS: 1e-7)")
        use_background: bool = Field(True, description="Table 4 'BG': the λ·R(p̂⁻) term")
        use_size: bool = Field(True, description="Table 4 'ASC': log-barrier size terms")
        size_normalised: bool = Field(False, description="sizes as fractions of |Ω| (paper: pixel counts, Eqs. 10–11)")
        localizer_weight: float = Field(1.0, ge=0, description="weight of 𝓜's own CE (Fig. 2: 1)")
        classifier_lr_mult: float = Field(
            1.0, ge=1, description="footnote 5 (Camelyon16): the classifier's lr ×10 up to classifier_lr_max; 1 = off (GlaS)")
        classifier_lr_max: float | None = Field(0.01, gt=0, description="footnote 5: up to 0.01")
        t0: float = Field(5.0, gt=0, description="initial t (§3.3(a) GlaS 5, Camelyon 10)")
        t_factor: float = Field(1.01, ge=1, description="t multiplier per epoch (GlaS 1.01, Camelyon 1.1)")
        t_max: float = Field(10.0, gt=0, description="largest t (GlaS 10, Camelyon 30)")
        # -- augmentation (§3.3: flips, rotations, colour jitter 0.5/0.5/0.5/0.05) -----
        flips: bool = True
        rot90: bool = Field(True, description="rotations by k·90° (§3.3(a) Camelyon)")
        color_jitter: tuple[float, float, float, float] | None = Field(
            (0.5, 0.5, 0.5, 0.05), description="brightness, contrast, saturation, hue (§3.3); null = off")
        # -- outputs / selection -------------------------------------------------------
        pixel_threshold: float = Field(0.5, description="M⁺ ≥ 0.5 ⇔ normalised CAM ≥ σ (Eq. 12)")
        blur_sigma: float = Field(0.0, ge=0, description="no blur in the paper")
        monitor: str = Field("val/classification_error", description="§3.3(b): validation classification error")
        monitor_mode: Literal["min", "max"] = "min"

        @model_validator(mode="after")
        def _check(self) -> "MaxMinMethod.Config":
            if self.t_max < self.t0:
                raise ValueError(f"t_max ({self.t_max}) must be >= t0 ({self.t0})")
            return self

    def build_model(self) -> MaxMinNet:
        c = self.cfg
        return MaxMinNet(backbone=c.backbone, stages=c.backbone_stages, pretrained_path=c.pretrained_path,
                         n_classes=2, modalities=c.modalities, kmax=c.kmax, kmin=c.kmin, alpha=c.alpha,
                         dropout=c.dropout, sigma=c.sigma, omega=c.omega,
                         mask_normalisation=c.mask_normalisation)

    def terms(self) -> MaxMinTerms:
        c = self.cfg
        return MaxMinTerms(use_background=c.use_background, use_size=c.use_size, variant=c.variant, lam=c.lam,
                           localizer_weight=c.localizer_weight, size_normalised=c.size_normalised)

    def fit(self, splits: DataSplits, run: RunDir) -> dict[str, Labeler]:
        c, tr = self.cfg, self.exp.trainer
        model = self.build_model()
        loss = MaxMinLoss(self.terms(), c.t0, c.flips, c.rot90, c.color_jitter)
        module = MaxMinModule(model, loss, tr, blur_sigma=c.blur_sigma, threshold=c.pixel_threshold,
                              schedule=(c.t0, c.t_factor, c.t_max),
                              classifier_lr=(c.classifier_lr_mult, c.classifier_lr_max))
        seed = self.exp.seed
        fit_stage(
            module,
            seg_loader(splits.train, tr, shuffle=True, seed=seed, with_masks=False),
            seg_loader(splits.val, tr, shuffle=False, with_masks=True),
            run.stage_dir("seg"),
            tr,
            seed=seed,
            monitor=c.monitor,
            monitor_mode=c.monitor_mode,
        )
        io.save_state_dict(run.stage_dir("seg") / "net.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})
        return {"seg": self.make_labeler(model.eval())}

    def load(self, run: RunDir) -> dict[str, Labeler]:
        model = self.load_net(self.build_model(), run, "seg")
        lab = self.make_labeler(model)
        thr = run.read_threshold("seg").get("threshold")
        if thr is not None:
            lab.threshold = thr
        return {"seg": lab}


__all__ = ["MaxMinMethod", "MaxMinLoss", "MaxMinModule", "augment_images", "classifier_lr", "SegLabeler"]
