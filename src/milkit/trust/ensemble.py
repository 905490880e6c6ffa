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

**Ensemble or replica** (issue 11 §3: the ensemble must not be worse than the median seed).
After calibration and threshold choice, :func:`choose_labels` compares on the *validation*
split the ensemble with every replica, each at its own validation threshold:

- with validation patch labels: patch F1 at the candidate's threshold (chosen by
  ``trainer.threshold_criterion``) and patch AUROC of its calibrated probability;
- without: slide AUROC − BCE of the bag probabilities (what checkpoints are selected on,
  ``val/auroc_minus_bce``) and the max-patch slide AUROC (slide labels ranked by each slide's
  highest patch probability: do the *patch* scores explain the slide labels).

If the ensemble is below the median over replicas on either metric, the stage labels with the
validation-best replica (:data:`FALLBACK`; replicas ranked by the first metric, then the
second) — its probabilities, raw scores, bag probabilities and threshold — while the
uncertainty stays the seed spread of all K. Ties and undefined metrics go to the ensemble.
The decision, its rule and the validation numbers behind it are written to the stage's
``threshold.json`` under ``ensemble`` (and copied to metrics.json), and :func:`load` rebuilds
the same labeler from that file. K = 1 is untouched.

**The ensemble's threshold** (``trainer.ensemble_threshold``, :data:`ENSEMBLE_THRESHOLD`): by
default the median of the K replicas' own validation thresholds (``median_of_seeds``; all are
on the one calibrated-probability scale), not the argmax of F1 over the ensemble's validation
probabilities (``ensemble``). With ~40 validation slides the F1 curve is flat near its top, so
one argmax lands far from where the test optimum is (hard-bags: 0.15–0.35 against a test
optimum near 0.5); the median of K such estimates varies less. The rule above still compares
every candidate at its own F1-best validation threshold; only the threshold the ensemble labels
with changes. The replicas' thresholds are kept in ``threshold.json`` (``seed_thresholds``).
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
from milkit.methods.base import DEFAULT_CRITERION, InstanceOutputs, Labeler, Method, select_threshold
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
    """Mean of K calibrated replicas (module docstring); ``members`` keeps the replicas.
    ``use = k`` labels with replica k instead (the validation rule's fallback, :func:`choose_labels`);
    the uncertainty is the spread over all K either way."""

    def __init__(self, members: list[Labeler], threshold: float | None = None, criterion: str | None = None,
                 use: int | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self._members = list(members)
        self.instance_mode = members[0].instance_mode
        self.threshold = threshold
        self.calibrator = None
        self.criterion = criterion
        self.use = use

    @property
    def use(self) -> int | None:
        """The replica that labels (None: the ensemble)."""
        return self._use

    @use.setter
    def use(self, k: int | None) -> None:
        if k is not None and not 0 <= k < len(self._members):
            raise ValueError(f"replica {k} does not exist: the ensemble has {len(self._members)}")
        self._use = k
        self.model = self._members[0 if k is None else k].model

    @property
    def used(self) -> str:
        """``"ensemble"`` or ``"seed-<k>"`` (the replica's folder name)."""
        return USED_ENSEMBLE if self._use is None else f"seed-{self._use}"

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
        spread = (spread * batch.mask.double()).float()
        if self._use is not None:  # the replica's own outputs, the ensemble's uncertainty
            o = outs[self._use]
            return InstanceOutputs(o.bag_prob, o.raw, o.probability, spread, o.calibration_input)
        raw = torch.stack([o.raw.double() for o in outs]).mean(0)
        bag = torch.stack([o.bag_prob.double() for o in outs]).mean(0)
        return InstanceOutputs(bag.float(), raw.float(), mean.float(), spread)

    @torch.no_grad()
    def __call__(self, batch: BagBatch):
        o = self.outputs(batch)
        return o.bag_prob, o.probability

    def predict_dataset(self, ds) -> list[dict]:
        rows = super().predict_dataset(ds)
        if self._use is None:  # a replica ranks by its raw score, as on its own
            for r in rows:
                r["scores"] = r["probability"]  # the ensemble's ranking score is its probability
        return rows


def finalise(method: Method, members: dict[str, list[Labeler]], splits: DataSplits, run: RunDir,
             K: int) -> dict[str, Labeler]:
    """Calibrate every replica on validation, form the ensembles (K > 1), choose each stage's
    threshold on validation (``trainer.threshold_criterion``) and write ``threshold.json``; for
    K > 1 decide on validation whether the ensemble or a replica labels (:func:`choose_stage`)."""
    out: dict[str, Labeler] = {}
    for stage, labs in members.items():
        for k, lab in enumerate(labs):
            calibrate(lab, splits, replica_run(run, k, K).stage_dir(stage))
        out[stage] = labs[0] if K == 1 else EnsembleLabeler(labs)
    method.choose_thresholds(out, splits, run)
    if K > 1:
        criterion = getattr(method.exp.trainer, "threshold_criterion", DEFAULT_CRITERION)
        how = getattr(method.exp.trainer, "ensemble_threshold", ENSEMBLE_THRESHOLD)
        label_free = getattr(method.exp.trainer, "label_free_threshold", "top_patch")
        seed0 = int(getattr(method.exp, "seed", 0))
        for stage, lab in out.items():
            choose_stage(lab, splits, run, stage, criterion, seed0, how, label_free)  # type: ignore[arg-type]
    return out


def choose_stage(lab: "EnsembleLabeler", splits: DataSplits, run: RunDir, stage: str, criterion: str,
                 seed0: int = 0, ensemble_threshold: str = "median_of_seeds", label_free: str = "top_patch") -> dict:
    """Apply :func:`choose_labels` to one stage's ensemble on validation: set ``lab.use`` and its
    threshold (the ensemble's: :func:`seed_median_threshold` unless ``ensemble_threshold`` is
    ``ensemble``), and rewrite ``threshold.json`` with the ``ensemble`` record. Returns the record."""
    if ensemble_threshold not in ENSEMBLE_THRESHOLDS:
        raise ValueError(f"trainer.ensemble_threshold must be one of {', '.join(ENSEMBLE_THRESHOLDS)}, "
                         f"got {ensemble_threshold!r}")
    rows = [m.predict_dataset(splits.val) for m in lab.members]
    rec = choose_labels([member_val_arrays(m, r) for m, r in zip(lab.members, rows)], criterion)
    for r in rec["val"]["replicas"]:
        r["seed"] = seed0 + r["replica"]
    info = run.read_threshold(stage)
    if rec["used"] != USED_ENSEMBLE:
        k = parse_used(rec["used"], len(lab.members), "choose_labels")
        lab.use = k
        info = select_threshold(lab.members[k], splits.val, criterion, rows=rows[k],
                                label_free=label_free)  # the replica's own
        lab.threshold, lab.criterion = info["threshold"], info["criterion"]
    else:
        thr = seed_median_threshold(rec) if ensemble_threshold == "median_of_seeds" else None
        info = {**info, "ensemble_threshold": "ensemble" if thr is None else "median_of_seeds"}
        if thr is not None:
            info.update(threshold=thr, seed_thresholds=[r["threshold"] for r in rec["val"]["replicas"]])
            lab.threshold = thr
    run.write_threshold(stage, {**info, "ensemble": rec})
    return rec


#: ``trainer.ensemble_threshold``'s choices and default (module docstring; docs/benchmarks.md
#: "The ensemble's threshold": never below the median seed's patch F1 on hard-bags, where the
#: ensemble's own F1-best threshold was in 2 of 8 rows of ``hard-heterogeneous``)
ENSEMBLE_THRESHOLDS = ("median_of_seeds", "ensemble")
ENSEMBLE_THRESHOLD = "median_of_seeds"


def seed_median_threshold(rec: dict) -> float | None:
    """The median of the replicas' own validation thresholds in a :func:`choose_labels` record
    (all on the calibrated-probability scale); None without validation patch labels (no threshold
    was chosen on them: the ensemble keeps its own)."""
    if rec.get("basis") != BASIS_PATCH:
        return None
    thr = [r.get("threshold") for r in rec["val"]["replicas"]]
    if not thr or any(not _finite(t) for t in thr):
        return None
    return float(np.median(thr))


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
        used = (thr.get("ensemble") or {}).get("used", USED_ENSEMBLE)  # runs before the rule: the ensemble
        use = parse_used(used, len(labs), str(run.stage_dir(stage) / "threshold.json"))
        out[stage] = EnsembleLabeler(labs, thr.get("threshold"), thr.get("criterion"), use=use)
    return method, out


def ensemble_probability(probs) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble rule: the mean over replicas of their calibrated probabilities and, as the
    uncertainty, their spread (population sd). ``probs``: one array / tensor per replica, same shape."""
    p = torch.stack([torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).double() for x in probs])
    return p.mean(0), p.std(0, unbiased=False)


# -- ensemble or replica: the validation rule (module docstring) ----------------------------

#: which replica labels when validation says the ensemble is not better: ``"best"`` (the
#: validation-best replica) or ``"median"``. Measured on hard-bags (docs/benchmarks.md, "Seed
#: ensemble or replica, chosen on validation"): where the rule fired (4 of 18 rows) the best
#: replica's worst test cell vs the median seed was −0.001, the median replica's −0.016; mean Δ
#: over all 54 cells +0.018 vs +0.017, cells below the median seed 4 vs 4
FALLBACK = "best"
#: how far below the median replica the ensemble must be for a replica to label: ``"none"`` (any amount beyond
#: float noise, :data:`TIE`) or ``"spread"`` (more than the seed spread — the population sd over the replicas —
#: of that validation metric: a replica replaces the mean only when validation shows a gap that seed noise does
#: not explain; against a confounded validation split, where the replica that exploits the shortcut most looks
#: best, issue 11 hard-confounded). Default ``none``: ``spread`` is measured in docs/benchmarks.md
#: ("confounder-proof ensemble rule") but was not adopted
MARGIN = "none"
MARGINS = ("none", "spread")
USED_ENSEMBLE = "ensemble"
BASIS_PATCH = "validation patch labels"
BASIS_SLIDE = "validation slide labels (no validation patch labels)"
#: the metrics compared, per basis, in ranking order
RULE_METRICS = {BASIS_PATCH: ("patch_f1", "patch_auroc"),
                BASIS_SLIDE: ("slide_auroc_minus_bce", "max_patch_slide_auroc")}
METRIC_NAMES = {"patch_f1": "patch F1 at its own validation threshold", "patch_auroc": "patch AUROC",
                "slide_auroc_minus_bce": "slide AUROC − BCE (the checkpoint monitor)",
                "max_patch_slide_auroc": "max-patch slide AUROC"}
#: a difference smaller than this is a tie (float noise of averaging identical replicas)
TIE = 1e-9


def member_val_arrays(lab: Labeler, rows: list[dict]) -> dict:
    """One replica's validation outputs as :func:`choose_labels` reads them: per patch the value
    it labels with (``label_values``: the calibrated probability), the patch label (−1 unknown)
    and the slide index; per slide the bag probability and label."""
    prob = [np.asarray(lab.label_values(r), np.float64) for r in rows]
    y = [np.asarray(r["instance_labels"]) if r.get("instance_labels") is not None else np.full(len(p), -1)
         for r, p in zip(rows, prob)]
    cat = lambda a, dt: np.concatenate(a).astype(dt) if a else np.zeros(0, dt)  # noqa: E731
    return {"prob": cat(prob, np.float64), "y": cat(y, np.int64),
            "group": cat([np.full(len(p), i) for i, p in enumerate(prob)], np.int64),
            "bag_prob": np.array([r["bag_prob"] for r in rows], np.float64),
            "bag_y": np.array([r["label"] for r in rows], np.int64)}


def validation_metrics(c: dict, criterion: str = DEFAULT_CRITERION) -> tuple[str, dict]:
    """(basis, metrics) of one candidate's validation arrays (keys of :func:`member_val_arrays`;
    ``group`` optional): :data:`RULE_METRICS` of the basis, plus the threshold it labels at."""
    from milkit.metrics.classification import auroc, binary_metrics, choose_threshold

    y, p = np.asarray(c["y"]), np.asarray(c["prob"], np.float64)
    keep = y >= 0
    if keep.any() and len(np.unique(y[keep])) == 2:
        thr = choose_threshold(y[keep], p[keep], criterion=criterion)
        return BASIS_PATCH, {"patch_f1": binary_metrics(y[keep], p[keep], thr)["f1"],
                             "patch_auroc": auroc(y[keep], p[keep]), "threshold": thr}
    by, bp = np.asarray(c["bag_y"]), np.clip(np.asarray(c["bag_prob"], np.float64), 1e-7, 1 - 1e-7)
    bce = float(-np.mean(by * np.log(bp) + (1 - by) * np.log1p(-bp))) if len(by) else float("nan")
    out = {"slide_auroc_minus_bce": auroc(by, bp) - bce, "max_patch_slide_auroc": float("nan")}
    g = c.get("group")
    if g is not None and len(p):
        mx = np.full(len(by), np.nan)
        np.fmax.at(mx, np.asarray(g), p)
        ok = np.isfinite(mx)
        out["max_patch_slide_auroc"] = auroc(by[ok], mx[ok])
    return BASIS_SLIDE, out


def _finite(v: float | None) -> bool:
    return v is not None and np.isfinite(v)


def rule_text(basis: str, fallback: str = FALLBACK, margin: str = MARGIN) -> str:
    """The rule as written into threshold.json / metrics.json / report.html."""
    a, b = (METRIC_NAMES[k] for k in RULE_METRICS[basis])
    by = " by more than the seed spread (sd over the replicas) of that metric" if margin == "spread" else ""
    return (f"the ensemble (mean of the seeds' calibrated probabilities) labels unless, on {basis}, it is below "
            f"the median replica{by} on {a} or on {b}; then the validation-{fallback} replica (ranked by {a}, then {b}) "
            "labels, with its own threshold; ties and undefined metrics → ensemble; the uncertainty is the seed "
            "spread of all replicas either way")


def choose_labels(members: list[dict], criterion: str = DEFAULT_CRITERION, fallback: str = FALLBACK,
                  margin: str = MARGIN) -> dict:
    """Ensemble or replica (module docstring), from each replica's validation arrays
    (:func:`member_val_arrays`; the ensemble's are formed here by :func:`ensemble_probability`).
    ``margin`` (:data:`MARGIN`): how far below the median replica counts as below.
    Returns the record ``{used: "ensemble" | "seed-<k>", rule, basis, metrics, fallback, margin,
    below_median_on, val: {ensemble, median_replica, seed_spread, replicas}}``."""
    if fallback not in ("median", "best"):
        raise ValueError(f"fallback must be 'median' or 'best', got {fallback!r}")
    if margin not in MARGINS:
        raise ValueError(f"margin must be one of {', '.join(MARGINS)}, got {margin!r}")
    if not members:
        raise ValueError("an ensemble needs at least one member")
    ens = {"prob": ensemble_probability([m["prob"] for m in members])[0].numpy(),
           "bag_prob": ensemble_probability([m["bag_prob"] for m in members])[0].numpy(),
           "y": members[0]["y"], "bag_y": members[0]["bag_y"], "group": members[0].get("group")}
    basis, ev = validation_metrics(ens, criterion)
    keys = RULE_METRICS[basis]
    sv = [validation_metrics({**m, "y": ens["y"], "bag_y": ens["bag_y"]}, criterion)[1] for m in members]
    median, spread = {}, {}
    for k in keys:
        vals = [s[k] for s in sv if _finite(s[k])]
        median[k] = float(np.median(vals)) if vals else float("nan")
        spread[k] = float(np.std(vals)) if vals else float("nan")
    bar = {k: max(TIE, spread[k] if margin == "spread" and _finite(spread[k]) else 0.0) for k in keys}
    below = [k for k in keys if _finite(ev[k]) and _finite(median[k]) and ev[k] < median[k] - bar[k]]
    used = USED_ENSEMBLE
    if below:
        rank = lambda i: tuple(sv[i][k] if _finite(sv[i][k]) else -np.inf for k in keys) + (-i,)  # noqa: E731
        order = sorted(range(len(sv)), key=rank)  # worst → best; ties: the lower replica ranks higher
        used = f"seed-{order[-1] if fallback == 'best' else order[len(order) // 2]}"
    from milkit.metrics.classification import nan_to_none

    return nan_to_none({"used": used, "rule": rule_text(basis, fallback, margin), "basis": basis, "metrics": list(keys),
                        "criterion": criterion, "fallback": f"validation-{fallback} replica", "margin": margin,
                        "below_median_on": below,
                        "val": {"ensemble": ev, "median_replica": median, "seed_spread": spread,
                                "replicas": [{"replica": i, **s} for i, s in enumerate(sv)]}})


def parse_used(used: object, n_members: int, where: str) -> int | None:
    """``"ensemble"`` → None, ``"seed-<k>"`` → k; anything else is an error naming ``where``."""
    if used == USED_ENSEMBLE:
        return None
    if isinstance(used, str) and used.startswith("seed-") and used[5:].isdigit() and int(used[5:]) < n_members:
        return int(used[5:])
    raise ValueError(f"{where}: ensemble.used must be 'ensemble' or 'seed-<k>' with k < {n_members}, got {used!r}")
