"""The trust verdict of a stage (issue 11 §5): trustworthy / uncertain / do not use.

Everything is measured on the **validation** split (never on test):

- slide AUROC of the bag probabilities, with a percentile-bootstrap 95 % interval;
- max-patch slide AUROC: the slide labels ranked by the highest patch score of each
  slide (the MIL assumption: a slide is positive iff some patch is). It checks that the
  *patch* scores, not just the slide head, explain the slide labels; an inverted patch
  scorer puts its positives at the bottom and lands at or below 0.5 here;
- seed agreement: mean pairwise Spearman ρ of the replicas' validation patch scores
  (unavailable for one seed);
- where validation patch labels exist: patch AUROC with a slide-level (cluster) bootstrap
  95 % interval and a reliability diagram of the calibrated probability (ECE).

The rules (:data:`RULES`) are checked in order; the first that fires decides, and its text
is printed beside the verdict. If none fires, the stage is trustworthy.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from milkit.metrics.classification import bootstrap_auroc

TRUSTWORTHY, UNCERTAIN, DO_NOT_USE = "trustworthy", "uncertain", "do not use"
#: below this mean pairwise Spearman ρ the replicas disagree about which patches are positive
MIN_SEED_AGREEMENT = 0.5
#: below this validation patch AUROC patch labels are too noisy to act on (a reading aid)
MIN_PATCH_AUROC = 0.8
#: with fewer validation slides of a class the bootstrap intervals are too optimistic to act on
MIN_SLIDES_PER_CLASS = 10
N_BOOT = 1000

#: (verdict, rule) in the order they are checked
RULES: tuple[tuple[str, str], ...] = (
    (DO_NOT_USE, "validation slide AUROC undefined (one slide class) or its 95% CI includes 0.5"),
    (DO_NOT_USE, "validation patch AUROC 95% CI includes or lies below 0.5"),
    (DO_NOT_USE, "max-patch slide AUROC 95% CI lies below 0.5 (patch scores run the wrong way)"),
    (UNCERTAIN, "max-patch slide AUROC undefined or its 95% CI includes 0.5 (patch scores do not explain the slide labels)"),
    (UNCERTAIN, f"fewer than {MIN_SLIDES_PER_CLASS} validation slides of a class: too few to check"),
    (UNCERTAIN, f"seed agreement ρ < {MIN_SEED_AGREEMENT} or undefined"),
    (UNCERTAIN, f"validation patch AUROC < {MIN_PATCH_AUROC}"),
    (UNCERTAIN, "one seed and no validation patch labels: patch-score stability unmeasured (train with --seeds 3)"),
)


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def seed_agreement(member_scores: list[np.ndarray]) -> dict:
    """Mean pairwise Spearman ρ of the replicas' validation patch scores (same instances, same order)."""
    from scipy.stats import spearmanr

    if len(member_scores) < 2:
        return {"rho": None, "n_seeds": len(member_scores), "note": "unavailable: one seed"}
    rhos = []
    for a, b in itertools.combinations(member_scores, 2):
        if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
            rhos.append(float("nan"))
        else:
            rhos.append(float(spearmanr(a, b).statistic))
    finite = [r for r in rhos if math.isfinite(r)]
    return {"rho": float(np.mean(finite)) if len(finite) == len(rhos) else None,
            "pairwise": rhos, "n_seeds": len(member_scores)}


def _ci(d: dict) -> dict:
    return {"value": d["auroc"], "ci95": [d["low"], d["high"]], "n_boot": d["n_boot_used"]}


