"""``milkit benchmark mnist-bags``: Distill-to-Label's MNIST-bags protocol (§III-B).

1. Fig. 2 — teacher bag AUROC with and without VAT (without = λn = λδ = λe = 0, i.e.
   plain gated ABMIL), for N × K: on the validation bags (which also pick the
   checkpoint, as the paper's figure) and on held-out test bags beside them.
2. Tables I–II style — ABMIL vs teacher vs student instance accuracy / F1 / AUROC on
   test bags, mean ± std over seeds.

Uses scikit-learn's 8×8 digits (upscaled to 28×28) unless ``--mnist PATH`` is given: results
are then named "digit-bags", and "MNIST-bags" only with real MNIST.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from milkit.benchmarks.common import fmt, markdown_table, mean_std, write_results
from milkit.config import build_experiment
from milkit.workflow import train_run


def _exp(n: int, k: int, seed: int, epochs: int, n_val: int, n_test: int, mnist: Path | None, vat: bool,
         student: bool, baseline: bool) -> dict:
    teacher = {} if vat else {"lambda_n": 0.0, "lambda_delta": 0.0, "lambda_e": 0.0}
    return {
        "seed": seed,
        "data": {"kind": "digit_bags", "n_train": n, "mean_bag_size": k, "n_val": n_val, "n_test": n_test,
                 "mnist_path": str(mnist) if mnist else None},
        "method": {"name": "distill_to_label", "baseline": baseline, "train_student": student, "teacher": teacher},
        "trainer": {"optimizer": "rmsprop", "lr": 1e-4, "max_epochs": epochs, "batch_size": 1, "progress_bar": False},
    }


def run(out: Path, ns: list[int], ks: list[int], seeds: int, epochs: int, n_val: int, n_test: int,
        mnist: Path | None, table_n: int, table_k: int, console: Console, fig2: bool = True,
        first_seed: int = 0) -> dict:
    """Fig. 2 for every (K, N) (skipped when ``fig2`` is False), then Tables I–II at (table_n, table_k)."""
    name = dataset_name(mnist)
    results: dict = {"fig2": {}, "table": {}, "settings": {"epochs": epochs, "n_val": n_val, "n_test": n_test,
                                                           "seeds": seeds, "first_seed": first_seed, "source": str(mnist or "sklearn-digits"),
                                                           "dataset": name}}
    fig2_rows = []
    for k in ks if fig2 else []:
        for n in ns:
            cell: dict = {"vat": [], "no_vat": [], "vat_test": [], "no_vat_test": []}
            for seed in range(first_seed, first_seed + seeds):
                for key, vat in (("vat", True), ("no_vat", False)):
                    exp = build_experiment(_exp(n, k, seed, epochs, n_val, n_test, mnist, vat, False, False))
                    m = train_run(exp, out / "runs" / f"fig2_K{k}_N{n}_{key}_s{seed}", overwrite=True)
                    cell[key].append(m["teacher"]["val"]["bag_auroc"])
                    cell[f"{key}_test"].append(m["teacher"]["test"]["bag_auroc"])
            results["fig2"][f"K{k}_N{n}"] = cell
            fig2_rows.append([k, n] + [fmt(mean_std(cell[c])) for c in ("no_vat", "vat", "no_vat_test", "vat_test")])
            console.print(f"Fig. 2 K={k} N={n}: val no VAT {fmt(mean_std(cell['no_vat']))}  VAT {fmt(mean_std(cell['vat']))}"
                          f"; test no VAT {fmt(mean_std(cell['no_vat_test']))}  VAT {fmt(mean_std(cell['vat_test']))}")
    per_stage: dict = {s: {"instance_accuracy": [], "instance_f1": [], "instance_auroc": [], "bag_auroc": []}
                       for s in ("abmil", "teacher", "student")}
    for seed in range(first_seed, first_seed + seeds):
        exp = build_experiment(_exp(table_n, table_k, seed, epochs, n_val, n_test, mnist, True, True, True))
        m = train_run(exp, out / "runs" / f"table_K{table_k}_N{table_n}_s{seed}", overwrite=True)
        for s in per_stage:
            for key in per_stage[s]:
                per_stage[s][key].append(m[s]["test"].get(key))
    results["table"] = {"N": table_n, "K": table_k, "per_stage": per_stage}
    rows = [[s] + [fmt(mean_std(per_stage[s][k])) for k in ("instance_accuracy", "instance_f1", "instance_auroc",
                                                            "bag_auroc")] for s in per_stage]
    md = f"# {name} (Distill-to-Label §III-B protocol)\n\n"
    md += f"Source: {results['settings']['source']}; {seeds} seed(s); {epochs} epochs per stage; "
    md += f"{n_val} validation / {n_test} test bags.\n"
    if fig2:
        md += "\n## Fig. 2: teacher bag AUROC\n\n"
        md += "Validation bags also choose the checkpoint (as in the paper's figure); test bags are held out.\n\n"
        md += markdown_table(["K", "N", "val without VAT", "val with VAT", "test without VAT", "test with VAT"],
                             fig2_rows)
    md += f"\n## Tables I–II style (N = {table_n}, K = {table_k}), test bags\n\n"
    md += markdown_table(["stage", "inst accuracy", "inst F1", "inst AUROC", "bag AUROC"], rows)
    j, mdp = write_results(out, "mnist_bags", results, md)
    console.print(md)
    console.print(f"written: {j}, {mdp}")
    return results


def dataset_name(mnist: Path | None) -> str:
    """"MNIST-bags" only when real MNIST is given; scikit-learn's digits make "digit-bags"."""
    return "MNIST-bags" if mnist else "digit-bags"


