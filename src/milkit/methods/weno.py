"""WENO: bi-directional weakly supervised knowledge distillation (Qu et al., NeurIPS 2022).

One instance encoder f is shared (§3.2.1) by

- the **teacher**: any attention MIL model of milkit (``TEACHER_SIGNALS``: ABMIL, CLAM,
  DSMIL, TransMIL, DTFD, SmAP, SmTAP) built on top of f's embeddings (optionally through
  an unshared ``teacher_trunk``), trained on bag labels with BCE (Eq. 8–12; DSMIL
  0.5·bag + 0.5·max-instance);
- the **student**: an instance classifier head φ_s on f (Eq. 14), trained on soft
  pseudo labels (Eq. 13): instances of positive bags get the teacher's min–max
  normalised signal (Eq. 7), clamped to [ε, 1−ε]; instances of negative bags get 0.
  ``pseudo_label: paper`` = softmax attention a_ij normalised per bag (the paper's text);
  ``code`` = pre-softmax logits normalised over all training instances (released code).
  With a DSMIL teacher the signal is DSMIL's instance classifier (NOTES.md).

Training alternates inside ONE LightningModule with manual optimisation: every epoch
a teacher pass over the training bags (the Lightning train loader), recording the
teacher's instance signal, then — within the last training step of the epoch — a
student pass over all training instances shuffled across bags in mini-batches of 256
(NOTES.md), before Lightning's validation runs. Hard positive instance mining (§3.3):
from 0-based epoch ``hpm_warmup_epochs`` on, instances of positive bags whose student
probability exceeds ``hpm_threshold`` are hidden from the teacher (the most positive one
is kept when none would remain); on graph bags the teacher then sees the induced
subgraph of the kept instances (``milkit.data.graph.follow_mask``). Inference (§3.2.3): the student scores every instance and
the bag score is their max; the teacher's bag score is the second labeler "teacher".

Ablations (Table 4): ``distillation`` off = the plain teacher; ``shared_encoder`` off =
the student has its own encoder; ``hpm`` off.
"""

from __future__ import annotations

import dataclasses
import shutil
from typing import Literal

import lightning as L
import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from milkit import distributed, io
from milkit.config import StrictModel, TrainerConfig
from milkit.data.bag import BagBatch, BagDataset
from milkit.data.base import DataSplits
from milkit.data.graph import follow_mask
from milkit.engine import build_optimizer, build_scheduler, fit_stage, restore_submodule, seed_everything
from milkit.losses.bernoulli import bce_with_targets
from milkit.methods.base import Labeler, Method, bag_loader, evaluate_labeler
from milkit.methods.mil import combine_losses
from milkit.metrics.classification import auroc
from milkit.models.base import MILModel, MILOutput, encode_instances, full_mask
from milkit.models.factory import ModelSection, model_config
from milkit.nn.encoders import EncoderConfig, build_encoder
from milkit.run_dir import RunDir

#: registered MIL models that can serve as WENO's teacher, and what their instance signal is
#: (``MILOutput.instance_scores``; the "code" pseudo-label reading uses it as is, the "paper"
#: reading its softmax over the bag unless it is already a softmax weight)
TEACHER_SIGNALS: dict[str, str] = {
    "abmil": "pre-softmax attention logits (Eq. 5); gated too",
    "clam_sb": "pre-softmax attention logits of the positive branch",
    "clam_mb": "pre-softmax attention logits of the positive class",
    "smap": "pre-softmax attention logits after Sm",
    "smtap": "pre-softmax attention logits after Sm",
    "dsmil": "instance-classifier logits (NOTES.md: DSMIL teacher)",
    "transmil": "class-token attention of the last layer (already a softmax weight)",
    "dtfd": "tier-1 instance activations a_k·wᵀh_k",
}
#: teachers whose instance_scores are already softmax weights over the bag
SOFTMAX_SIGNALS = ("transmil",)
#: kept for callers that imported the old name
ATTENTION_TEACHERS = tuple(TEACHER_SIGNALS)


class TeacherWithoutAttentionError(ValueError):
    """The configured teacher is not an attention MIL model (WENO §3.2.2 needs attention)."""


# --------------------------------------------------------------------------------------
# the equations, as pure functions