def assess(slide_true, slide_prob, slide_max_score, *, patch_true=None, patch_score=None, patch_prob=None,
           patch_group=None, member_scores: list[np.ndarray] | None = None, n_boot: int = N_BOOT,
           seed: int = 0, patch_checks: bool = True) -> dict:
    """The verdict and the numbers behind it (module docstring). ``slide_max_score`` holds each
    validation slide's highest patch score; ``patch_*`` the labelled validation patches (None
    when there are none); ``member_scores`` each replica's validation patch scores."""
    from milkit.trust.calibration import reliability

    slide_true = np.asarray(slide_true).astype(int)
    s_auc = _ci(bootstrap_auroc(slide_true, slide_prob, n_boot=n_boot, seed=seed))
    out: dict = {"slide_auroc": s_auc, "n_slides": int(len(slide_true)),
                 "n_slides_per_class": {"positive": int((slide_true == 1).sum()), "negative": int((slide_true == 0).sum())}}
    m_auc = _ci(bootstrap_auroc(slide_true, slide_max_score, n_boot=n_boot, seed=seed + 1)) if patch_checks else None
    out["max_patch_slide_auroc"] = m_auc if patch_checks else "not computed for pixel-map methods"
    agree = seed_agreement(member_scores or []) if patch_checks else {"rho": None, "note": "not computed"}
    out["seed_agreement"] = agree
    has_patch = patch_true is not None and len(np.unique(np.asarray(patch_true))) == 2
    p_auc = None
    if has_patch:
        p_auc = _ci(bootstrap_auroc(patch_true, patch_score, groups=patch_group, n_boot=n_boot, seed=seed + 2))
        p_auc["bootstrap"] = "slides resampled" if patch_group is not None else "patches resampled"
        out["patch_auroc"] = p_auc
        if patch_prob is not None:
            out["reliability"] = reliability(patch_true, patch_prob)
    else:
        out["patch_auroc"] = "unavailable: no validation patch labels"

    lo = s_auc["ci95"][0]
    fired = [
        _nan(s_auc["value"]) or _nan(lo) or lo <= 0.5,
        p_auc is not None and (_nan(p_auc["ci95"][0]) or p_auc["ci95"][0] <= 0.5),
        m_auc is not None and not _nan(m_auc["ci95"][1]) and m_auc["ci95"][1] < 0.5,
        m_auc is not None and (_nan(m_auc["ci95"][0]) or m_auc["ci95"][0] <= 0.5),
        min(int((slide_true == 1).sum()), int((slide_true == 0).sum())) < MIN_SLIDES_PER_CLASS,
        len(member_scores or []) >= 2 and (agree["rho"] is None or agree["rho"] < MIN_SEED_AGREEMENT),
        p_auc is not None and p_auc["value"] < MIN_PATCH_AUROC,
        len(member_scores or []) < 2 and p_auc is None,
    ]
    if not patch_checks:  # keep the slide-level rules only
        fired = [f if i in (0, 4) else False for i, f in enumerate(fired)] + [True]
    rules = list(RULES) + ([] if patch_checks else [(UNCERTAIN, "pixel-map method: patch-level checks not implemented")])
    verdict, rule = TRUSTWORTHY, "no rule fired: slide and patch checks passed"
    for (v, text), f in zip(rules, fired):
        if f:
            verdict, rule = v, text
            break
    out["measured"] = _measured(s_auc, m_auc, p_auc, agree)
    out.update(verdict=verdict, rule=rule, rules=[f"{v} if {t}" for v, t in rules], fired=[t for (_, t), f in zip(rules, fired) if f])
    return out


def _measured(s_auc: dict, m_auc: dict | None, p_auc: dict | None, agree: dict) -> str:
    def f(d: dict) -> str:
        lo, hi = d["ci95"]
        g = lambda v: "n/a" if _nan(v) else f"{v:.2f}"  # noqa: E731
        return f"{g(d['value'])} [{g(lo)}, {g(hi)}]"

    parts = [f"slide AUROC {f(s_auc)}"]
    if m_auc is not None:
        parts.append(f"max-patch slide AUROC {f(m_auc)}")
    if p_auc is not None:
        parts.append(f"patch AUROC {f(p_auc)}")
    rho = agree.get("rho")
    parts.append(f"seed ρ {rho:.2f}" if isinstance(rho, float) else "seed ρ n/a")
    return "; ".join(parts)


def verdict_line(stage: str, trust: dict) -> str:
    """``verdict stage: VERDICT — rule (measured values)`` (what ``milkit train`` prints last)."""
    m = f" ({trust['measured']})" if trust.get("measured") else ""
    return f"verdict {stage}: {trust.get('verdict', '?').upper()} — {trust.get('rule', '')}{m}"


