"""``milkit demo``: ABMIL vs Distill-to-Label teacher vs student on bundled digit-bags.

Offline (scikit-learn's digits), a few minutes on 2 CPU cores. Writes a run
directory, instance labels of the test bags, a metrics table and a PNG montage of
test bags with each instance's student score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console

from milkit import io
from milkit.config import build_experiment
from milkit.methods.base import Labeler
from milkit.workflow import label_run, load_labelers, print_table, train_run

DEMO_CONFIG = {
    "data": {"kind": "digit_bags", "n_train": 150, "n_val": 100, "n_test": 200, "mean_bag_size": 10},
    "method": {"name": "distill_to_label", "baseline": True},  # LeNet-5 + gated attention, paper defaults
    # Adam 5e-4 (Ilse et al.) for 5 epochs per stage instead of the paper's RMSprop schedule, to fit in minutes
    "trainer": {"optimizer": "adam", "lr": 0.0005, "batch_size": 1, "max_epochs": 5, "progress_bar": True},
}


def montage(labeler: Labeler, ds, path: Path, n_bags: int = 6, max_instances: int = 18) -> None:
    """Test bags as rows of digits; title = student score, red frame = labelled positive, ★ = a true 9."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = labeler.predict_dataset(ds)
    pos = [i for i, r in enumerate(rows) if r["label"] == 1][: n_bags // 2]
    neg = [i for i, r in enumerate(rows) if r["label"] == 0][: n_bags - len(pos)]
    chosen = pos + neg
    max_instances = min(max_instances, max(len(ds[i]) for i in chosen))
    fig, axes = plt.subplots(len(chosen), max_instances, figsize=(max_instances * 0.9, len(chosen) * 1.15))
    thr = labeler.threshold if labeler.threshold is not None else 0.5
    for r_i, bag_i in enumerate(chosen):
        bag, res = ds[bag_i], rows[bag_i]
        for k in range(max_instances):
            ax = axes[r_i, k]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if k >= len(bag):
                continue
            ax.imshow(bag.instances[k, 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
            s = float(res["scores"][k])
            star = "★" if bag.instance_labels is not None and int(bag.instance_labels[k]) == 1 else ""
            ax.set_title(f"{s:.2f}{star}", fontsize=7, color="red" if s >= thr else "black")
            if s >= thr:
                for sp in ax.spines.values():
                    sp.set_visible(True)
                    sp.set_color("red")
                    sp.set_linewidth(2)
        axes[r_i, 0].set_ylabel(f"bag p={res['bag_prob']:.2f}\nY={res['label']}", fontsize=7)
    fig.suptitle("Distill-to-Label student: instance scores on test bags (red ≥ validation threshold, ★ = a 9)",
                 fontsize=9)
    fig.tight_layout()
    io.write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def run_demo(out: Path, seed: int = 0) -> dict:
    console = Console()
    out = Path(out)
    exp = build_experiment({**DEMO_CONFIG, "seed": seed}, source="milkit demo")
    console.print(f"[bold]milkit demo[/]: ABMIL, D2L teacher and student on digit-bags → {out}")
    metrics = train_run(exp, out, overwrite=True)
    labels = label_run(out, None, None, "test", "student")
    method, labelers, exp = load_labelers(out)
    png = out / "montage_test_bags.png"
    montage(labelers["student"], exp.data.build(exp.seed).test, png)
    print_table(metrics, "test", console)
    d = {s: metrics[s]["test"] for s in ("abmil", "teacher", "student")}
    console.print(
        "instance AUROC  ABMIL {:.3f}  →  teacher {:.3f}  →  student {:.3f}".format(
            *(np.nan_to_num(d[s].get("instance_auroc") or np.nan) for s in d)
        )
    )
    console.print(f"labels: {labels[0]}\nmontage: {png}\nmetrics: {out / 'metrics.json'}\nreport: {out / 'report.html'}")
    return metrics
