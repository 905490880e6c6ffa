"""``milkit benchmark segmentation``: IKD-MIL Table 1 and Max-Min Tables 1–2 style.

Every experiment YAML in ``configs/segmentation_benchmark/`` (IKD teacher/student,
U-Net upper bound, All-ones lower bound, Max-Min EEM/SEM, WILDCAT, CAM-*, Grad-CAM,
Deep MIL) is trained on each dataset for each seed through ``workflow.train_run``;
its ``data`` section is replaced by the benchmark's dataset (the synthetic tissue set
with small images, so the suite runs on a CPU; GlaS and Camelyon16 patches when their
paths are given). One table row per (experiment, stage) on the test split: image
classification error, F1+, F1−, IKD's F1, IoU, HD^Pos — mean ± std over seeds.
Runs whose ``metrics.json`` exists are reused (the suite resumes after an interruption).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from milkit.benchmarks.common import markdown_table, mean_std, write_results
from milkit.config import apply_overrides, build_experiment, load_yaml
from milkit.run_dir import RunDir
from milkit.workflow import train_run

#: the offline benchmark set: 64-px synthetic tissue, half the images with lesions
SYNTHETIC = {"kind": "seg_synthetic", "image_size": 64, "n_train": 96, "n_val": 32, "n_test": 48}
COLUMNS = [("classification_error", "Cl. err (%)", 100), ("f1_pos", "F1+ tumour (%)", 100), ("f1_neg", "F1− (%)", 100),
           ("f1", "F1 IKD (%)", 100), ("iou", "IoU± (%)", 100), ("hd_pos", "HD^Pos (px)", 1)]


def default_config_dir() -> Path:
    from milkit.shipped_configs import config_roots

    for root in config_roots():
        if (root / "segmentation_benchmark").is_dir():
            return root / "segmentation_benchmark"
    return Path("configs/segmentation_benchmark")


def datasets(image_size: int, glas: Path | None, camelyon: Path | None, camelyon_csv: str | None,
             real_size: int, max_images: int | None) -> dict[str, dict]:
    """Data sections by name: always the synthetic set; GlaS / Camelyon16 when given."""
    out = {"synthetic": {**SYNTHETIC, "image_size": image_size}}
    if glas is not None:
        out["glas"] = {"kind": "seg_images", "format": "glas", "root": str(glas), "image_size": real_size,
                       "max_images": max_images}
    if camelyon is not None:
        out["camelyon16"] = {"kind": "seg_images", "format": "camelyon16_patches", "root": str(camelyon),
                             "csv": camelyon_csv or "patches.csv", "image_size": real_size, "max_images": max_images,
                             "lazy": True}
    return out


def _fmt(ms: tuple[float, float, int], scale: float) -> str:
    m, s, n = ms
    if n == 0:
        return "—"
    return f"{m * scale:.1f} ± {s * scale:.1f}" if n > 1 else f"{m * scale:.1f}"


def _tables(results: dict, data: dict) -> str:
    md = ""
    for ds_name in data:
        per_row = results.get(ds_name, {})
        rows = [[name, len(vals.get("seeds", []))] + [_fmt(mean_std(vals[k]), sc) for k, _, sc in COLUMNS]
                for name, vals in per_row.items()]
        md += f"\n## {ds_name}\n\n" + markdown_table(["experiment:stage", "seeds"] + [h for _, h, _ in COLUMNS], rows)
    return md


def run(out: Path, configs: list[Path], seeds: list[int], data: dict[str, dict], overrides: list[str],
        console: Console) -> dict:
    if not configs:
        raise FileNotFoundError("no experiment YAMLs to run (configs/segmentation_benchmark/*.yaml)")
    results: dict = {"seeds": seeds, "datasets": data, "configs": [str(c) for c in configs], "runs": {}}
    md = "# Weakly supervised segmentation benchmark (IKD-MIL Table 1, Max-Min Tables 1–2)\n\n"
    md += f"Seeds: {', '.join(map(str, seeds))}; test split; per-image metrics averaged; mean ± std over seeds.\n"
    for ds_name, section in data.items():
        per_row: dict[str, dict[str, list]] = {}
        results[ds_name] = per_row
        # seeds outermost: after each seed every experiment has a result (partial tables are complete rows)
        for seed in seeds:
            for cfg_path in configs:
                raw = load_yaml(cfg_path)
                r = apply_overrides({**raw, "seed": seed, "data": dict(section)}, overrides, source=str(cfg_path))
                exp = build_experiment(r, source=str(cfg_path))
                run_dir = out / "runs" / ds_name / cfg_path.stem / f"seed{seed}"
                rd = RunDir(run_dir)
                if rd.metrics_path.is_file() and rd.read_metrics():
                    metrics = rd.read_metrics()
                else:
                    console.print(f"[{ds_name}] {cfg_path.stem} seed {seed} …")
                    metrics = train_run(exp, run_dir, overwrite=True)
                results["runs"][f"{ds_name}/{cfg_path.stem}/seed{seed}"] = str(run_dir)
                for stage, m in metrics.items():
                    if stage.startswith("_") or not isinstance(m, dict) or "test" not in m:
                        continue
                    row = per_row.setdefault(f"{cfg_path.stem}:{stage}", {k: [] for k, _, _ in COLUMNS})
                    row.setdefault("train_seconds", []).append(metrics.get("_run", {}).get("train_seconds"))
                    row.setdefault("seeds", []).append(seed)
                    for k, _, _ in COLUMNS:
                        row[k].append(m["test"].get(k))
            write_results(out, "segmentation", results, md + _tables(results, data))
    md += _tables(results, data)
    j, mdp = write_results(out, "segmentation", results, md)
    console.print(md)
    console.print(f"written: {j}, {mdp}")
    return results


def register(app: typer.Typer) -> None:
    @app.command("segmentation")
    def segmentation(
        out: Path = typer.Option(Path("benchmark-results/segmentation"), "--out"),
        configs: Optional[Path] = typer.Option(None, "--configs", help="folder of experiment YAMLs"),
        only: Optional[List[str]] = typer.Option(None, "--only", help="config names (file stems) to run"),
        seeds: int = typer.Option(3, "--seeds", help="number of seeds (papers: 3 repeats)"),
        first_seed: int = typer.Option(0, "--first-seed", help="seeds run are first_seed .. first_seed+seeds-1"),
        image_size: int = typer.Option(64, "--image-size", help="synthetic image side (small: CPU)"),
        glas: Optional[Path] = typer.Option(None, "--glas", help="GlaS folder (Grade.csv + bmp files)"),
        camelyon: Optional[Path] = typer.Option(None, "--camelyon", help="Camelyon16 patch folder"),
        camelyon_csv: Optional[str] = typer.Option(None, "--camelyon-csv", help="patch list (image,mask,label[,split])"),
        real_size: int = typer.Option(256, "--real-size", help="GlaS/Camelyon16 resize (IKD §4.2: 256)"),
        max_images: Optional[int] = typer.Option(None, "--max-images", help="cap per split for GlaS/Camelyon16"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="override applied to every experiment"),
    ) -> None:
        """Every segmentation method and baseline: Cl. error, F1+, F1−, F1, IoU, HD^Pos."""
        folder = configs or default_config_dir()
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such config folder")
        paths = sorted(folder.glob("*.yaml"))
        if only:
            unknown = sorted(set(only) - {p.stem for p in paths})
            if unknown:
                raise ValueError(f"{folder}: no config named {', '.join(unknown)}")
            paths = [p for p in paths if p.stem in set(only)]
        data = datasets(image_size, glas, camelyon, camelyon_csv, real_size, max_images)
        if seeds < 1 or first_seed < 0:
            raise typer.BadParameter("--seeds must be ≥ 1 and --first-seed ≥ 0")
        run(out, paths, list(range(first_seed, first_seed + seeds)), data, list(set_ or []), Console())
