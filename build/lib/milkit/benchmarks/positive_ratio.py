"""``milkit benchmark positive-ratio``: WENO Table 1 (and Table 4 ablation) on positive-ratio bags.

Table 1 layout: test instance AUROC and bag AUROC of ABMIL, ABMIL+WENO, DSMIL and
DSMIL+WENO for every positive-instance ratio r, mean ± std over seeds. Baselines are
plain MIL (``mil`` method; instance scores = ABMIL attention logits / DSMIL instance
classifier); WENO rows report the student (instances; bag = max over instances) and,
in the JSON, the teacher too. Table 4: distillation / shared encoder / HPM switched on
one by one (ABMIL teacher) at one ratio.

Digits (scikit-learn, bundled) by default; ``--cifar PATH`` adds CIFAR-10-MIL from a
local copy of the python batches. Results: ``positive_ratio.json`` + ``.md`` in ``--out``,
rewritten after every run so that a cut-short benchmark keeps what it measured.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from milkit.benchmarks.common import fmt, markdown_table, mean_std, write_results
from milkit.config import build_experiment
from milkit.engine import seed_everything
from milkit.workflow import train_run

ROWS = ("ABMIL", "ABMIL+WENO", "DSMIL", "DSMIL+WENO")
ABLATION = (
    ("no distillation (ABMIL)", {"distillation": False}),
    ("distillation", {"shared_encoder": False, "hpm": False}),
    ("distillation + shared encoder", {"hpm": False}),
    ("distillation + shared encoder + HPM", {}),
)


def _source(dataset: str, cifar: Path | None, image_size: int) -> tuple[dict, dict]:
    """(data fields, encoder config) of a dataset."""
    if dataset == "cifar10":
        return ({"source": "cifar10", "path": str(cifar), "positive_class": "truck"},
                {"name": "small_cnn", "in_channels": 3, "out_dim": 64})
    return ({"source": "digits", "positive_class": 9, "image_size": image_size},
            {"name": "lenet5", "in_channels": 1, "image_size": image_size, "out_dim": 128})


def experiment(row: str, dataset: str, ratio: float, seed: int, s: dict, weno_extra: dict | None = None) -> dict:
    """The experiment dict of one Table 1 cell (or an ablation row with ``weno_extra``)."""
    data, encoder = _source(dataset, s["cifar"], s["image_size"])
    data = {"kind": "positive_ratio_bags", "positive_ratio": ratio, "bag_size": s["bag_size"],
            "n_train_bags": s["n_train"], "n_val_bags": s["n_val"], "n_test_bags": s["n_test"], **data}
    teacher = {"name": "dsmil"} if row.startswith("DSMIL") else {"name": "abmil", "gated": False}
    if row.endswith("WENO") or weno_extra is not None:
        method = {"name": "weno", "encoder": encoder, "teacher": teacher, "hpm_warmup_epochs": s["hpm_warmup"],
                  "student_batch_size": s["student_batch"], **(weno_extra or {})}
        if s["hpm_grid"]:
            method["hpm_threshold_grid"] = s["hpm_grid"]
    else:
        method = {"name": "mil", "encoder": encoder, "model": teacher}
    trainer = {"optimizer": s["optimizer"], "lr": s["lr"], "max_epochs": s["epochs"], "batch_size": 1,
               "progress_bar": False, "monitor": "val/auroc_minus_bce"}
    return {"seed": seed, "data": data, "method": method, "trainer": trainer}


def _scores(m: dict) -> dict:
    """Test instance/bag AUROC of the primary labeler (+ the WENO teacher's)."""
    if "mil" in m:
        return {"instance_auroc": m["mil"]["test"].get("instance_auroc"), "bag_auroc": m["mil"]["test"].get("bag_auroc")}
    primary = "student" if "student" in m else "teacher"
    out = {"instance_auroc": m[primary]["test"].get("instance_auroc"), "bag_auroc": m[primary]["test"].get("bag_auroc")}
    out["teacher_instance_auroc"] = m["teacher"]["test"].get("instance_auroc")
    out["teacher_bag_auroc"] = m["teacher"]["test"].get("bag_auroc")
    return out


def _render(results: dict) -> str:
    s = results["settings"]
    md = "# WENO positive-ratio benchmark (Table 1 layout, Table 4 ablation)\n\n"
    md += (f"{s['seeds']} seed(s); {s['epochs']} epochs; bag size {s['bag_size']}; bags train/val/test "
           f"{s['n_train']}/{s['n_val']}/{s['n_test']}; {s['optimizer']} lr {s['lr']}; HPM warm-up {s['hpm_warmup']} "
           f"epochs, threshold {'grid ' + str(s['hpm_grid']) if s['hpm_grid'] else 0.5}; student batch {s['student_batch']}. "
           "Test split, mean ± std over seeds. WENO rows: student (bag = max over instances); "
           "teacher numbers in the JSON.\n")
    for dataset, table in results["table1"].items():
        ratios = sorted({float(r) for row in table.values() for r in row})
        for metric, title in (("instance_auroc", "Instance AUROC"), ("bag_auroc", "Bag AUROC")):
            rows = []
            for row in ROWS:
                cells = table.get(row, {})
                rows.append([row] + [fmt(mean_std(cells.get(f"{r:g}", {}).get(metric, []))) for r in ratios])
            md += f"\n## {dataset}: {title}\n\n"
            md += markdown_table(["method"] + [f"r = {100 * r:g}%" for r in ratios], rows)
        gains = []
        for base, weno in (("ABMIL", "ABMIL+WENO"), ("DSMIL", "DSMIL+WENO")):
            for r in ratios:
                b = mean_std(table.get(base, {}).get(f"{r:g}", {}).get("instance_auroc", []))
                w = mean_std(table.get(weno, {}).get(f"{r:g}", {}).get("instance_auroc", []))
                if b[2] and w[2]:
                    gains.append(f"{weno} − {base} at r = {100 * r:g}%: {w[0] - b[0]:+.3f}")
        if gains:
            md += "\nInstance AUROC gain of WENO: " + "; ".join(gains) + "\n"
    if results.get("ablation"):
        ab = results["ablation"]
        md += f"\n## Table 4 ablation ({ab['dataset']}, r = {100 * ab['ratio']:g}%, ABMIL teacher)\n\n"
        rows = [[name, fmt(mean_std(v["instance_auroc"])), fmt(mean_std(v["bag_auroc"]))] for name, v in ab["rows"].items()]
        md += markdown_table(["setting", "instance AUROC", "bag AUROC"], rows)
    return md


def run(out: Path, datasets: list[str], ratios: list[float], seeds: int, s: dict, ablation_ratio: float | None,
        console: Console, first_seed: int = 0) -> dict:
    out = Path(out)
    results: dict = {"settings": {**s, "seeds": seeds, "first_seed": first_seed, "cifar": str(s["cifar"]) if s["cifar"] else None},
                     "table1": {}, "ablation": None, "timing_s": {}}

    def save() -> None:
        write_results(out, "positive_ratio", results, _render(results))

    for dataset in datasets:
        table = results["table1"].setdefault(dataset, {})
        for ratio in ratios:
            for seed in range(first_seed, first_seed + seeds):
                for row in ROWS:
                    t0 = time.perf_counter()
                    exp = build_experiment(experiment(row, dataset, ratio, seed, s))
                    seed_everything(seed)  # model init happens before fit_stage seeds (methods build first)
                    tag = row.replace("+", "_")
                    m = train_run(exp, out / "runs" / dataset / f"r{ratio:g}" / f"{tag}_s{seed}", overwrite=True)
                    cell = table.setdefault(row, {}).setdefault(f"{ratio:g}", {})
                    for k, v in _scores(m).items():
                        cell.setdefault(k, []).append(v)
                    results["timing_s"][f"{dataset}/{row}/r{ratio:g}/s{seed}"] = round(time.perf_counter() - t0, 1)
                    console.print(f"{dataset} r={ratio:g} seed={seed} {row}: {_scores(m)}")
                    save()
    if ablation_ratio is not None:
        dataset = datasets[0]
        results["ablation"] = {"dataset": dataset, "ratio": ablation_ratio, "rows": {}}
        for seed in range(first_seed, first_seed + seeds):
            for name, extra in ABLATION:
                exp = build_experiment(experiment("ABMIL+WENO", dataset, ablation_ratio, seed, s, weno_extra=extra))
                seed_everything(seed)
                tag = name.replace(" ", "_").replace("+", "").replace("(", "").replace(")", "")
                m = train_run(exp, out / "runs" / "ablation" / f"{tag}_s{seed}", overwrite=True)
                row = results["ablation"]["rows"].setdefault(name, {"instance_auroc": [], "bag_auroc": []})
                sc = _scores(m)
                row["instance_auroc"].append(sc["instance_auroc"])
                row["bag_auroc"].append(sc["bag_auroc"])
                console.print(f"ablation seed={seed} {name}: {sc}")
                save()
    save()
    console.print(_render(results))
    return results


def _floats(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def register(app: typer.Typer) -> None:
    @app.command("positive-ratio")
    def positive_ratio(
        out: Path = typer.Option(Path("benchmark-results/positive-ratio"), "--out"),
        ratios: Optional[str] = typer.Option(None, "--ratios", help="comma-separated r (default 0.01,0.05,0.1,0.2,0.5,0.7)"),
        seeds: int = typer.Option(3, "--seeds"),
        first_seed: int = typer.Option(0, "--first-seed", help="seeds run are first_seed .. first_seed+seeds-1"),
        epochs: int = typer.Option(12, "--epochs"),
        bag_size: int = typer.Option(100, "--bag-size", help="instances per bag (NOTES.md: 100)"),
        n_train: int = typer.Option(40, "--n-train"),
        n_val: int = typer.Option(10, "--n-val"),
        n_test: int = typer.Option(20, "--n-test"),
        image_size: int = typer.Option(16, "--image-size", help="digit side in pixels (LeNet-5 needs ≥ 16)"),
        optimizer: str = typer.Option("adam", "--optimizer", help="paper §4.3: sgd at lr 1e-3 (needs many epochs)"),
        lr: float = typer.Option(1e-3, "--lr"),
        hpm_warmup: int = typer.Option(6, "--hpm-warmup", help="epochs before HPM (NOTES.md: code 10)"),
        hpm_grid: Optional[str] = typer.Option(None, "--hpm-grid", help="HPM thresholds to grid on validation, e.g. 0.3,0.5,0.7"),
        student_batch: int = typer.Option(256, "--student-batch", help="student mini-batch (NOTES.md: 256)"),
        cifar: Optional[Path] = typer.Option(None, "--cifar", help="folder of CIFAR-10 python batches (adds CIFAR-10-MIL)"),
        ablation_ratio: float = typer.Option(0.2, "--ablation-ratio", help="r of the Table 4 ablation"),
        no_ablation: bool = typer.Option(False, "--no-ablation"),
        quick: bool = typer.Option(False, "--quick", help="r ∈ {0.1, 0.5}, 1 seed, 6 epochs, bag size 20"),
    ) -> None:
        """WENO Table 1 (instance and bag AUROC vs positive ratio) and Table 4 ablation."""
        rs = _floats(ratios) or [0.01, 0.05, 0.1, 0.2, 0.5, 0.7]
        bad = [r for r in rs if not 0 < r <= 1]
        if bad:
            raise ValueError(f"--ratios: every ratio must lie in (0, 1], got {bad}")
        if cifar is not None and not cifar.is_dir():
            raise FileNotFoundError(f"{cifar}: CIFAR-10 folder does not exist")
        s = {"epochs": epochs, "bag_size": bag_size, "n_train": n_train, "n_val": n_val, "n_test": n_test,
             "image_size": image_size, "optimizer": optimizer, "lr": lr, "hpm_warmup": hpm_warmup,
             "hpm_grid": _floats(hpm_grid), "student_batch": student_batch, "cifar": cifar}
        if quick:
            rs, seeds = [0.1, 0.5], 1
            s.update(epochs=6, bag_size=20, hpm_warmup=3, student_batch=32)
        datasets = ["digits"] + (["cifar10"] if cifar is not None else [])
        run(out, datasets, rs, seeds, s, None if no_ablation else ablation_ratio, Console(), first_seed)
