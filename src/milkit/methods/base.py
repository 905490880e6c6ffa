"""What every training recipe (Method) provides, and the shared MIL plumbing.

A Method takes an :class:`~milkit.config.Experiment` and the data splits, trains
one or more *stages* (each through :func:`milkit.engine.fit_stage`) and returns
one :class:`Labeler` per stage. ``load(run)`` rebuilds the same labelers from a
run directory alone. ``evaluate`` and ``label`` have MIL defaults here; methods
whose output is a pixel map (IKD-MIL, Max-Min) override them.
"""

from __future__ import annotations

import copy
import csv
import io as _io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from milkit import io
from milkit.config import Experiment, StrictModel, TrainerConfig
from milkit.data.bag import BagBatch, BagDataset, collate_bags
from milkit.data.base import DataSplits
from milkit.engine import configure_optimizers
from milkit.metrics.classification import auroc, binary_metrics, choose_threshold, nan_to_none
from milkit.models.base import MILModel, bag_and_instance_logits
from milkit.report import ScoreSet
from milkit.run_dir import RunDir
from milkit.view.run_slides import slide_bags, slide_geometry

InstanceMode = Literal["attention", "singleton", "model"]


def bag_loader(ds: BagDataset, cfg: TrainerConfig, shuffle: bool, seed: int = 0) -> DataLoader:
    """DataLoader of padded bag batches; shuffling uses an explicit seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        collate_fn=collate_bags,
        num_workers=cfg.num_workers,
        generator=g if shuffle else None,
    )


@dataclass
class InstanceOutputs:
    """What a labeler says about a batch of bags (padded positions hold 0).

    ``raw``: the method's own instance score (attention logit, instance probability, …);
    ``probability``: the score calibrated on validation (:mod:`milkit.trust.calibration`),
    None before calibration for non-probability scores; ``uncertainty``: the spread of the
    calibrated probability over seed replicas, None for a single model (never invented).
    """

    bag_prob: Tensor
    raw: Tensor
    probability: Tensor | None
    uncertainty: Tensor | None = None
    #: what the calibrator reads (the instance logit in singleton mode, else the raw score)
    calibration_input: Tensor | None = None


class Labeler:
    """A fitted model that turns a bag into a bag probability and instance scores.

    ``instance_mode``: ``"model"`` uses the model's own ``instance_scores``
    (attention logits for ABMIL), ``"singleton"`` scores every instance as a bag of
    size one (sigmoid of ``instance_logits``; Distill-to-Label student, §III-C).
    ``calibrator`` maps raw scores to validation-calibrated probabilities; ``threshold``
    applies to the probability once calibrated (``threshold_on``), and ``criterion`` names
    how it was chosen on validation.
    """

    def __init__(self, model: MILModel, instance_mode: InstanceMode = "model", threshold: float | None = None,
                 calibrator=None, criterion: str | None = None):
        self.model = model.eval()
        self.instance_mode = instance_mode
        self.threshold = threshold
        self.calibrator = calibrator
        self.criterion = criterion

    @property
    def score_kind(self) -> str:
        return "probability" if self.instance_mode == "singleton" else "score"

    @property
    def members(self) -> list["Labeler"]:
        """The seed replicas behind this labeler (itself for a single model)."""
        return [self]

    @property
    def threshold_on(self) -> str:
        """``"probability"`` when labels threshold the (calibrated) probability, else ``"score"``."""
        if getattr(self, "calibrator", None) is not None or self.score_kind == "probability":
            return "probability"
        return "score"

    @torch.no_grad()
    def __call__(self, batch: BagBatch) -> tuple[Tensor, Tensor]:
        """(bag probabilities (B,), instance scores (B, N)); padded positions are 0."""
        bag_prob, raw, _ = self.scores_and_logits(batch)
        return bag_prob, raw

    @torch.no_grad()
    def scores_and_logits(self, batch: BagBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(bag probabilities, raw instance scores, calibration input): in ``singleton`` mode the
        calibration input is the instance logit itself, not its float32 sigmoid, which rounds
        to exactly 1 (ties) for confident positives; otherwise it is the raw score."""
        if self.instance_mode == "singleton":
            out, logits = bag_and_instance_logits(self.model, batch.instances, batch.mask, batch.adj)
            inst = torch.sigmoid(logits) * batch.mask
            return torch.sigmoid(out.bag_logits), inst, logits * batch.mask
        out = self.model(batch.instances, batch.mask, batch.adj)
        return torch.sigmoid(out.bag_logits), out.instance_scores, out.instance_scores

    @torch.no_grad()
    def outputs(self, batch: BagBatch) -> InstanceOutputs:
        """Raw score, calibrated probability (when available) and bag probability of a batch."""
        bag_prob, raw, cal_in = self.scores_and_logits(batch)
        cal = getattr(self, "calibrator", None)
        mask = batch.mask.to(raw.dtype)
        if cal is not None:
            x = cal_in if not cal.logit_input else raw  # logit_input: a calibrator fitted on probabilities
            prob = torch.as_tensor(cal(x.double().cpu().numpy()), dtype=raw.dtype).to(raw.device) * mask
        elif self.score_kind == "probability":
            prob = raw.clamp(0, 1)
        else:
            prob = None
        return InstanceOutputs(bag_prob, raw, prob, None, cal_in)

    @torch.no_grad()
    def predict_dataset(self, ds: BagDataset) -> list[dict]:
        """Per bag: id, label, bag probability, instance ``scores`` (what instance AUROC ranks:
        the raw score here), ``raw``, ``probability`` and ``uncertainty`` (None when
        unavailable) and instance labels (numpy)."""
        rows = []
        for bag in ds:
            o = self.outputs(collate_bags([bag]))
            n = len(bag)
            raw = o.raw[0, :n].cpu().numpy()
            rows.append(
                {
                    "bag_id": bag.bag_id,
                    "label": int(bag.label),
                    "bag_prob": float(o.bag_prob[0]),
                    "scores": raw,
                    "raw": raw,
                    "probability": None if o.probability is None else o.probability[0, :n].cpu().numpy(),
                    "calibration_input": None if o.calibration_input is None
                    else o.calibration_input[0, :n].double().cpu().numpy(),
                    "uncertainty": None if o.uncertainty is None else o.uncertainty[0, :n].cpu().numpy(),
                    "instance_labels": None if bag.instance_labels is None else bag.instance_labels.cpu().numpy(),
                    "slide": slide_geometry(bag),  # patch coords of a slide's feature bag (report.html)
                }
            )
        return rows

    def label_values(self, row: dict) -> np.ndarray:
        """The per-instance values that ``threshold`` applies to (probability or score)."""
        if self.threshold_on == "probability" and row.get("probability") is not None:
            return row["probability"]
        return row["scores"]


