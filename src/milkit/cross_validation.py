"""``milkit train CONFIG --out DIR --folds K``: K-fold cross-validation as K runs and one summary.

Fold k is an ordinary run directory, ``DIR/fold-<k>/``, trained with the dataset's own k-fold
splits (feature bags: ``data.split_mode: kfold``, ``data.folds: K``, ``data.fold: k``; the
histology sets: ``data.n_folds`` / ``data.fold``), so ``milkit label`` / ``evaluate`` / ``view``
work on each fold as on any run. ``DIR/cv_summary.json`` and ``cv_summary.md`` hold, per stage and
split, every numeric metric of each fold with its mean and sample standard deviation (ddof 1),
and each fold's trust verdict: the "mean ± sd" that CLAM's k-fold tables, Distill-to-Label §IV
(5-fold) and the Sm paper (five train/validation splits, App. B) report. Beside it, the pooled
out-of-fold test (:func:`pooled_out_of_fold`): each slide's prediction from the fold that tested
it, in ``out_of_fold_<stage>.csv``, and the slide (and patch) AUROC over all slides with a
bootstrap interval — what a small cohort can say with all its slides at once.

Every fold's config is validated, and every fold folder's state checked, before the first fold
trains; ``--resume`` keeps finished folds (their config must be the fold's) and continues the
unfinished one. Folds trained as separate jobs (``--set data.split_mode=kfold --set data.folds=K
--set data.fold=k --out DIR/fold-<k>``, e.g. a SLURM array) are summarised by ``--folds K --resume``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import numpy as np

from milkit import io
from milkit.config import Experiment
from milkit.run_dir import RunDir, stage_metrics

SUMMARY_JSON, SUMMARY_MD = "cv_summary.json", "cv_summary.md"
_FOLD_DIR = re.compile(r"fold-\d+$")
_OOF_CSV = re.compile(r"out_of_fold_.+\.csv$")
#: what milkit writes into a cross-validation folder besides the folds (``label`` / ``evaluate --annotations``
#: on the folder: its default labels folder and report): ``--resume`` accepts a folder that holds them
LATER_OUTPUTS = (SUMMARY_JSON, SUMMARY_MD, "labels", "report_annotations.html")


def fold_overrides(exp: Experiment, folds: int, fold: int) -> list[str]:
    """``--set`` overrides that select fold ``fold`` of ``folds`` in ``exp``'s dataset."""
    fields = type(exp.data).model_fields
    if "folds" in fields and "split_mode" in fields:
        return ["data.split_mode=kfold", f"data.folds={folds}", f"data.fold={fold}"]
    if "n_folds" in fields and "fold" in fields:
        return [f"data.n_folds={folds}", f"data.fold={fold}"]
    raise ValueError(f"--folds: data.kind {exp.data.kind!r} has no k-fold splits "
                     "(feature_bags and the histology sets have)")


def fold_dir(out: Path, fold: int) -> Path:
    return Path(out) / f"fold-{fold}"