def pseudo_labels(
    signal: Tensor,
    bag_index: Tensor,
    bag_label: Tensor,
    mode: Literal["per_bag", "global"] = "per_bag",
    eps: float = 1e-5,
) -> Tensor:
    """Student targets, Eq. 13 with the min–max normalisation of Eq. 7.

    ``signal`` (M,): the teacher's instance signal for M instances; ``bag_index`` (M,):
    which bag each belongs to; ``bag_label`` (M,): that bag's label. Positive bags get
    ``(s − min)/(max − min)`` (min/max over the instance's bag, or over every instance
    for ``mode="global"`` as in the released code) clamped to [eps, 1 − eps]; a bag
    whose signal is constant gets 1 − eps. Negative bags get exactly 0.
    """
    s = signal.double()
    if mode == "per_bag":
        n_bags = int(bag_index.max()) + 1 if bag_index.numel() else 0
        lo = torch.full((n_bags,), float("inf"), dtype=s.dtype, device=s.device)
        hi = torch.full((n_bags,), float("-inf"), dtype=s.dtype, device=s.device)
        lo = lo.scatter_reduce(0, bag_index, s, reduce="amin")[bag_index]
        hi = hi.scatter_reduce(0, bag_index, s, reduce="amax")[bag_index]
    elif mode == "global":
        lo, hi = s.min().expand_as(s), s.max().expand_as(s)
    else:
        raise ValueError(f"unknown normalisation {mode!r}; use per_bag or global")
    span = hi - lo
    flat = span <= 1e-12
    norm = torch.where(flat, torch.ones_like(s), (s - lo) / torch.where(flat, torch.ones_like(span), span))
    y = norm.clamp(eps, 1.0 - eps)
    return torch.where(bag_label > 0.5, y, torch.zeros_like(y)).to(signal.dtype)


def bag_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """softmax over each bag's real instances of (B, N) scores; 0 where padded."""
    z = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(z, dim=1).masked_fill(~mask, 0.0)


def signal_for(out: MILOutput, mask: Tensor, teacher: str, reading: Literal["softmax", "logits"]) -> Tensor:
    """The teacher's instance signal that Eq. 13 normalises (see ``TEACHER_SIGNALS``).

    ``logits``: ``instance_scores`` as they are (released code: ``returnBeforeSoftMaxA``);
    ``softmax``: the attention weights a_ij of Eq. 5 = softmax over the bag of those logits
    (teachers whose scores already are softmax weights keep them).
    """
    s = out.instance_scores
    if s is None:
        raise TeacherWithoutAttentionError(f"teacher {teacher!r} returned no instance signal")
    if reading == "logits" or teacher in SOFTMAX_SIGNALS:
        return s
    return bag_softmax(s, mask)


def hpm_keep_mask(student_probs: Tensor, mask: Tensor, bag_labels: Tensor, threshold: float) -> Tensor:
    """Hard positive instance mining, §3.3: which instances the teacher sees.

    In positive bags drop every real instance with student probability > ``threshold``;
    if none would remain keep the single most positive one. Negative bags are untouched.
    """
    mask = mask.to(torch.bool)
    pos_bag = (bag_labels > 0.5).unsqueeze(1)
    keep = mask & ~(pos_bag & (student_probs > threshold))
    empty = (keep.sum(1) == 0) & mask.any(1)
    if bool(empty.any()):
        best = student_probs.masked_fill(~mask, float("-inf")).argmax(1)
        keep = keep.clone()
        keep[empty, best[empty]] = True
    return keep


# --------------------------------------------------------------------------------------
# the network: encoder + teacher + student, and its two labeler views