def _instance_arrays(rows: list[dict], key: str | None = "scores",
                     values=None) -> tuple[np.ndarray, np.ndarray] | None:
    ys, ss = [], []
    for r in rows:
        if r["instance_labels"] is None:
            continue
        keep = r["instance_labels"] >= 0
        ys.append(r["instance_labels"][keep])
        ss.append((values(r) if values is not None else r[key])[keep])
    if not ys:
        return None
    return np.concatenate(ys), np.concatenate(ss)


#: threshold criterion when the config names none (issue 11 §4: F1 on validation)
DEFAULT_CRITERION = "f1"


def select_threshold(labeler: Labeler, val: BagDataset, criterion: str = DEFAULT_CRITERION,
                     rows: list[dict] | None = None, label_free: str = "top_patch") -> dict:
    """Instance threshold chosen on validation instance labels by ``criterion`` (``f1``,
    ``youden_product`` or ``youden``; NOTES.md "Common ground"), on the calibrated probability
    once the labeler has one (``applies_to``).

    Without validation instance labels there is nothing to choose on: probabilities use the
    ``label_free`` rule on the slide labels (``trainer.label_free_threshold``,
    :func:`milkit.trust.calibration.label_free_threshold`: 0.5 by default), other scores their
    validation median, and the source says so.
    """
    rows = labeler.predict_dataset(val) if rows is None else rows
    on = labeler.threshold_on
    arrs = _instance_arrays(rows, values=labeler.label_values)
    base = {"criterion": criterion, "applies_to": on}
    if arrs is not None and len(np.unique(arrs[0])) == 2:
        return {"threshold": choose_threshold(*arrs, criterion=criterion), "source": f"validation:{criterion}", **base}
    base["criterion"] = "none (no validation instance labels)"
    if on == "probability":
        from milkit.trust.calibration import label_free_threshold

        thr = label_free_threshold(rows, labeler.label_values, label_free)
        if thr is not None and label_free != "top_patch":
            return {"threshold": thr, "source": f"slide labels:{label_free} (no validation instance labels)", **base}
        why = "" if thr is not None else f"; {label_free} needs negative and positive validation slides"
        return {"threshold": 0.5, "source": f"default:0.5 (no validation instance labels{why})", **base}
    scores = np.concatenate([r["scores"] for r in rows]) if rows else np.zeros(1)
    return {"threshold": float(np.median(scores)), "source": "default:validation median (no instance labels)", **base}


