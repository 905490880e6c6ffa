"""Per stage of a run: calibration, every seed's metrics, their spread and the trust verdict,
added to ``metrics.json`` (what ``milkit train`` and ``milkit evaluate`` call)."""

from __future__ import annotations

import numpy as np

from milkit.data.base import DataSplits
from milkit.methods.base import DEFAULT_CRITERION, Labeler, evaluate_labeler, select_threshold
from milkit.metrics.classification import nan_to_none
from milkit.report import ScoreSet
from milkit.trust.verdict import assess

SPREAD_KEYS = ("bag_auroc", "instance_auroc", "instance_f1")


def _val_arrays(rows: list[dict]) -> dict:
    """Slide labels, bag probabilities, max patch score per slide, and labelled patches of ``rows``."""
    y = np.array([r["label"] for r in rows], int)
    p = np.array([r["bag_prob"] for r in rows], float)
    mx = np.array([float(np.max(r["scores"])) if len(r["scores"]) else np.nan for r in rows])
    pt, ps, pp, pg = [], [], [], []
    for i, r in enumerate(rows):
        lab = r.get("instance_labels")
        if lab is None:
            continue
        keep = np.asarray(lab) >= 0
        pt.append(np.asarray(lab)[keep])
        ps.append(np.asarray(r["scores"])[keep])
        if r.get("probability") is not None:
            pp.append(np.asarray(r["probability"])[keep])
        pg.append(np.full(int(keep.sum()), i))
    ok = np.isfinite(mx)
    out = {"slide_true": y, "slide_prob": p, "slide_max": mx, "ok": ok}
    if pt:
        out.update(patch_true=np.concatenate(pt), patch_score=np.concatenate(ps),
                   patch_prob=np.concatenate(pp) if len(pp) == len(pt) else None, patch_group=np.concatenate(pg))
    return out


def spread(per_seed: list[dict], ensemble: dict, split: str = "test") -> dict:
    """Mean, sd, min, median, max over seeds of each key in :data:`SPREAD_KEYS`, beside the stage's
    own value (key ``ensemble``: what the stage labels with — the ensemble, or the replica the
    validation rule chose, named by the stage's ``ensemble.used``)."""
    out = {}
    for k in SPREAD_KEYS:
        vals = np.array([s[split].get(k) for s in per_seed if s[split].get(k) is not None], float)
        if not vals.size:
            continue
        ens = ensemble.get(split, {}).get(k)
        out[k] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
                  "min": float(vals.min()), "median": float(np.median(vals)), "max": float(vals.max()),
                  "ensemble": ens, "ensemble_minus_median": None if ens is None else float(ens - np.median(vals))}
    return out


def stage_trust(lab: Labeler, stage_metrics: dict, splits: DataSplits, criterion: str,
                seed_values: list[int], n_boot: int = 1000, label_free: str = "top_patch") -> dict:
    """Trust block of one stage; adds ``seeds`` and ``seed_spread`` to ``stage_metrics`` for K > 1."""
    from milkit.methods.seg_base import SegLabeler

    if isinstance(lab, SegLabeler):
        rows = list(lab.predict_dataset(splits.val))
        y = np.array([r["label"] for r in rows], int)
        p = np.array([r["image_prob"] for r in rows], float)
        return nan_to_none(assess(y, p, p, n_boot=n_boot, patch_checks=False))
    rows = lab.predict_dataset(splits.val)
    members = lab.members
    member_rows = [rows] if len(members) == 1 else [m.predict_dataset(splits.val) for m in members]
    a = _val_arrays(rows)
    member_scores = [np.concatenate([r["raw"] for r in mr]) if mr else np.zeros(0) for mr in member_rows]
    ok = a["ok"]
    t = assess(a["slide_true"][ok], a["slide_prob"][ok], a["slide_max"][ok], patch_true=a.get("patch_true"),
               patch_score=a.get("patch_score"), patch_prob=a.get("patch_prob"), patch_group=a.get("patch_group"),
               member_scores=member_scores, n_boot=n_boot)
    t["n_seeds"] = len(members)
    if len(members) > 1:
        per_seed = []
        for k, (m, mr) in enumerate(zip(members, member_rows)):
            info = select_threshold(m, splits.val, criterion, rows=mr, label_free=label_free)
            m.criterion = info["criterion"]
            one = {"seed": seed_values[k], "threshold": info}
            for split in ("val", "test"):
                one[split] = evaluate_labeler(m, splits.get(split), info["threshold"],
                                              rows=mr if split == "val" else None)
            per_seed.append(one)
        stage_metrics["seeds"] = per_seed
        stage_metrics["seed_spread"] = {"test": spread(per_seed, stage_metrics, "test"),
                                        "val": spread(per_seed, stage_metrics, "val")}
    return nan_to_none(t)


def add_trust(metrics: dict, labelers: dict[str, Labeler], splits: DataSplits, exp,
              scores: dict[str, dict[str, ScoreSet]] | None = None) -> dict:
    """For every stage in ``metrics``: ``calibration`` (per seed), and ``trust`` (the verdict);
    for ensembles ``seeds``, ``seed_spread`` and ``ensemble`` (ensemble or replica, the rule and the
    validation numbers behind the choice, from ``threshold.json``). Returns ``metrics`` (changed in place)."""
    criterion = getattr(exp.trainer, "threshold_criterion", DEFAULT_CRITERION)
    for stage, lab in labelers.items():
        m = metrics.get(stage)
        if not isinstance(m, dict):
            continue
        cals = [getattr(x, "calibrator", None) for x in lab.members]
        m["calibration"] = [c.to_dict() if c is not None else None for c in cals]
        seeds = [exp.seed + k for k in range(len(lab.members))]
        m["trust"] = stage_trust(lab, m, splits, criterion, seeds,
                                 label_free=getattr(exp.trainer, "label_free_threshold", "top_patch"))
        thr = m.get("threshold")
        if isinstance(thr, dict) and isinstance(thr.get("ensemble"), dict):  # one copy, at the stage's top
            m["ensemble"] = nan_to_none(thr.pop("ensemble"))
    return metrics
