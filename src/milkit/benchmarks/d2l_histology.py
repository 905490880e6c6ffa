"""`milkit benchmark d2l-histology`: Distill-to-Label Tables I–II (colon, breast histology).

For every fold of the 5-fold protocol (§IV-A) it trains the D2L method (stages
``abmil`` = "MIL [11]", ``teacher``, ``student``) through :func:`milkit.workflow.train_run`
and prints per-fold and average accuracy, F1 and AUROC on the test split:

- colon (Table I): instance level (patch positive iff epithelial nucleus);
- breast (Table II): the UCSB set has no instance labels, so only bag-level metrics
  can be computed — the table says so and is not comparable to the paper's Table II.

Each fold is a normal run directory under ``--out``; finished folds (metrics.json
present) are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from milkit import io
from milkit.shipped_configs import config_roots

STAGES = ("abmil", "teacher", "student")
STAGE_NAMES = {"abmil": "MIL [11]", "teacher": "Teacher", "student": "Student"}
STAGE_SHORT = {"abmil": "MIL", "teacher": "T", "student": "S"}
METRICS = ("accuracy", "f1", "auroc")
METRIC_NAMES = {"accuracy": "Accuracy", "f1": "F1", "auroc": "AUROC"}
METRIC_SHORT = {"accuracy": "Acc", "f1": "F1", "auroc": "AUC"}
CONFIG_DIR = next((r / "distill_to_label" for r in config_roots()), Path("configs/distill_to_label"))

# Averages over the 5 folds reported by the paper (instance level, Tables I and II).
PAPER_AVERAGE = {
    "colon": {"accuracy": (0.79, 0.85, 0.89), "f1": (0.61, 0.73, 0.80), "auroc": (0.86, 0.89, 0.91)},
    "breast": {"accuracy": (0.27, 0.59, 0.64), "f1": (0.26, 0.56, 0.60), "auroc": (0.60, 0.71, 0.75)},
}
TITLES = {
    "colon": "Table I — colon cancer nuclei (CRCHistoPhenotypes): instance level, test split",
    "breast": "Table II — UCSB breast cancer: BAG level, test split",
}
BREAST_NOTE = (
    "UCSB breast: no instance labels exist in this dataset, so instance accuracy/F1/AUROC cannot be "
    "computed; the table shows bag-level metrics (bag threshold 0.5). The paper's Table II reports "
    "instance-level numbers, which are not comparable with these."
)


def parse_folds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` → fold indices."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    if not out:
        raise ValueError(f"--folds {text!r}: no fold given")
    return sorted(set(out))


def fold_row(metrics: dict, level: str) -> dict[str, dict[str, float | None]]:
    """``{metric: {stage: value}}`` on the test split; ``level`` is "instance" or "bag"."""
    row: dict[str, dict[str, float | None]] = {m: {} for m in METRICS}
    for stage in STAGES:
        test = (metrics.get(stage) or {}).get("test") or {}
        for m in METRICS:
            v = test.get(f"{level}_{m}")
            row[m][stage] = float(v) if isinstance(v, (int, float)) else None
    return row


def average_rows(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """Mean over folds of every metric/stage (folds where it is undefined are skipped)."""
    avg: dict[str, dict[str, float | None]] = {m: {} for m in METRICS}
    for m in METRICS:
        for s in STAGES:
            vals = [r[m][s] for r in rows if r[m].get(s) is not None and not math.isnan(r[m][s])]
            avg[m][s] = sum(vals) / len(vals) if vals else None
    return avg


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def render_table(dataset: str, folds: list[int], rows: list[dict], avg: dict, console: Console) -> None:
    """Print one table in the paper's layout (fold × {Accuracy, F1, AUROC} × {MIL, Teacher, Student})."""
    t = Table(title=TITLES[dataset], caption="MIL = ABMIL [11], T = teacher, S = student; AUC = AUROC")
    t.add_column("Fold")
    for m in METRICS:
        for s in STAGES:
            t.add_column(f"{METRIC_SHORT[m]}\n{STAGE_SHORT[s]}", justify="right")
    for k, r in zip(folds, rows):
        t.add_row(str(k), *[_fmt(r[m][s]) for m in METRICS for s in STAGES])
    t.add_row("Average", *[_fmt(avg[m][s]) for m in METRICS for s in STAGES], style="italic")
    if dataset == "colon":
        paper = PAPER_AVERAGE["colon"]
        t.add_row("Paper", *[f"{paper[m][i]:.2f}" for m in METRICS for i in range(3)], style="dim")
    console.print(t)
    if dataset == "breast":
        console.print(BREAST_NOTE)


def finished(out_dir: Path) -> dict | None:
    """Metrics of a finished fold run in ``out_dir`` (None when absent or incomplete)."""
    from milkit.run_dir import RunDir

    m = RunDir(out_dir).read_metrics()
    return m if all(s in m for s in ("teacher", "student")) else None