def evaluate_labeler(labeler: Labeler, ds: BagDataset, threshold: float | None,
                     scores: ScoreSet | None = None, rows: list[dict] | None = None) -> dict:
    """Bag AUROC (and bag F1/accuracy at 0.5); instance AUROC (on ``scores``) and F1/accuracy
    at ``threshold`` (on :meth:`Labeler.label_values`). Fills ``scores`` (for the report) when given."""
    rows = labeler.predict_dataset(ds) if rows is None else rows
    y = np.array([r["label"] for r in rows])
    p = np.array([r["bag_prob"] for r in rows])
    bag = binary_metrics(y, p, 0.5)
    out: dict = {"bag_auroc": bag["auroc"], "bag_f1": bag["f1"], "bag_accuracy": bag["accuracy"], "n_bags": len(rows)}
    arrs = _instance_arrays(rows)
    vals = _instance_arrays(rows, values=labeler.label_values)
    if scores is not None:
        scores.bag_true, scores.bag_prob, scores.threshold = y, p, threshold
        scores.instance_true, scores.instance_score = arrs if arrs is not None else (None, None)
        if vals is not None and labeler.threshold_on == "probability":
            scores.instance_prob = vals[1]  # what the threshold applies to (histogram)
        scores.slides = slide_bags(rows, labeler, threshold)  # report.html's per-slide section
    if arrs is None:
        out["instance"] = "not computable: this dataset has no instance labels"
    else:
        inst = binary_metrics(vals[0], vals[1], threshold if threshold is not None else 0.5)
        inst["auroc"] = auroc(*arrs)
        out.update({f"instance_{k}": v for k, v in inst.items()})
        out["instance_threshold"] = threshold
        out["instance_threshold_criterion"] = getattr(labeler, "criterion", None)
    return nan_to_none(out)