class WENONet(nn.Module):
    """Shared encoder f, teacher (attention MIL on f's embeddings), student head φ_s (Fig. 2)."""

    def __init__(self, encoder: nn.Module, teacher: MILModel, student_head: nn.Module, student_encoder: nn.Module | None,
                 teacher_trunk: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.teacher_trunk = teacher_trunk or nn.Identity()  # unshared FC layers before the teacher (released code)
        self.teacher = teacher
        self.student_head = student_head
        self.student_encoder = student_encoder  # None = shared encoder (§3.2.1)

    def student_embed(self, x: Tensor) -> Tensor:
        """Student embeddings of flat instances (M, ...) → (M, D)."""
        return (self.student_encoder or self.encoder)(x)

    def student_logits_flat(self, x: Tensor) -> Tensor:
        """φ_s(f(x)) of flat instances (M, ...) → (M,) logits (Eq. 14)."""
        return self.student_head(self.student_embed(x)).squeeze(-1)

    def student_logits(self, x: Tensor, mask: Tensor, h: Tensor | None = None) -> Tensor:
        """Student logits of padded bags (B, N); ``h`` reuses shared-encoder embeddings."""
        if h is None or self.student_encoder is not None:
            h = encode_instances(self.student_encoder or self.encoder, x, mask)
        return self.student_head(h).squeeze(-1) * mask

    def teacher_forward(self, h: Tensor, mask: Tensor, adj: object | None = None) -> MILOutput:
        """Teacher on embeddings ``h`` seen through ``mask`` (``adj`` must match ``mask``, see follow_mask)."""
        return self.teacher(self.teacher_trunk(h), mask, adj)


class WENOStudent(MILModel):
    """Labeler view of the student: instance probabilities; bag score = max over instances (§3.2.3)."""

    def __init__(self, net: WENONet):
        super().__init__()
        self.net = net

    def instance_logits(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = full_mask(x, mask)
        return self.net.student_logits(x, mask)

    def forward(self, x: Tensor, mask: Tensor | None = None, adj: object | None = None) -> MILOutput:
        mask = full_mask(x, mask)
        logits = self.instance_logits(x, mask)
        bag = logits.masked_fill(~mask, float("-inf")).amax(1)  # sigmoid(max) = max of probabilities
        return MILOutput(bag_logits=bag, instance_scores=torch.sigmoid(logits) * mask)


class WENOTeacher(MILModel):
    """Labeler view of the teacher: its own bag logit and instance scores on f's embeddings."""

    def __init__(self, net: WENONet):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, mask: Tensor | None = None, adj: object | None = None) -> MILOutput:
        mask = full_mask(x, mask)
        h = encode_instances(self.net.encoder, x, mask)
        return self.net.teacher_forward(h, mask, adj)


# --------------------------------------------------------------------------------------
# config


class WENOConfig(StrictModel):
    """WENO method section; every default cites its source."""

    name: Literal["weno"] = "weno"
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="instance encoder f (§3.2.1)")
    teacher: ModelSection = Field(
        default_factory=lambda: model_config({"name": "abmil"}),
        description="attention MIL teacher (§3.2.2; ABMIL and DSMIL in §4.5); any of TEACHER_SIGNALS",
    )
    teacher_trunk: list[int] | None = Field(
        None, description="unshared FC+ReLU widths between f and the teacher (released AlexNet code: [4096, 4096])"
    )
    student_hidden: int | list[int] | None = Field(
        None, description="hidden widths of the student head (FC+ReLU each); None = one linear layer (§4.3: FC heads); "
        "released AlexNet code: [4096, 4096]"
    )
    distillation: bool = Field(True, description="Table 4 'Distillation' (off = the plain teacher)")
    shared_encoder: bool = Field(True, description="Table 4 'Shared Encoder' (§3.2.1)")
    hpm: bool = Field(True, description="Table 4 'HPM' (§3.3)")
    hpm_threshold: float = Field(0.5, gt=0, lt=1, description="§3.3; NOTES.md: released code's working setting 0.5")
    hpm_warmup_epochs: int = Field(
        11, ge=0, description="HPM from 0-based epoch index hpm_warmup_epochs on; 11 = the released code's 'epoch > 10' "
        "(§3.3 'a certain number of epochs'; Fig. 3 CIFAR: after epoch 150)"
    )
    hpm_threshold_grid: list[float] | None = Field(
        None, description="§4.3: grid-search the HPM threshold on validation (student bag AUROC); on in paper configs"
    )
    pseudo_label: Literal["paper", "code"] = Field(
        "code",
        description="Eq. 7/13 signal: code = pre-softmax logits, min–max over all training instances (released code; "
        "default: measured better, see docs/benchmarks.md 'WENO student vs ABMIL' — a per-bag min–max of softmax "
        "weights gives every positive but the top one an exponentially small target); paper = softmax attention "
        "a_ij of Eq. 5, min–max per bag (the paper's text, NOTES.md; on in the paper configs)",
    )
    normalisation: Literal["per_bag", "global"] | None = Field(
        None, description="override the min–max of pseudo_label (ablations); None = per_bag for paper, global for code"
    )
    teacher_signal: Literal["softmax", "logits"] | None = Field(
        None, description="override the signal of pseudo_label (ablations); None = softmax for paper, logits for code"
    )
    clamp_eps: float = Field(1e-5, gt=0, lt=0.5, description="targets clamped to [ε, 1−ε] (NOTES.md, released code)")
    student_batch_size: int = Field(256, ge=1, description="student pass mini-batch (NOTES.md)")
    student_encoder_warmup_epochs: int = Field(
        0, ge=0, description="epochs in which the student's loss trains its head only, not the shared encoder "
        "(0 = the paper: both branches update f from the first epoch, §3.2.1)"
    )
    student_neg_weight: float | None = Field(
        None, gt=0, lt=1, description="released code's class weighting of the student CE (0.2); None = plain CE, Eq. 15"
    )

    @field_validator("teacher", mode="before")
    @classmethod
    def _teacher(cls, v: object) -> StrictModel:
        cfg = model_config(v)
        name = getattr(cfg, "name", None)
        if name not in TEACHER_SIGNALS:
            raise TeacherWithoutAttentionError(
                f"method.teacher: model {name!r} has no attention: it cannot be WENO's teacher (Eq. 13 needs an attention or instance signal); "
                f"use one of: {', '.join(TEACHER_SIGNALS)}"
            )
        return cfg

    @field_validator("teacher_signal", mode="before")
    @classmethod
    def _old_signal_names(cls, v: object) -> object:
        """Run directories written before the rename: instance_scores → logits, attention → softmax."""
        return {"instance_scores": "logits", "attention": "softmax"}.get(v, v) if isinstance(v, str) else v

    @field_validator("hpm_threshold_grid")
    @classmethod
    def _grid(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            if not v:
                raise ValueError("hpm_threshold_grid must not be empty (or leave it out)")
            bad = [t for t in v if not 0 < t < 1]
            if bad:
                raise ValueError(f"hpm_threshold_grid values must lie in (0, 1), got {bad}")
        return v

    @field_validator("teacher_trunk", "student_hidden")
    @classmethod
    def _widths(cls, v):
        widths = [v] if isinstance(v, int) else v
        if widths is not None and any(w < 1 for w in widths):
            raise ValueError(f"layer widths must be >= 1, got {v}")
        return v

    def resolved_signal(self) -> Literal["softmax", "logits"]:
        return self.teacher_signal or ("softmax" if self.pseudo_label == "paper" else "logits")

    def resolved_normalisation(self) -> Literal["per_bag", "global"]:
        return self.normalisation or ("per_bag" if self.pseudo_label == "paper" else "global")


def _mlp(dim: int, widths: list[int], out: int | None) -> tuple[nn.Module, int]:
    """FC+ReLU layers of ``widths`` (then a Linear to ``out`` when given)."""
    if not widths and out is not None:
        return nn.Linear(dim, out), out  # one linear layer (state-dict names as before)
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(dim, w), nn.ReLU()]
        dim = w
    if out is not None:
        layers.append(nn.Linear(dim, out))
    return (nn.Sequential(*layers) if layers else nn.Identity()), dim