def register(app: typer.Typer) -> None:
    @app.command("mnist-bags")
    def mnist_bags(
        out: Path = typer.Option(Path("benchmark-results/mnist-bags"), "--out"),
        n: Optional[List[int]] = typer.Option(None, "--n", help="N_train values (default 50 75 100 200 500)"),
        k: Optional[List[int]] = typer.Option(None, "--k", help="mean bag sizes (default 10 20)"),
        seeds: int = typer.Option(5, "--seeds"),
        epochs: int = typer.Option(20, "--epochs"),
        n_val: int = typer.Option(1000, "--n-val", help="validation bags (paper: 1000)"),
        n_test: int = typer.Option(1000, "--n-test"),
        mnist: Optional[Path] = typer.Option(None, "--mnist", help=".npz or IDX folder of MNIST (default: sklearn digits)"),
        quick: bool = typer.Option(False, "--quick", help="one cell (N=100, K=10), 1 seed, 5 epochs, 200 val/test bags"),
        table_only: bool = typer.Option(False, "--table-only", help="skip Fig. 2; only Tables I–II"),
        table_n: Optional[int] = typer.Option(None, "--table-n", help="N of Tables I–II (default: the 4th --n, or the last)"),
        first_seed: int = typer.Option(0, "--first-seed", min=0, help="seeds run are first_seed .. first_seed+seeds-1"),
    ) -> None:
        """Distill-to-Label Fig. 2 (val and test) and Tables I–II style on digit-bags (MNIST-bags with --mnist)."""
        if quick:
            ns, ks, seeds_, epochs_, nv, nt = [100], [10], 1, 5, 200, 200
        else:
            ns, ks, seeds_, epochs_, nv, nt = n or [50, 75, 100, 200, 500], k or [10, 20], seeds, epochs, n_val, n_test
        if table_n is not None and table_n < 1:
            raise typer.BadParameter("--table-n must be ≥ 1")
        tn = table_n or (ns[min(len(ns) - 1, 3)] if not quick else 100)
        run(out, ns, ks, seeds_, epochs_, nv, nt, mnist, tn, ks[0], Console(), fig2=not table_only,
            first_seed=first_seed)