def print_verdicts(metrics: dict, echo) -> None:
    """One :func:`verdict_line` per stage of ``metrics`` that has a trust block."""
    for stage, m in metrics.items():
        if not stage.startswith("_") and isinstance(m, dict) and isinstance(m.get("trust"), dict):
            echo(verdict_line(stage, m["trust"]) + labels_from(m.get("ensemble")))


def do_not_use_warning(metrics: dict, stage: str) -> str | None:
    """What ``milkit label`` warns before labelling with a stage whose verdict is *do not use*
    (the labels are written all the same: the user asked for them); None otherwise."""
    trust = (metrics.get(stage) or {}).get("trust") if isinstance(metrics.get(stage), dict) else None
    if not isinstance(trust, dict) or trust.get("verdict") != DO_NOT_USE:
        return None
    return (f"stage {stage}'s verdict is DO NOT USE ({trust.get('rule', '')}): these labels are written, but read "
            "them as untested; see report.html")


def label_free_threshold_notice(metrics: dict) -> str | None:
    """A ``milkit:`` notice naming the stages whose patch threshold had no validation patch labels to be
    chosen on (``threshold.json`` source ``default:…``), and what that means for their labels
    (docs/benchmarks.md, "Patch labels without patch annotations"); None when every stage had them."""
    stages = [stage for stage, m in metrics.items()
              if not stage.startswith("_") and isinstance(m, dict) and isinstance(m.get("threshold"), dict)
              and str(m["threshold"].get("source", "")).startswith(("default:0.5", "slide labels:"))]
    if not stages:
        return None
    source = str(metrics[stages[0]]["threshold"].get("source", ""))
    if source.startswith("slide labels:sure_positives"):
        how = ("0.5 of a map fitted on the positive-slide patches above every negative-slide patch "
               "(trainer.label_free_threshold sure_positives): look-alikes common in positive slides are labelled too")
    else:
        how = ("0.5 on the probability calibrated from slide labels (patches about as suspicious as a positive "
               "slide's top patch): expect large lesions to be under-labelled, or try "
               "trainer.label_free_threshold=sure_positives")
    return (f"milkit: {', '.join(stages)}: no validation patch labels, so patch labels use {how}; annotate a few "
            "validation slides (data.annotations_dir) for an F1-chosen threshold")


#: the rule :func:`few_slides_notice` looks for
FEW_SLIDES_RULE = RULES[4][1]


def few_slides_notice(metrics: dict, folds_command: str) -> str | None:
    """A ``milkit:`` notice for a run whose verdict had too few validation slides to check
    (:data:`FEW_SLIDES_RULE` fired), pointing to ``folds_command`` (``milkit train … --folds K``): there every
    labelled slide is tested once and the verdict reads them all (``cross_validation.pooled_out_of_fold``).
    None when the rule fired for no stage."""
    stages = [s for s, m in metrics.items() if not s.startswith("_") and isinstance(m, dict)
              and isinstance(m.get("trust"), dict) and FEW_SLIDES_RULE in (m["trust"].get("fired") or [])]
    if not stages:
        return None
    trust = metrics[stages[0]]["trust"]
    per = trust.get("n_slides_per_class") or {}
    counts = (f" ({per['positive']} positive, {per['negative']} negative)"
              if {"positive", "negative"} <= set(per) else "")
    return (f"milkit: {', '.join(stages)}: the verdict read {trust.get('n_slides', '?')} validation slides{counts}, fewer "
            f"than {MIN_SLIDES_PER_CLASS} of a class, too few to check. With few slides, cross-validate instead: "
            f"{folds_command} tests every labelled slide once, reads the verdict on all of them, and "
            "`milkit label` on that folder labels with its folds (docs/scale.md)")


def labels_from(choice: object) -> str:
    """`` [labels: seed-k — the ensemble was below the median replica on validation …]`` when a seed
    ensemble's validation rule chose a replica (``trust.ensemble.choose_labels``); else empty."""
    if not isinstance(choice, dict) or choice.get("used") in (None, "ensemble"):
        return ""
    below = ", ".join(str(k) for k in choice.get("below_median_on") or [])
    return (f" [labels: {choice['used']} — the ensemble was below the median replica on validation"
            f"{' (' + below + ')' if below else ''}]")