def build_net(cfg: WENOConfig) -> WENONet:
    """Encoder, (unshared trunk +) teacher on its embeddings (identity encoder inside), student head (+ own encoder)."""
    encoder, dim = build_encoder(cfg.encoder)
    cls = _teacher_class(cfg)
    trunk, tdim = _mlp(dim, cfg.teacher_trunk or [], None)
    teacher = cls.from_config(cfg.teacher, nn.Identity(), tdim)
    hidden = [cfg.student_hidden] if isinstance(cfg.student_hidden, int) else (cfg.student_hidden or [])
    head, _ = _mlp(dim, hidden, 1)
    student_encoder = None if cfg.shared_encoder else build_encoder(cfg.encoder)[0]
    return WENONet(encoder, teacher, head, student_encoder, trunk if cfg.teacher_trunk else None)

def _teacher_class(cfg: WENOConfig):
    from milkit import registry

    return registry.lookup(registry.MODELS, "model", cfg.teacher.name)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------
# the LightningModule: alternating teacher / student optimisation


class _NoOpt:
    """Stands in for the optimiser of a parameter-free part (identity encoder)."""

    def zero_grad(self, *a, **k) -> None:  # noqa: D102
        pass

    def step(self, *a, **k) -> None:  # noqa: D102
        pass


