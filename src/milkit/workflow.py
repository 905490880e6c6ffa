"""train → label → evaluate on a run directory (what the CLI commands call)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from milkit import registry
from milkit.config import Experiment, load_yaml, validate_section
from milkit.data.base import DataSplits
from milkit.methods.base import Labeler, Method
from milkit.report import write_report
from milkit.run_dir import RunDir


def make_method(exp: Experiment) -> Method:
    cls = registry.lookup(registry.METHODS, "method", exp.method.name)
    return cls(exp)


def train_run(exp: Experiment, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Fit every stage of the experiment's method; write config, checkpoints, thresholds, metrics."""
    run = RunDir(out_dir)
    if run.config_path.exists() and not overwrite:
        raise FileExistsError(f"{run.path}: already holds a run (config.yaml); choose another --out")
    t0 = time.perf_counter()
    splits = exp.data.build(exp.seed)  # bad data fails here, before anything is written
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(exp)
    method = make_method(exp)
    from milkit.engine import seed_everything

    seed_everything(exp.seed)  # model initialisation depends on the seed only, not on what ran before
    labelers = method.fit(splits, run)
    method.choose_thresholds(labelers, splits, run)
    scores: dict = {}
    metrics = method.evaluate(labelers, splits, run, scores)
    metrics["_run"] = {"train_seconds": round(time.perf_counter() - t0, 2), "method": exp.method.name,
                       "stages": list(labelers)}
    # the stage `milkit label` uses by default (issue 11 §2)
    metrics["_run"]["primary_stage"] = method.primary_stage if method.primary_stage in labelers else list(labelers)[-1]
    from milkit import io

    io.write_json(run.metrics_path, metrics)
    write_report(run.path, metrics, scores)
    return metrics


def load_labelers(run_dir: str | Path) -> tuple[Method, dict[str, Labeler], Experiment]:
    """Rebuild a run's method and every stage's labeler from the run directory alone."""
    run = RunDir(run_dir)
    exp = run.read_config()
    method = make_method(exp)
    return method, method.load(run), exp


def _splits_for(exp: Experiment, data_yaml: Path | None) -> DataSplits:
    if data_yaml is None:
        return exp.data.build(exp.seed)
    raw = load_yaml(data_yaml)
    section = raw.get("data", raw)
    if not isinstance(section, dict) or "kind" not in section:
        raise ValueError(f"{data_yaml}: needs a 'data' section with 'kind'")
    cls = registry.lookup(registry.DATASETS, "dataset", section["kind"])
    return validate_section(cls, section, "data", str(data_yaml)).build(exp.seed)


def evaluate_run(run_dir: str | Path) -> dict:
    """Re-score every stage on validation and test; rewrites RUN_DIR/metrics.json (keeps other
    keys) and RUN_DIR/report.html (ROC curves, score histograms, training curves)."""
    run = RunDir(run_dir)
    method, labelers, exp = load_labelers(run_dir)
    splits = exp.data.build(exp.seed)
    scores: dict = {}
    metrics = method.evaluate(labelers, splits, run, scores)
    old = run.read_metrics()
    old.update(metrics)
    from milkit import io

    io.write_json(run.metrics_path, old)
    write_report(run.path, old, scores)
    return old


def label_run(run_dir: str | Path, out: Path | None, data_yaml: Path | None, split: str, stage: str | None) -> list[Path]:
    """Write labels of ``split`` (of the run's data, or of ``data_yaml``) with one stage."""
    method, labelers, exp = load_labelers(run_dir)
    stage = stage or (method.primary_stage if method.primary_stage in labelers else list(labelers)[-1])
    if stage not in labelers:
        raise ValueError(f"{run_dir}: no stage {stage!r}; stages: {', '.join(labelers)}")
    ds = _splits_for(exp, data_yaml).get(split)
    out = Path(out) if out is not None else Path(run_dir) / "labels"
    return method.label(labelers[stage], ds, out, stage)


def print_table(metrics: dict, split: str = "test", console: Console | None = None) -> None:
    """Rich table, one row per stage: bag AUROC and instance AUROC / F1 / accuracy, or, for
    pixel-map methods, classification error, F1+, F1−, IoU and HD on positive images."""
    console = console or Console()
    rows = [(stage, m) for stage, m in metrics.items()
            if not stage.startswith("_") and isinstance(m, dict) and split in m]
    pixel = any("f1_pos" in m[split] for _, m in rows)
    cols = (("image AUROC", "bag_auroc"), ("cls err", "classification_error"), ("F1+", "f1_pos"),
            ("F1−", "f1_neg"), ("IoU", "iou"), ("HD pos", "hd_pos")) if pixel else (
        ("bag AUROC", "bag_auroc"), ("inst AUROC", "instance_auroc"), ("inst F1", "instance_f1"),
        ("inst acc", "instance_accuracy"))
    t = Table(title=f"milkit — {split} split")
    for col in ("stage", *(c for c, _ in cols), "threshold"):
        t.add_column(col)

    def f(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, (int, float)) else "—"

    for stage, m in rows:
        s = m[split]
        thr = (m.get("threshold") or {}).get("threshold")
        t.add_row(stage, *(f(s.get(k)) for _, k in cols), f(thr))
    console.print(t)