class LossModule(L.LightningModule):
    """One training stage given ``loss_fn(model, batch) -> (loss, logs)``: logs the loss terms
    per epoch, moves custom batches (anything with ``.to``) and builds the trainer's optimiser.
    Subclasses add validation (bag AUROC here, pixel metrics in ``seg_base.SegModule``).

    The lean loop: where nothing needs Lightning's automatic-optimisation closure (one optimiser,
    per-epoch schedules, no gradient clipping or accumulation, ``training_step`` and the optimiser
    hooks not overridden), each step is ``zero_grad, loss, manual_backward, step`` in
    ``training_step`` itself (manual optimisation, chosen in ``on_fit_start``) and the schedule
    is stepped at the start of each epoch to where Lightning would have it. Same arithmetic,
    same order, ~1 ms less per step (docs/benchmarks.md, issue 15); ``lean_loop = False`` turns it off.
    """

    #: run the lean loop where it applies (see the class docstring)
    lean_loop: ClassVar[bool] = True

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[torch.nn.Module, object], tuple[Tensor, dict[str, Tensor]]],
        trainer_cfg: TrainerConfig,
        params: Callable[[], object] | None = None,
    ):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.trainer_cfg = trainer_cfg
        self._params = params

    def training_step(self, batch, batch_idx: int) -> Tensor:  # noqa: D102
        if self.automatic_optimization:
            return self._loss_and_log(batch)
        if self.__dict__.get("_schedule_epoch") != self.current_epoch:
            self._catch_up_schedules()
        opt = self.optimizers()
        opt.zero_grad()  # set_to_none, as Lightning's optimizer_zero_grad
        loss = self._loss_and_log(batch)
        self.manual_backward(loss)
        opt.step()
        return loss.detach()

    def _loss_and_log(self, batch) -> Tensor:
        loss, logs = self.loss_fn(self.model, batch)
        bs = len(batch)
        self._accumulate_train_log("train/loss", loss, bs)
        for k, v in logs.items():
            self._accumulate_train_log(f"train/{k}", v, bs)
        return loss

    def lean_reason(self) -> str | None:
        """Why this stage runs Lightning's automatic optimisation (None: the lean loop applies)."""
        cfg = self.trainer_cfg
        if not self.lean_loop:
            return "lean_loop is off"
        if cfg.accumulate_grad_batches != 1:
            return "trainer.accumulate_grad_batches > 1"
        if cfg.gradient_clip_val:
            return "trainer.gradient_clip_val is set"
        for hook in ("training_step", "optimizer_step", "optimizer_zero_grad", "backward", "on_before_zero_grad",
                     "configure_gradient_clipping", "lr_scheduler_step"):
            if getattr(type(self), hook) is not getattr(LossModule, hook):
                return f"{type(self).__name__} overrides {hook}"
        trainer = self._trainer
        if trainer is None:
            return None
        if len(trainer.optimizers) != 1:
            return f"{len(trainer.optimizers)} optimisers"
        for c in trainer.lr_scheduler_configs:
            if c.reduce_on_plateau or c.interval != "epoch":
                return "a plateau or per-step learning-rate schedule"
        return None

    def on_fit_start(self) -> None:  # noqa: D102
        # after configure_optimizers (the optimisers and schedules are known), before any step or restore
        self.automatic_optimization = self.lean_reason() is not None

    def on_load_checkpoint(self, checkpoint: dict) -> None:  # noqa: D102
        # --resume of a stage begun in the other loop (a run started before the lean loop): Lightning
        # counts optimiser steps apart for either loop, and global_step (the CSV's step column, the
        # checkpoints' "saved at this step" check) reads the current loop's; give both the steps taken
        fl = checkpoint.get("loops", {}).get("fit_loop", {})
        auto = fl.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
        manual = fl.get("epoch_loop.manual_optimization.optim_step_progress")
        if not auto or not manual:
            return
        done = [d["total"]["completed"] for d in (auto, manual)]
        if done[0] and not done[1]:
            fl["epoch_loop.manual_optimization.optim_step_progress"] = copy.deepcopy(auto)
        elif done[1] and not done[0]:
            fl["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"] = copy.deepcopy(manual)

    def _catch_up_schedules(self) -> None:
        # Lightning steps an epoch schedule after each epoch e with (e + 1) % frequency == 0, so at the
        # first step of epoch e it has stepped e // frequency times (also after --resume from any epoch)
        for c in self.trainer.lr_scheduler_configs:
            target = self.current_epoch // c.frequency
            while c.scheduler.last_epoch < target:
                with warnings.catch_warnings():  # resumed: no optimiser step yet in this process
                    warnings.filterwarnings("ignore", ".*lr_scheduler.step\(\)` before `optimizer.step", UserWarning)
                    c.scheduler.step()
        self.__dict__["_schedule_epoch"] = self.current_epoch

    # ``train/*`` are batch-size-weighted epoch means, summed here on the device and logged once
    # per epoch: the value Lightning's ``self.log(on_epoch=True, batch_size=bs)`` per step gives
    # (same float32 sum and division), without its ~1 ms per call (docs/benchmarks.md, issue 15)
    def _accumulate_train_log(self, name: str, value, batch_size: int) -> None:
        acc = self.__dict__.setdefault("_train_log_sums", {})
        v = value.detach() if isinstance(value, Tensor) else torch.tensor(value, device=self.device,
                                                                        dtype=torch.get_default_dtype())
        if v.dtype not in (torch.float32, torch.float64):
            v = v.to(torch.get_default_dtype())
        if name in acc:
            acc[name] = (acc[name][0] + v * batch_size, acc[name][1] + batch_size)
        else:
            acc[name] = (v * batch_size, batch_size)

    def on_train_epoch_end(self) -> None:  # noqa: D102
        from milkit import distributed

        acc = self.__dict__.setdefault("_train_log_sums", {})
        if acc and distributed.is_distributed():  # every rank's share: the epoch mean one process logs
            names = list(acc)  # the same keys, in the same order, on every rank (same loss)
            sums = distributed.all_sum(*(float(acc[k][0]) for k in names), *(float(acc[k][1]) for k in names))
            acc = {k: (torch.tensor(sums[i], device=self.device), sums[len(names) + i]) for i, k in enumerate(names)}
        for name, (total, n) in acc.items():
            self.log(name, total / torch.tensor(n, device=total.device), on_step=False, on_epoch=True, batch_size=1)
        self.__dict__["_train_log_sums"] = {}

    def transfer_batch_to_device(self, batch, device, dataloader_idx):  # noqa: D102
        if hasattr(batch, "to") and not isinstance(batch, Tensor):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def configure_optimizers(self):  # noqa: D102
        params = self._params() if self._params is not None else self.model.parameters()
        return configure_optimizers(self, params, self.trainer_cfg)