class WENOModule(L.LightningModule):
    """Teacher pass over bags (Lightning's train loader), then a student pass over the
    training instances shuffled across bags, every epoch (§3.2.1); manual optimisation.

    Validation logs ``val/bag_auroc`` (student, max over instances; the teacher's when
    distillation is off), ``val/teacher_bag_auroc``, ``val/bag_bce``, ``val/auroc_minus_bce``.
    """

    def __init__(self, net: WENONet, cfg: WENOConfig, trainer_cfg: TrainerConfig, train: BagDataset, seed: int = 0):
        super().__init__()
        self._teacher_epoch_sums: Tensor | None = None  # this epoch's teacher sums (see _log_teacher_epoch)
        self.automatic_optimization = False
        self.net = net
        self.cfg = cfg
        self.trainer_cfg = trainer_cfg
        self.seed = seed
        self.signal_kind = cfg.resolved_signal()
        # the instance table of the student pass (kept out of the state dict)
        ids = [b.bag_id for b in train]
        if len(set(ids)) != len(ids):
            raise ValueError("WENO needs unique bag ids in the training split")
        self._row = {bid: i for i, bid in enumerate(ids)}
        sizes = torch.tensor([len(b) for b in train], dtype=torch.long)
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        self._inst_x = torch.cat([b.instances for b in train]) if len(train) else torch.zeros(0)
        self._inst_bag = torch.repeat_interleave(torch.arange(len(train)), sizes)
        self._inst_bag_label = torch.repeat_interleave(torch.tensor([float(b.label) for b in train]), sizes)
        self._signal = torch.zeros(len(self._inst_bag))
        self._seen = torch.zeros(len(self._inst_bag), dtype=torch.bool)
        self._val: dict[str, list[Tensor]] = {"student": [], "teacher": [], "y": []}

    # -- optimisers: encoder, teacher head, student head (released code: one per part) --
    def _param_groups(self) -> list[list]:
        return [
            list(self.net.encoder.parameters()),
            list(self.net.teacher_trunk.parameters()) + list(self.net.teacher.parameters()),
            list(self.net.student_head.parameters())
            + (list(self.net.student_encoder.parameters()) if self.net.student_encoder is not None else []),
        ]

    def configure_optimizers(self):  # noqa: D102
        tc = self.trainer_cfg
        groups = self._param_groups()
        # a parameter-free encoder (identity on features) gets no optimiser of its own
        self._has_opt = [bool(g) for g in groups]
        opts = [build_optimizer(g, tc) for g in groups if g]
        scheds = [build_scheduler(o, tc) for o in opts]
        if scheds[0] is not None:
            return opts, scheds
        return opts

    def _opts(self) -> tuple:
        got = self.optimizers()
        got = list(got) if isinstance(got, (list, tuple)) else [got]
        out = []
        for has in getattr(self, "_has_opt", [True, True, True]):
            out.append(got.pop(0) if has else _NoOpt())
        enc, tea, stu = out
        return enc, tea, stu

    def hpm_active(self) -> bool:
        return self.cfg.hpm and self.cfg.distillation and self.current_epoch >= self.cfg.hpm_warmup_epochs

    def teacher_signal(self, out: MILOutput, mask: Tensor) -> Tensor:
        """Eq. 13's instance signal of the teacher's output (``pseudo_label`` reading)."""
        return signal_for(out, mask, self.cfg.teacher.name, self.signal_kind)  # type: ignore[attr-defined]

    def teacher_loss(self, batch: BagBatch) -> tuple[Tensor, MILOutput, Tensor, Tensor]:
        """Eq. 8–12 on one batch of bags, with HPM (§3.3) when active.

        Returns (loss, teacher output on the bags it saw, embeddings h, the mask it saw).
        """
        mask = batch.mask
        h = encode_instances(self.net.encoder, batch.instances, mask)
        keep = mask
        if self.hpm_active():
            with torch.no_grad():
                p = torch.sigmoid(self.net.student_logits(batch.instances, mask, h.detach()))
            keep = hpm_keep_mask(p, mask, batch.labels, self.cfg.hpm_threshold)
        adj = follow_mask(batch.adj, mask, keep)  # the bag graph follows the dropped instances (issue 16)
        out = self.net.teacher_forward(h, keep, adj)
        bce = bce_with_targets(out.bag_logits, batch.labels).mean()
        loss = combine_losses(self.net.teacher, bce, dataclasses.replace(batch, mask=keep, adj=adj), out)
        return loss, out, h, keep

    def training_step(self, batch: BagBatch, batch_idx: int) -> None:
        enc, tea, stu = self._opts()
        loss, out, h, keep = self.teacher_loss(batch)
        enc.zero_grad()
        tea.zero_grad()
        self.manual_backward(loss)
        enc.step()
        tea.step()
        # this epoch's (Σ loss·bags, bags, kept instances, instances) on this rank; tensors, so no
        # device sync per step (read once, at the epoch's last step)
        dt = torch.float32 if loss.device.type == "mps" else torch.float64  # counts exact past 2^24 instances
        step = torch.stack([loss.detach().to(dt) * len(batch), torch.tensor(float(len(batch)), dtype=dt, device=loss.device),
                            keep.sum().to(dt), batch.mask.sum().to(dt)])
        acc = self._teacher_epoch_sums
        self._teacher_epoch_sums = step if acc is None else acc + step
        if self.cfg.distillation:
            self._record_signal(batch, out, h, keep)
        if batch_idx == self.trainer.num_training_batches - 1:
            self._log_teacher_epoch()
            if self.cfg.distillation:
                self.student_pass()
            scheds = self.lr_schedulers()
            for s in scheds if isinstance(scheds, list) else ([scheds] if scheds is not None else []):
                s.step()

    def on_train_epoch_start(self) -> None:  # noqa: D102
        self._teacher_epoch_sums = None

    def _log_teacher_epoch(self) -> None:
        """``train/teacher_loss`` (bag-weighted epoch mean) and ``train/hpm_kept_fraction`` (instances the
        teacher saw / real instances) over every rank's share: the values one process logs for the same
        global batches (DDP: summed with ``distributed.all_sum``, a collective of the last step)."""
        acc, self._teacher_epoch_sums = self._teacher_epoch_sums, None
        local = [float(v) for v in acc.double().cpu()] if acc is not None else [0.0, 0.0, 0.0, 0.0]
        loss_sum, n_bags, kept, total = distributed.all_sum(*local)
        if n_bags:
            self.log("train/teacher_loss", loss_sum / n_bags, on_step=False, on_epoch=True, batch_size=1)
        if total:
            self.log("train/hpm_kept_fraction", kept / total, on_step=False, on_epoch=True, batch_size=1)

    @torch.no_grad()
    def _record_signal(self, batch: BagBatch, out: MILOutput, h: Tensor, keep: Tensor) -> None:
        """Store the teacher's instance signal for Eq. 13. When HPM hid instances, the
        signal comes from a gradient-free teacher forward on the whole bag, so every
        instance gets the teacher's own view (dropped ones included)."""
        if not torch.equal(keep, batch.mask):
            out = self.net.teacher_forward(h.detach(), batch.mask, batch.adj)
        sig = self.teacher_signal(out, batch.mask).detach().float().cpu()
        for b, bid in enumerate(batch.bag_ids):
            if bid not in self._row:
                raise ValueError(f"bag {bid!r} is not in the training split WENO was built with")
            r = self._row[bid]
            lo, hi = int(self._offsets[r]), int(self._offsets[r + 1])
            self._signal[lo:hi] = sig[b, : hi - lo]
            self._seen[lo:hi] = True

    def student_targets(self) -> Tensor:
        """Eq. 13 targets for every training instance from the last teacher pass."""
        seen = self._seen
        y = torch.zeros_like(self._signal)
        if bool(seen.any()):
            y[seen] = pseudo_labels(
                self._signal[seen], self._inst_bag[seen], self._inst_bag_label[seen], self.cfg.resolved_normalisation(),
                self.cfg.clamp_eps,
            )
        return y

    #: DDP: validation is gathered across ranks, and so is the teacher's instance table
    gathers_validation = True

    def student_pass(self) -> None:
        """Eq. 14–15 over every training instance, shuffled across bags, batch 256.

        Several processes (DDP): the ranks first merge the teacher signal each recorded for its
        own bags, so that every rank holds the whole table and draws the same shuffled order;
        rank r then takes every W-th instance of each mini-batch, weighting its loss so that
        DDP's gradient average is the gradient of the mini-batch mean (the one-process step)."""
        enc, _, stu = self._opts()
        world, me = distributed.world_size(), distributed.rank()
        if world > 1:  # this epoch's records of every rank; _seen_all: ever recorded (one process: _seen)
            self._signal, fresh = distributed.merge_seen(self._signal, self._seen)
            self._seen_all = self._seen_all | fresh if hasattr(self, "_seen_all") else fresh
            self._seen = self._seen_all.clone()
        targets = self.student_targets()
        seen = torch.nonzero(self._seen).squeeze(1)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.current_epoch)
        order = seen[torch.randperm(len(seen), generator=g)]
        total, n = 0.0, 0
        # before student_encoder_warmup_epochs the student's loss trains its head only: the
        # shared encoder is not pulled by pseudo labels of a teacher that has not learned yet
        shared_step = self.net.student_encoder is None and self.current_epoch >= self.cfg.student_encoder_warmup_epochs
        for whole in order.split(self.cfg.student_batch_size):
            chunk = whole[me::world]  # one process: the whole mini-batch
            x = self._inst_x[chunk].to(self.device)
            t = targets[chunk].to(self.device)
            if shared_step or self.net.student_encoder is not None:
                logits = self.net.student_logits_flat(x)
            else:
                with torch.no_grad():
                    h = self.net.student_embed(x)
                logits = self.net.student_head(h).squeeze(-1)
            # this rank's share of the mini-batch mean; an empty share still joins DDP's all-reduce
            share = len(chunk) * world / len(whole)
            loss = self.student_loss(logits, t) * share if len(chunk) else logits.sum() * 0.0
            stu.zero_grad()
            if shared_step:
                enc.zero_grad()
            self.manual_backward(loss)
            stu.step()
            if shared_step:
                enc.step()
            total += float(loss.detach()) * len(whole) / world
            n += len(chunk)
        total, n = distributed.all_sum(total, n)
        if world > 1:  # from now on _seen marks what this rank records, for the next merge
            self._seen = torch.zeros_like(self._seen)
        if n:
            self.log("train/student_loss", total / n, on_step=False, on_epoch=True, batch_size=1)

    def student_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Eq. 15: CE against soft targets (optionally the released code's class weights)."""
        if self.cfg.student_neg_weight is None:
            return bce_with_targets(logits, targets).mean()
        w = self.cfg.student_neg_weight
        logp = torch.nn.functional.logsigmoid(logits)
        log1mp = torch.nn.functional.logsigmoid(-logits)
        return -(w * (1 - targets) * log1mp + (1 - w) * targets * logp).mean()

    # -- validation --------------------------------------------------------------------
    def validation_step(self, batch: BagBatch, batch_idx: int) -> None:
        mask = batch.mask
        h = encode_instances(self.net.encoder, batch.instances, mask)
        t = self.net.teacher_forward(h, mask, batch.adj)
        s = self.net.student_logits(batch.instances, mask, h).masked_fill(~mask, float("-inf")).amax(1)
        self._val["student"].append(torch.sigmoid(s).cpu())
        self._val["teacher"].append(torch.sigmoid(t.bag_logits).cpu())
        self._val["y"].append(batch.labels.cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val["y"] and not distributed.is_distributed():
            return
        y, ps, pt = (torch.cat(self._val[k]).double() if self._val[k] else torch.zeros(0, dtype=torch.float64)
                     for k in ("y", "student", "teacher"))
        for v in self._val.values():
            v.clear()
        y, ps, pt = distributed.gather_in_order(y, ps, pt)  # every rank's validation bags, in dataset order
        if len(y) == 0:
            return

        def score(p: Tensor) -> tuple[float, float]:
            a = auroc(y.numpy(), p.numpy())
            a = 0.5 if np.isnan(a) else a
            return a, float(torch.nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y))

        ta, tb = score(pt)
        sa, sb = score(ps) if self.cfg.distillation else (ta, tb)
        self.log("val/teacher_bag_auroc", ta)
        self.log("val/student_bag_auroc", sa)
        self.log("val/bag_auroc", sa)
        self.log("val/bag_bce", sb)
        self.log("val/auroc_minus_bce", sa - sb)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):  # noqa: D102
        if isinstance(batch, BagBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


# --------------------------------------------------------------------------------------
# the Method


class WENOMethod(Method):
    """Stages ``student`` (primary; bag = max of instance probabilities) and ``teacher``.

    Both labelers read ``stages/<primary>/model.pt`` (the whole WENO network). With a
    ``hpm_threshold_grid`` one run per threshold goes to ``stages/student_hpm<t>/`` and
    the best on validation student bag AUROC is copied to ``stages/student/``.
    """

    Config = WENOConfig

    @property
    def primary_stage(self) -> str:  # type: ignore[override]
        return "student" if self.cfg.distillation else "teacher"

    def _check_trainer(self, tr: TrainerConfig) -> None:
        if tr.accumulate_grad_batches != 1:
            raise ValueError("weno uses manual optimisation: trainer.accumulate_grad_batches must be 1 (use batch_size)")
        if tr.gradient_clip_val is not None:
            raise ValueError("weno uses manual optimisation: trainer.gradient_clip_val is not supported")

    def _fit_one(self, splits: DataSplits, stage_dir, cfg: WENOConfig) -> WENONet:
        tr = self.exp.trainer
        seed_everything(self.exp.seed)  # initial weights depend on the seed only, not on what ran before
        net = build_net(cfg)
        module = WENOModule(net, cfg, tr, splits.train, seed=self.exp.seed)
        fit_stage(
            module,
            bag_loader(splits.train, tr, shuffle=True, seed=self.exp.seed),
            bag_loader(splits.val, tr, shuffle=False),
            stage_dir,
            tr,
            seed=self.exp.seed,
        )
        return net

    def labelers(self, net: WENONet, run: RunDir | None = None) -> dict[str, Labeler]:
        thr = (lambda s: run.read_threshold(s).get("threshold")) if run is not None else (lambda s: None)
        out = {"teacher": Labeler(WENOTeacher(net), "model", thr("teacher"))}
        if self.cfg.distillation:
            out = {"student": Labeler(WENOStudent(net), "singleton", thr("student")), **out}
        return out

    def fit(self, splits: DataSplits, run: RunDir) -> dict[str, Labeler]:
        self._check_trainer(self.exp.trainer)
        cfg: WENOConfig = self.cfg
        stage = self.primary_stage
        grid = cfg.hpm_threshold_grid if (cfg.hpm and cfg.distillation and cfg.hpm_threshold_grid) else None
        if not grid:
            net = self._fit_one(splits, run.stage_dir(stage), cfg)
            return self.labelers(net)
        results = []
        best: tuple[float, float, WENONet] | None = None
        for t in grid:
            sub = cfg.model_copy(update={"hpm_threshold": float(t)})
            d = run.stage_dir(f"{stage}_hpm{t:g}")
            net = self._fit_one(splits, d, sub)
            score = evaluate_labeler(Labeler(WENOStudent(net), "singleton"), splits.val, None)["bag_auroc"]
            score = float("nan") if score is None else float(score)
            results.append({"hpm_threshold": float(t), "val_bag_auroc": score, "stage_dir": str(d)})
            if best is None or (not np.isnan(score) and (np.isnan(best[1]) or score > best[1])):
                best = (float(t), score, net)
        assert best is not None
        dest = run.model_path(stage)
        if distributed.is_rank_zero():  # every rank chose the same threshold; rank 0 writes
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run.stage_dir(f"{stage}_hpm{best[0]:g}") / "model.pt", dest)
            io.write_json(run.stage_dir(stage) / "hpm_grid.json",
                          {"chosen": best[0], "criterion": "val student bag AUROC", "runs": results})
        distributed.barrier()
        return self.labelers(best[2])

    def load(self, run: RunDir) -> dict[str, Labeler]:
        net = build_net(self.cfg)
        restore_submodule(net, run.model_path(self.primary_stage), prefix="net.")
        net.eval()
        return self.labelers(net, run)
