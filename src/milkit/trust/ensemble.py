"""Seed ensembles (issue 11 §3): K replicas of every stage on one split, labels from their mean.

Replica ``k`` (0 ≤ k < ``trainer.seeds``) is the same experiment with ``seed + k``: the
split is built once from the experiment's seed and shared, while initialisation and data
order follow the replica's seed. With K = 1 the run directory is exactly the one-model
layout (``stages/<stage>/``); with K > 1 replica k lives in ``stages/<stage>/seed-<k>/``
(model, logs, ``calibration.json``) and the ensemble's ``threshold.json`` in
``stages/<stage>/``.

The ensemble (:class:`EnsembleLabeler`) outputs, per instance, the mean over replicas of
the *calibrated* probabilities (raw scores of different replicas are on different scales),
the mean raw score (for the record) and the seed spread — the standard deviation of the
replicas' calibrated probabilities — as its uncertainty. Its bag probability is the mean of
the replicas' bag probabilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from milkit import io
from milkit.config import Experiment
from milkit.data.bag import BagBatch
from milkit.data.base import DataSplits
from milkit.methods.base import InstanceOutputs, Labeler, Method
from milkit.run_dir import RunDir
from milkit.trust.calibration import Calibrator, calibrate_rows

MethodFactory = Callable[[Experiment], Method]


@dataclass
class SeedRunDir(RunDir):
    """The run directory as replica ``k`` sees it: every stage under ``stages/<stage>/seed-<k>/``."""

    seed_index: int = 0

    def stage_dir(self, stage: str) -> Path:  # type: ignore[override]
        return RunDir(self.path).seed_stage_dir(stage, self.seed_index)


def n_seeds(exp: Experiment) -> int:
    return int(getattr(exp.trainer, "seeds", 1) or 1)


def replica_experiment(exp: Experiment, k: int) -> Experiment:
    """Replica ``k``: the experiment with ``seed + k`` (the split is built from ``exp.seed``)."""
    return exp if k == 0 else exp.model_copy(update={"seed": exp.seed + k})


def replica_run(run: RunDir, k: int, K: int) -> RunDir:
    """The one-model layout for K = 1, ``stages/<stage>/seed-<k>/`` otherwise."""
    return run if K == 1 else SeedRunDir(run.path, seed_index=k)


def _is_seg(method: Method) -> bool:
    from milkit.methods.seg_base import SegMethod

    return isinstance(method, SegMethod)


def check_supported(method: Method, exp: Experiment) -> None:
    """Pixel-map methods (IKD-MIL, Max-Min) label pixels, not patches: no seed ensembles yet."""
    if n_seeds(exp) > 1 and _is_seg(method):
        raise ValueError(f"trainer.seeds: {n_seeds(exp)} replicas are supported for patch (MIL) methods; "
                         f"{exp.method.name!r} writes pixel maps — use trainer.seeds: 1")


def fit_members(make_method: MethodFactory, exp: Experiment, splits: DataSplits,
                run: RunDir) -> tuple[Method, dict[str, list[Labeler]]]:
    """Train every replica; returns replica 0's method and, per stage, the K labelers.
    With ``trainer.parallel_seeds`` > 1 the replicas train in worker processes
    (:mod:`milkit.trust.parallel_seeds`) and their labelers are loaded from the run directory."""
    from milkit.engine import _RESUME, seed_everything
    from milkit.trust import parallel_seeds

    K = n_seeds(exp)
    P = parallel_seeds.n_workers(exp)
    if P > 1:
        check_supported(make_method(exp), exp)
        parallel_seeds.fit_parallel(make_method, exp, run, P, resume=_RESUME.get())
        return make_method(exp), parallel_seeds.load_members(make_method, exp, run)
    first: Method | None = None
    members: dict[str, list[Labeler]] = {}
    for k in range(K):
        ek = replica_experiment(exp, k)
        method = make_method(ek)
        check_supported(method, exp)
        seed_everything(ek.seed)  # initialisation depends on the replica's seed only
        labs = method.fit(splits, replica_run(run, k, K))
        for stage, lab in labs.items():
            members.setdefault(stage, []).append(lab)
        first = first or method
    assert first is not None
    return first, members


def calibrate(lab: Labeler, splits: DataSplits, stage_dir: Path) -> Calibrator | None:
    """Fit ``lab``'s calibrator on validation; write ``stage_dir/calibration.json``.
    Pixel-map labelers are not calibrated (None). When validation cannot calibrate (one class),
    the map is the identity on probabilities / σ on raw scores, and the file says so."""
    from milkit.methods.seg_base import SegLabeler

    if isinstance(lab, SegLabeler):
        return None
    lab.calibrator = None
    rows = lab.predict_dataset(splits.val)
    # probabilities without their logits (a labeler that does not report them): calibrate their logit
    logit = lab.score_kind == "probability" and (not rows or rows[0].get("calibration_input") is None)
    try:
        cal = calibrate_rows(rows, logit_input=logit)
    except ValueError as err:
        prob = lab.score_kind == "probability"
        cal = Calibrator(1.0, 0.0, 0.0, 1.0, False, f"uncalibrated ({err}): "
                         + ("the probability as it is (σ of the instance logit)" if prob else "σ(raw score)"))
    lab.calibrator = cal
    io.write_json(stage_dir / "calibration.json", cal.to_dict())
    return cal


def read_calibrator(stage_dir: Path) -> Calibrator | None:
    p = stage_dir / "calibration.json"
    return Calibrator.from_dict(json.loads(p.read_text())) if p.is_file() else None


class EnsembleLabeler(Labeler):
    """Mean of K calibrated replicas (module docstring); ``members`` keeps the replicas."""

    def __init__(self, members: list[Labeler], threshold: float | None = None, criterion: str | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self._members = list(members)
        self.model = members[0].model
        self.instance_mode = members[0].instance_mode
        self.threshold = threshold
        self.calibrator = None
        self.criterion = criterion

    @property
    def members(self) -> list[Labeler]:
        return self._members

    @property
    def score_kind(self) -> str:  # type: ignore[override]
        return "probability"

    @property
    def threshold_on(self) -> str:  # type: ignore[override]
        return "probability"

    @torch.no_grad()
    def outputs(self, batch: BagBatch) -> InstanceOutputs:
        outs = [m.outputs(batch) for m in self._members]
        if any(o.probability is None for o in outs):
            raise ValueError("every replica of an ensemble needs calibrated probabilities (calibration.json)")
        mean, spread = ensemble_probability([o.probability for o in outs])
        raw = torch.stack([o.raw.double() for o in outs]).mean(0)
        bag = torch.stack([o.bag_prob.double() for o in outs]).mean(0)
        return InstanceOutputs(bag.float(), raw.float(), mean.float(), (spread * batch.mask.double()).float())

    @torch.no_grad()
    def __call__(self, batch: BagBatch):
        o = self.outputs(batch)
        return o.bag_prob, o.probability

    def predict_dataset(self, ds) -> list[dict]:
        rows = super().predict_dataset(ds)
        for r in rows:
            r["scores"] = r["probability"]  # the ensemble's ranking score is its probability
        return rows


def finalise(method: Method, members: dict[str, list[Labeler]], splits: DataSplits, run: RunDir,
             K: int) -> dict[str, Labeler]:
    """Calibrate every replica on validation, form the ensembles (K > 1), choose each stage's
    threshold on validation (``trainer.threshold_criterion``) and write ``threshold.json``."""
    out: dict[str, Labeler] = {}
    for stage, labs in members.items():
        for k, lab in enumerate(labs):
            calibrate(lab, splits, replica_run(run, k, K).stage_dir(stage))
        out[stage] = labs[0] if K == 1 else EnsembleLabeler(labs)
    method.choose_thresholds(out, splits, run)
    return out


def load(make_method: MethodFactory, exp: Experiment, run: RunDir) -> tuple[Method, dict[str, Labeler]]:
    """Rebuild every stage's labeler (the ensemble for K > 1) from the run directory alone."""
    K = n_seeds(exp)
    method = make_method(exp)
    if K == 1:
        labs = method.load(run)
        for stage, lab in labs.items():
            lab.calibrator = read_calibrator(run.stage_dir(stage)) if not _is_seg(method) else None
            lab.criterion = run.read_threshold(stage).get("criterion")
        return method, labs
    per: dict[str, list[Labeler]] = {}
    for k in range(K):
        rk = replica_run(run, k, K)
        for stage, lab in make_method(replica_experiment(exp, k)).load(rk).items():
            lab.calibrator = read_calibrator(rk.stage_dir(stage))
            per.setdefault(stage, []).append(lab)
    out = {}
    for stage, labs in per.items():
        thr = run.read_threshold(stage)
        out[stage] = EnsembleLabeler(labs, thr.get("threshold"), thr.get("criterion"))
    return method, out


def ensemble_probability(probs) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble rule: the mean over replicas of their calibrated probabilities and, as the
    uncertainty, their spread (population sd). ``probs``: one array / tensor per replica, same shape."""
    p = torch.stack([torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).double() for x in probs])
    return p.mean(0), p.std(0, unbiased=False)