class BagModule(LossModule):
    """LightningModule for one MIL stage: ``loss_fn(model, batch) -> (loss, logs)``;
    validation logs ``val/bag_auroc``, ``val/bag_bce`` and ``val/auroc_minus_bce``."""

    def __init__(
        self,
        model: MILModel,
        loss_fn: Callable[[MILModel, BagBatch], tuple[Tensor, dict[str, Tensor]]],
        trainer_cfg: TrainerConfig,
        params: Callable[[], object] | None = None,
    ):
        super().__init__(model, loss_fn, trainer_cfg, params)
        self._val_probs: list[Tensor] = []
        self._val_labels: list[Tensor] = []

    def validation_step(self, batch: BagBatch, batch_idx: int) -> None:
        out = self.model(batch.instances, batch.mask, batch.adj)
        self._val_probs.append(torch.sigmoid(out.bag_logits).detach().cpu())
        self._val_labels.append(batch.labels.detach().cpu())

    #: DDP: the validation AUROC is computed on every rank's bags (milkit.distributed)
    gathers_validation: ClassVar[bool] = True

    def on_validation_epoch_end(self) -> None:
        from milkit.distributed import gather_in_order, is_distributed

        if not self._val_probs and not is_distributed():
            return
        p, y = (torch.cat(v).double() if v else torch.zeros(0, dtype=torch.float64)
                for v in (self._val_probs, self._val_labels))
        self._val_probs.clear()
        self._val_labels.clear()
        p, y = gather_in_order(p, y)  # every rank's validation bags, in dataset order
        if len(y) == 0:
            return
        a = auroc(y.numpy(), p.numpy())
        a = 0.5 if np.isnan(a) else a
        bce = float(torch.nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y))
        self.log("val/bag_auroc", a)
        self.log("val/bag_bce", bce)
        self.log("val/auroc_minus_bce", a - bce)


@dataclass
class Stage:
    """A fitted stage: its name and the labeler it produced."""

    name: str
    labeler: Labeler