def run_fold(config: Path, root: Path, fold: int, out_dir: Path, overrides: list[str]) -> dict:
    """Train one fold (config + ``data.root``/``data.fold`` overrides) and return its metrics."""
    from milkit.config import load_experiment
    from milkit.workflow import train_run

    exp = load_experiment(config, [f"data.root={root}", f"data.fold={fold}", *overrides])
    return train_run(exp, out_dir, overwrite=True)


def run_benchmark(
    datasets: dict[str, Path],
    out: Path,
    folds: list[int],
    configs: dict[str, Path],
    overrides: list[str],
    console: Console | None = None,
) -> dict:
    """Run every fold of every dataset; print Tables I–II; write ``results.json`` and ``results.md``."""
    console = console or Console()
    results: dict = {}
    for dataset, root in datasets.items():
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: {dataset} dataset folder does not exist")
        cfg = configs[dataset]
        if not Path(cfg).is_file():
            raise FileNotFoundError(f"{cfg}: config file does not exist (pass --{dataset}-config)")
        level = "instance" if dataset == "colon" else "bag"
        rows = []
        for k in folds:
            fold_dir = out / dataset / f"fold_{k}"
            metrics = finished(fold_dir)
            if metrics is not None:
                console.print(f"[bold]{dataset}[/] fold {k}: reusing the finished run in {fold_dir}")
            else:
                console.print(f"[bold]{dataset}[/] fold {k}: training abmil → teacher → student …")
                metrics = run_fold(Path(cfg), root, k, fold_dir, overrides)
            rows.append(fold_row(metrics, level))
        avg = average_rows(rows)
        render_table(dataset, folds, rows, avg, console)
        results[dataset] = {
            "level": level,
            "folds": {str(k): r for k, r in zip(folds, rows)},
            "average": avg,
            "paper_average_instance_level": PAPER_AVERAGE[dataset],
            "root": str(root),
            "config": str(cfg),
        }
        if dataset == "breast":
            results[dataset]["note"] = BREAST_NOTE
    io.write_json(out / "results.json", results)
    io.write_text(out / "results.md", results_markdown(results))
    return results


def results_markdown(results: dict) -> str:
    """The tables as Markdown (what the report quotes)."""
    lines: list[str] = []
    for dataset, r in results.items():
        lines += [f"### {TITLES[dataset]}", ""]
        head = ["Fold"] + [f"{METRIC_NAMES[m]} {STAGE_NAMES[s]}" for m in METRICS for s in STAGES]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k, row in r["folds"].items():
            lines.append("| " + " | ".join([k] + [_fmt(row[m][s]) for m in METRICS for s in STAGES]) + " |")
        lines.append("| *Average* | " + " | ".join(_fmt(r["average"][m][s]) for m in METRICS for s in STAGES) + " |")
        if dataset == "colon":
            p = r["paper_average_instance_level"]
            lines.append("| Paper avg | " + " | ".join(f"{p[m][i]:.2f}" for m in METRICS for i in range(3)) + " |")
        if "note" in r:
            lines += ["", r["note"]]
        lines.append("")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add ``milkit benchmark d2l-histology``."""

    @app.command("d2l-histology")
    def d2l_histology(
        colon: Optional[Path] = typer.Option(None, "--colon", help="CRCHistoPhenotypes folder (holds Classification/)"),
        breast: Optional[Path] = typer.Option(None, "--breast", help="folder of UCSB *_ccd.tif breast images"),
        out: Path = typer.Option(Path("runs/benchmark/d2l_histology"), "--out", help="output folder (one run per fold)"),
        folds: str = typer.Option("0-4", "--folds", help="folds to run, e.g. 0-4 or 0,2"),
        colon_config: Path = typer.Option(CONFIG_DIR / "colon.yaml", "--colon-config"),
        breast_config: Path = typer.Option(CONFIG_DIR / "breast.yaml", "--breast-config"),
        max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="override trainer.max_epochs"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="config override key.sub=value (repeatable)"),
        standin: bool = typer.Option(
            False, "--standin", help="write tiny synthetic stand-ins in the published layouts and use them (smoke run)"
        ),
    ) -> None:
        """Distill-to-Label Tables I–II: per-fold and average accuracy, F1, AUROC of ABMIL, teacher, student."""
        datasets: dict[str, Path] = {}
        if standin:
            from milkit.data.histology_standin import write_breast_standin, write_colon_standin

            colon = colon or write_colon_standin(out / "standin" / "colon", n_images=20)
            breast = breast or write_breast_standin(out / "standin" / "breast", n_images=20)
        if colon is not None:
            datasets["colon"] = colon
        if breast is not None:
            datasets["breast"] = breast
        if not datasets:
            raise ValueError("give --colon PATH and/or --breast PATH (or --standin for a synthetic smoke run)")
        overrides = list(set_ or [])
        if max_epochs is not None:
            overrides.append(f"trainer.max_epochs={max_epochs}")
        run_benchmark(datasets, out, parse_folds(folds), {"colon": colon_config, "breast": breast_config}, overrides)