def fold_runs(out: Path) -> list[Path]:
    """The fold runs (``fold-<k>/`` holding a config.yaml) of a cross-validation folder, by fold;
    ``[]`` when ``out`` is not one (a single run, or no folder)."""
    out = Path(out)
    if not out.is_dir() or (out / "config.yaml").is_file():
        return []
    runs = [p for p in out.iterdir() if _FOLD_DIR.match(p.name) and (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda p: int(p.name.split("-")[1]))


def tested_by(out: Path) -> dict[str, tuple[int, int]]:
    """Slide id → (fold, slide label) of the fold whose test split holds it (the test folds partition
    the cohort: every slide is tested by exactly one fold, the one that did not train on it)."""
    from milkit.slide.cohort import run_slide_info

    found: dict[str, tuple[int, int]] = {}
    for k, run in enumerate(fold_runs(out)):
        for sid, info in run_slide_info(run).items():
            if info.split == "test":
                found[sid] = (k, info.label)
    return found


def check_out(out: Path, folds: int, overwrite: bool, resume: bool) -> None:
    """Refuse an ``--out`` that is not new, empty or a cross-validation folder, and fold folders that
    ``train`` would refuse (before any fold trains)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: is a file; --out must be a folder")
    if (out / "config.yaml").is_file():
        raise FileExistsError(f"{out}: holds a single milkit run; --folds writes fold-<k>/ run folders, "
                              "choose another --out")
    if out.is_dir():
        other = [p.name for p in out.iterdir()
                 if not (_FOLD_DIR.match(p.name) or _OOF_CSV.match(p.name) or p.name in LATER_OUTPUTS)]
        if other:
            raise FileExistsError(f"{out}: not empty and not a cross-validation folder ({', '.join(sorted(other)[:3])}); "
                                  "choose a new or empty --out (nothing there was changed)")
    for k in range(folds):
        state = RunDir(fold_dir(out, k)).state()
        if state in ("file", "foreign"):
            raise FileExistsError(f"{fold_dir(out, k)}: not a milkit run; remove it or choose another --out")
        if state in ("unfinished", "finished") and not (overwrite or resume):
            raise FileExistsError(f"{fold_dir(out, k)}: already holds {'a finished' if state == 'finished' else 'an unfinished'}"
                                  " run; pass --resume to continue the cross-validation or --overwrite to replace it")


def run_folds(experiments: list[Experiment], out: Path, train: Callable[..., dict], overwrite: bool = False,
              resume: bool = False, source: str = "config") -> tuple[dict, list[dict]]:
    """Train every fold (``train`` is :func:`milkit.workflow.train_run`) and write the summary; returns it
    and each fold's metrics (``({}, …)`` on a DDP rank other than 0, which writes nothing)."""
    out = Path(out)
    check_out(out, len(experiments), overwrite, resume)
    per_fold: list[dict] = []
    for k, exp in enumerate(experiments):
        # --resume: a finished fold keeps its stages (train_run checks its config is this fold's and
        # re-evaluates it); an unfinished one continues from its last epoch
        per_fold.append(train(exp, fold_dir(out, k), overwrite=overwrite, resume=resume, source=source))
    if not all(per_fold):  # a DDP rank other than 0: rank 0 writes the summary
        return {}, per_fold
    summary = summarise(per_fold)
    summary["pooled_test"] = pooled_out_of_fold(out, len(experiments), list(summary["stages"]))
    io.write_json(out / SUMMARY_JSON, summary)
    io.write_text(out / SUMMARY_MD, render(summary))
    return summary, per_fold


def _stages(metrics: dict) -> list[str]:
    return list(stage_metrics(metrics))


def _is_count(key: str) -> bool:
    """``n_bags``, ``instance_n``, ``instance_n_pos``: sizes of the split, not metrics."""
    return key.startswith("n_") or key.endswith("_n") or "_n_" in key


def _mean_sd(values: list[float]) -> dict:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return {"mean": float(np.mean(v)) if v else None,
            "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "n": len(v), "values": values}


def summarise(per_fold: list[dict]) -> dict:
    """Per stage and split, every numeric metric over the folds (values, mean, sample sd), and each
    fold's trust verdict; ``primary_stage`` is the stage ``milkit label`` uses."""
    stages = [s for s in _stages(per_fold[0]) if all(s in m for m in per_fold)]
    out: dict = {"folds": len(per_fold), "sd": "sample standard deviation over folds (ddof 1)",
                 "primary_stage": per_fold[0].get("_run", {}).get("primary_stage"), "stages": {}}
    for stage in stages:
        block: dict = {}
        for split in ("val", "test"):
            rows = [m[stage].get(split) for m in per_fold]
            if not all(isinstance(r, dict) for r in rows):
                continue
            keys = list(dict.fromkeys(k for r in rows for k, v in r.items()  # union, first fold's order
                                      if isinstance(v, (int, float)) and not isinstance(v, bool) and not _is_count(k)))
            block[split] = {k: _mean_sd([r.get(k) if isinstance(r.get(k), (int, float)) else None for r in rows])
                            for k in keys}
        block["verdicts"] = [(m[stage].get("trust") or {}).get("verdict") for m in per_fold]
        out["stages"][stage] = block
    return out


def oof_csv(out: Path, stage: str) -> Path:
    return Path(out) / f"out_of_fold_{stage}.csv"


def pooled_out_of_fold(out: Path, folds: int, stages: list[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Every slide's test prediction from the one fold whose test split holds it (the test folds
    partition the slides), pooled: per stage the slide AUROC over all slides with its bootstrap 95 %
    interval, and, where patch labels exist, the patch AUROC of the calibrated probabilities (one
    scale across folds; slides resampled whole) and the patch F1 at each fold's own threshold.
    Few slides make each fold's numbers noisy; the pooled interval is over every slide at once.
    Writes ``out_of_fold_<stage>.csv`` (slide, fold, label, slide probability). Pixel-map stages
    are left out (no patch probabilities). ``trust``: the verdict rules (:func:`milkit.trust.verdict.assess`)
    applied to the pooled out-of-fold predictions, with seed agreement over every fold's test slides
    (``trainer.seeds`` > 1) — the verdict of the labels ``milkit label`` writes from this folder."""
    import csv
    import io as _io

    from milkit.methods.seg_base import SegLabeler
    from milkit.metrics.classification import binary_metrics, bootstrap_auroc, nan_to_none
    from milkit.workflow import load_labelers

    from milkit.trust.verdict import assess

    acc: dict[str, dict] = {s: {"rows": [], "py": [], "pp": [], "pg": [], "ph": [], "max": [], "seeds": None}
                            for s in stages}
    for k in range(folds):
        _, labelers, exp = load_labelers(fold_dir(out, k))
        test = exp.data.build(exp.seed).test
        for stage, a in acc.items():
            lab = labelers.get(stage)
            if lab is None or isinstance(lab, SegLabeler):
                continue
            members = lab.members
            if len(members) > 1:  # each replica's calibrated patch probabilities, fold after fold
                per = [np.concatenate([m.label_values(r) for r in m.predict_dataset(test)] or [np.zeros(0)])
                       for m in members]
                a["seeds"] = per if a["seeds"] is None else [np.concatenate(x) for x in zip(a["seeds"], per)]
            for r in lab.predict_dataset(test):
                a["rows"].append((r["bag_id"], k, int(r["label"]), float(r["bag_prob"])))
                values = np.asarray(lab.label_values(r), np.float64)
                a["max"].append(float(values.max()) if values.size else float("nan"))
                y, prob = r.get("instance_labels"), r.get("probability")
                if y is None or prob is None:
                    continue
                keep = np.asarray(y) >= 0
                yk, pk = np.asarray(y)[keep], np.asarray(prob, np.float64)[keep]
                a["py"].append(yk)
                a["pp"].append(pk)
                a["pg"].append(np.full(len(yk), len(a["rows"])))
                if lab.threshold is not None:  # the patch label at this fold's own threshold
                    a["ph"].append((np.asarray(lab.label_values(r))[keep] >= lab.threshold).astype(np.float64))
    res: dict = {}
    for stage, a in acc.items():
        if not a["rows"]:
            continue
        buf = _io.StringIO()
        w = csv.writer(buf)
        w.writerow(["slide_id", "fold", "label", "bag_prob"])
        w.writerows([sid, k, y, f"{p:.6g}"] for sid, k, y, p in a["rows"])
        io.write_text(oof_csv(out, stage), buf.getvalue())
        sb = bootstrap_auroc([r[2] for r in a["rows"]], [r[3] for r in a["rows"]], n_boot=n_boot, seed=seed)
        block = {"n_slides": len(a["rows"]), "slide_auroc": {"value": sb["auroc"], "ci95": [sb["low"], sb["high"]]},
                 "patch_auroc": None, "patch_f1": None, "n_patches": 0, "file": oof_csv(out, stage).name}
        y = p = g = None
        if a["py"]:
            y, p, g = (np.concatenate(a[key]) for key in ("py", "pp", "pg"))
            pb = bootstrap_auroc(y, p, groups=g, n_boot=n_boot, seed=seed + 1)
            f1 = binary_metrics(y, np.concatenate(a["ph"]), 0.5)["f1"] if len(a["ph"]) == len(a["py"]) else None
            block.update(patch_auroc={"value": pb["auroc"], "ci95": [pb["low"], pb["high"]]}, n_patches=int(len(y)),
                         patch_f1=f1)
        block["trust"] = _out_of_fold_wording(assess([r[2] for r in a["rows"]], [r[3] for r in a["rows"]], a["max"],
                                                     patch_true=y, patch_score=p, patch_prob=p, patch_group=g,
                                                     member_scores=a["seeds"], n_boot=n_boot, seed=seed))
        res[stage] = nan_to_none(block)
    return res


def _out_of_fold_wording(trust: dict) -> dict:
    """The verdict's rules read on the pooled out-of-fold predictions say so: "validation slide AUROC" there is
    the AUROC over every slide of the cohort, each predicted by the fold that tested it."""
    def say(text: str) -> str:
        return text.replace("validation ", "out-of-fold ")

    return dict(trust, rule=say(trust["rule"]), rules=[say(r) for r in trust["rules"]],
                fired=[say(r) for r in trust["fired"]])


def pooled_lines(summary: dict) -> list[str]:
    """One line per stage for the terminal: the pooled out-of-fold numbers."""
    out = []
    for stage, b in (summary.get("pooled_test") or {}).items():
        line = f"cross-validation {stage}, pooled out-of-fold test ({b['n_slides']} slides): slide AUROC {_ci(b['slide_auroc'])}"
        if b.get("patch_auroc"):
            line += f"; patch AUROC {_ci(b['patch_auroc'])}" + (
                f", patch F1 {b['patch_f1']:.3f}" if b.get("patch_f1") is not None else "")
        out.append(line)
    return out


def pooled_verdict_lines(summary: dict) -> list[str]:
    """The pooled out-of-fold verdict of each stage (what ``milkit label`` on this folder records), one line each."""
    from milkit.trust.verdict import verdict_line

    return [f"cross-validation {verdict_line(stage, b['trust'])} [rules read on the pooled out-of-fold test, "
            f"{b['n_slides']} slides]" for stage, b in (summary.get("pooled_test") or {}).items()
            if isinstance(b.get("trust"), dict)]


def _ci(c: dict) -> str:
    v, (lo, hi) = c.get("value"), c.get("ci95") or (None, None)
    f = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    return f"{f(v)} [{f(lo)}, {f(hi)}]"


def _fmt(cell: dict) -> str:
    if cell["mean"] is None:
        return "—"
    return f"{cell['mean']:.3f} ± {cell['sd']:.3f}" if cell["sd"] is not None else f"{cell['mean']:.3f}"


def table_rows(summary: dict, split: str = "test") -> list[tuple[str, str, str, str]]:
    """(stage, bag AUROC, instance AUROC, instance F1) as mean ± sd strings, one row per stage."""
    rows = []
    for stage, block in summary["stages"].items():
        s = block.get(split, {})
        rows.append((stage, *(_fmt(s[k]) if k in s else "—" for k in ("bag_auroc", "instance_auroc", "instance_f1"))))
    return rows


def render(summary: dict) -> str:
    """cv_summary.md: one table per stage, metric × split, mean ± sd and the per-fold values."""
    lines = [f"# Cross-validation: {summary['folds']} folds", "",
             f"mean ± sd ({summary['sd']}); primary stage (what `milkit label` uses): {summary['primary_stage']}", ""]
    for stage, block in summary["stages"].items():
        lines += [f"## {stage}", "", "| split | metric | mean ± sd | per fold |", "|---|---|---|---|"]
        for split in ("val", "test"):
            for k, cell in block.get(split, {}).items():
                per = ", ".join("—" if v is None else f"{v:.3f}" for v in cell["values"])
                lines.append(f"| {split} | {k} | {_fmt(cell)} | {per} |")
        lines += ["", "verdicts per fold: " + ", ".join(str(v) for v in block["verdicts"]), ""]
    pooled = pooled_lines(summary)
    if pooled:
        lines += ["## Pooled out-of-fold test", "", "Each slide's prediction from the fold that tested it (per-slide values in "
                  "`out_of_fold_<stage>.csv`); 95 % bootstrap intervals (slides resampled whole).", ""]
        lines += [f"- {ln}" for ln in pooled + pooled_verdict_lines(summary)] + [""]
    return "\n".join(lines)
