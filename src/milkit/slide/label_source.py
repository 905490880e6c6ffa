"""Which model labels which slide in ``milkit label RUN --slides/--features``.

``RUN`` is one run directory (its stage's labeler, the seed ensemble for ``trainer.seeds`` > 1, labels every
slide) or a cross-validation folder written by ``milkit train --folds K``:

- a slide of the cross-validation cohort is labelled **out of fold**, by the one fold whose test split holds it
  (the only fold that did not train on it; its calibration and validation threshold), so that its labels can be
  checked against annotations as honestly as a test split;
- any other slide (a new one) by the **ensemble of the K folds**: the mean of their calibrated probabilities, their
  spread as the uncertainty, and the median of the folds' validation thresholds (all on the one calibrated
  scale; the rule of :data:`milkit.trust.ensemble.ENSEMBLE_THRESHOLD` for seed replicas).

Both carry the folder's pooled out-of-fold verdict (``cv_summary.json``, ``pooled_test.<stage>.trust``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from milkit.config import Experiment
from milkit.methods.base import Labeler
from milkit.run_dir import RunDir


@dataclass
class Choice:
    """One slide's labeler, its threshold record (threshold.json) and where both come from."""

    labeler: Labeler
    record: dict
    labelled_by: str
    threshold_from: str = "threshold.json"
    n_seeds: int = 1  # seed replicas behind each model (a fold ensemble's folds are not seeds)


@dataclass
class LabelSource:
    """What :func:`milkit.slide.labeling.label_slides` needs from ``RUN``: the model(s) and the run's record."""

    run_dir: Path
    stage: str
    exp: Experiment  # the (first fold's) experiment: data section, graph
    metrics: dict  # the (first fold's) metrics.json: ``_run.features`` the run was trained on
    trust: dict  # the verdict and rule that travel with the labels
    default: Choice
    by_slide: dict[str, Choice] = field(default_factory=dict)
    n_folds: int = 0

    def choose(self, slide_id: str) -> Choice:
        return self.by_slide.get(slide_id, self.default)


def _trust(block: dict) -> dict:
    trust = block.get("trust") if isinstance(block, dict) else None
    return {k: trust[k] for k in ("verdict", "rule") if k in trust} if isinstance(trust, dict) else {}


def load_source(run_dir: Path, stage: str | None) -> LabelSource:
    """The :class:`LabelSource` of a run directory or of a cross-validation folder (module docstring)."""
    from milkit.cross_validation import fold_runs

    folds = fold_runs(run_dir)
    return _cv_source(run_dir, folds, stage) if folds else _run_source(run_dir, stage)


def _run_source(run_dir: Path, stage: str | None) -> LabelSource:
    from milkit.workflow import stage_labeler

    _, stage, labeler, exp = stage_labeler(run_dir, stage)
    run = RunDir(run_dir)
    metrics = run.read_metrics()
    n = len(labeler.members)
    return LabelSource(run_dir, stage, exp, metrics, _trust(metrics.get(stage) or {}),
                       Choice(labeler, run.read_threshold(stage), "the run" if n == 1 else f"the run's {n} seeds",
                              n_seeds=n))


def _cv_source(cv_dir: Path, folds: list[Path], stage: str | None) -> LabelSource:
    import json

    from milkit.cross_validation import SUMMARY_JSON, tested_by
    from milkit.trust.ensemble import EnsembleLabeler

    from milkit.workflow import stage_labeler

    check_complete(cv_dir, folds)
    loaded = [stage_labeler(f, stage)[1:] for f in folds]
    stage = loaded[0][0]
    if any(s != stage for s, _, _ in loaded):  # only when --stage is left out and folds differ (never by train)
        raise ValueError(f"{cv_dir}: the folds' primary stages differ; pass --stage")
    records = [RunDir(f).read_threshold(stage) for f in folds]
    labs = [lab for _, lab, _ in loaded]
    thresholds = [lab.threshold for lab in labs]
    median = None if any(t is None for t in thresholds) else float(np.median(thresholds))
    ensemble = EnsembleLabeler(labs, median, labs[0].criterion)
    summary_path = cv_dir / SUMMARY_JSON
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    block = (summary.get("pooled_test") or {}).get(stage) or {}
    source = records[0].get("source")
    seeds = len(labs[0].members)
    default = Choice(ensemble, {"source": source} if source else {}, f"ensemble of {len(folds)} folds (not in the "
                     "cross-validation cohort)", f"median of the {len(folds)} folds' thresholds", seeds)
    by_slide = {sid: Choice(labs[k], records[k], f"{folds[k].name} (out of fold: its test split holds this slide)",
                            n_seeds=seeds) for sid, (k, _) in tested_by(cv_dir).items()}
    return LabelSource(cv_dir, stage, loaded[0][2], RunDir(folds[0]).read_metrics(), _trust(block), default, by_slide,
                       n_folds=len(folds))


def check_complete(cv_dir: Path, folds: list[Path]) -> None:
    """Every fold of the cross-validation is there and finished: with one missing, the slides it tested would be
    labelled by folds that trained on them (and called new)."""
    data = RunDir(folds[0]).read_raw_config().get("data") or {}
    k = data.get("folds", data.get("n_folds"))
    names = {f.name for f in folds}
    missing = [f"fold-{i}" for i in range(int(k))] if isinstance(k, int) else []
    missing = [m for m in missing if m not in names]
    unfinished = [f.name for f in folds if RunDir(f).state() != "finished"]
    if missing or unfinished:
        what = f"{', '.join(missing)} missing" if missing else f"{', '.join(unfinished)} unfinished"
        raise ValueError(f"{cv_dir}: a {k}-fold cross-validation with {what}; finish it (milkit train CONFIG --out "
                         f"{cv_dir} --folds {k} --resume) or label with one fold's run")


def calibrations(labeler: Labeler) -> str:
    """The calibration sources of a labeler's models (through nested ensembles: folds of seeds)."""
    members = labeler.members
    if members == [labeler]:
        cal = getattr(labeler, "calibrator", None)
        return "" if cal is None else cal.source
    return "; ".join(sorted({c for m in members for c in calibrations(m).split("; ") if c}))