class Method:
    """Base class of every recipe. Subclasses set ``Config`` and implement ``fit`` and ``load``."""

    Config: ClassVar[type[StrictModel]]
    #: the stage whose labels ``milkit label`` writes by default
    primary_stage: ClassVar[str] = "mil"

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.cfg = exp.method

    def fit(self, splits: DataSplits, run: RunDir) -> dict[str, Labeler]:
        raise NotImplementedError

    def load(self, run: RunDir) -> dict[str, Labeler]:
        raise NotImplementedError

    # -- defaults for MIL methods (override for pixel-map methods) -------------------
    def choose_thresholds(self, labelers: dict[str, Labeler], splits: DataSplits, run: RunDir) -> None:
        """Per stage: the threshold chosen on validation by ``trainer.threshold_criterion``
        (default F1), written to ``stages/<stage>/threshold.json`` with its criterion."""
        criterion = getattr(self.exp.trainer, "threshold_criterion", DEFAULT_CRITERION)
        label_free = getattr(self.exp.trainer, "label_free_threshold", "top_patch")
        for name, lab in labelers.items():
            info = select_threshold(lab, splits.val, criterion, label_free=label_free)
            lab.threshold = info["threshold"]
            lab.criterion = info["criterion"]
            run.write_threshold(name, info)

    def evaluate(self, labelers: dict[str, Labeler], splits: DataSplits, run: RunDir,
                 scores: dict[str, dict[str, ScoreSet]] | None = None) -> dict:
        """Per stage and split: bag AUROC; instance AUROC/F1/accuracy at the validation threshold.
        ``scores[stage][split]`` receives the scores behind them (for ``report.html``)."""
        out: dict = {}
        for name, lab in labelers.items():
            thr = run.read_threshold(name)
            if thr.get("criterion") is not None:
                lab.criterion = thr["criterion"]
            out[name] = {"threshold": thr}
            for split in ("val", "test"):
                sc = ScoreSet(np.zeros(0), np.zeros(0))
                out[name][split] = evaluate_labeler(lab, splits.get(split), thr.get("threshold"), sc)
                if scores is not None:
                    scores.setdefault(name, {})[split] = sc
        return out

    def label(self, labeler: Labeler, ds: BagDataset, out_dir: Path, stage: str) -> list[Path]:
        """Write instance labels: CSV ``bag_id,instance,score,probability,uncertainty,label,criterion``
        (+ x,y when coords exist). ``score`` is the raw score (the mean over seeds for an
        ensemble), ``probability`` the calibrated one, ``uncertainty`` the seed spread (empty
        for one seed: unavailable), ``label`` = value ≥ threshold on ``threshold_on``, and
        ``criterion`` how the threshold was chosen on validation."""
        rows = labeler.predict_dataset(ds)
        thr = labeler.threshold if labeler.threshold is not None else 0.5
        criterion = getattr(labeler, "criterion", None) or "default 0.5 (no threshold.json)"
        buf = _io.StringIO()
        w = csv.writer(buf)
        has_coords = any(b.coords is not None for b in ds)
        w.writerow(["bag_id", "instance", "score", "probability", "uncertainty", "label", "criterion"]
                   + (["x", "y"] if has_coords else []))

        def fmt(a, k: int) -> str:
            return "" if a is None else f"{float(a[k]):.6g}"

        for bag, r in zip(ds, rows):
            vals = labeler.label_values(r)
            for k in range(len(r["raw"])):
                row = [r["bag_id"], k, fmt(r["raw"], k), fmt(r["probability"], k), fmt(r["uncertainty"], k),
                       int(vals[k] >= thr), criterion]
                if has_coords:
                    row += [int(bag.coords[k, 0]), int(bag.coords[k, 1])] if bag.coords is not None else ["", ""]
                w.writerow(row)
        path = Path(out_dir) / f"instance_labels_{stage}.csv"
        io.write_text(path, buf.getvalue())
        bag_buf = _io.StringIO()
        bw = csv.writer(bag_buf)
        bw.writerow(["bag_id", "bag_label", "bag_prob"])
        for r in rows:
            bw.writerow([r["bag_id"], r["label"], f"{r['bag_prob']:.6g}"])
        bag_path = Path(out_dir) / f"bag_predictions_{stage}.csv"
        io.write_text(bag_path, bag_buf.getvalue())
        return [path, bag_path]
