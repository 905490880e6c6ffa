"""``milkit demo``: ABMIL vs Distill-to-Label teacher vs student on bundled digit-bags,
then the whole-slide pipeline on a handful of small pyramidal slides.

Offline, a few minutes on 2 CPU cores. Part 1 (scikit-learn's digits) writes a run
directory, instance labels of the test bags, a metrics table and a PNG montage of test
bags with each instance's student score. Part 2 (``OUT/wsi/``) makes ten small pyramidal
TIFF slides from scikit-image's bundled immunohistochemistry image (milkit.slide.synthetic;
the five positive slides carry a DAB-stained lesion and its ASAP XML), then runs tile →
extract (the untrained tiny CNN: no download) → train ABMIL → label → evaluate against the
annotations, and prints the ``milkit view`` command and the report path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console

from milkit import io
from milkit.config import build_experiment
from milkit.methods.base import Labeler
from milkit.trust.verdict import print_verdicts
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
    print_verdicts(metrics, lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    console.print(f"labels: {labels[0]}\nmontage: {png}\nmetrics: {out / 'metrics.json'}\nreport: {out / 'report.html'}")
    metrics["_slides"] = run_slide_demo(out / "wsi", seed, console)
    return metrics


#: the slide part: 10 slides (6 train, 2 val, 2 test), 1536² px at 0.5 µm/px, 64-px patches at 1 µm/px
WSI_SPLITS = ["train"] * 6 + ["val"] * 2 + ["test"] * 2


def run_slide_demo(out: Path, seed: int = 0, console: Console | None = None) -> dict:
    """tile → extract → train → label → evaluate on ten real-image slides in ``out``."""
    import shutil

    from milkit.slide.extract import extract_dir
    from milkit.slide.labeling import evaluate_annotations, label_slides
    from milkit.slide.synthetic import make_ihc_slide
    from milkit.slide.tiling import TilingConfig, tile_slides

    console = console or Console()
    out = Path(out)
    slides_dir, ann_dir, tiles, run = out / "slides", out / "annotations", out / "tiles", out / "run"
    ann_dir.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,label,split"]
    console.print(f"[bold]slide pipeline[/]: 10 slides from scikit-image's IHC sample → {slides_dir}")
    for i, split in enumerate(WSI_SPLITS):
        positive = i % 2 == 0
        s = make_ihc_slide(slides_dir, f"ihc{i:02d}", positive, seed * 100 + i)
        if s.annotation is not None:
            shutil.move(s.annotation, ann_dir / s.annotation.name)
        rows.append(f"ihc{i:02d},{int(positive)},{split}")
    io.write_text(out / "labels.csv", "\n".join(rows) + "\n")
    console.print("tile (32 px at 1 µm/px) …")
    # a fixed saturation threshold: Otsu would split the brown lesion from the pale DAB-free tissue
    # and keep only the lesion of a positive slide (the patch count alone would then give the label away)
    cfg = TilingConfig(patch_size=32, target_mpp=1.0, tissue={"method": "fixed", "threshold": 15})
    tile_slides(sorted(slides_dir.glob("*.tif")), tiles, cfg, overwrite=True, progress=False)
    console.print("extract (tiny CNN, untrained: no download) …")
    extract_dir(tiles, "tiny_cnn", "none", num_workers=0, batch_size=256, progress=False)
    exp = build_experiment({
        "seed": seed,
        "data": {"kind": "feature_bags", "features_dir": str(tiles), "labels_csv": str(out / "labels.csv"),
                 "annotations_dir": str(ann_dir)},  # validation patch labels choose the threshold (never trained on)
        # a linear embedding before ABMIL's attention; best epoch by AUROC − BCE (Sm App. B)
        "method": {"name": "mil", "encoder": {"name": "linear", "in_dim": 32, "out_dim": 64}, "model": {"name": "abmil"}},
        "trainer": {"max_epochs": 30, "lr": 1e-3, "progress_bar": False, "monitor": "val/auroc_minus_bce"},
    }, source="milkit demo (slides)")
    console.print("train ABMIL on 6 slides (slide labels only) …")
    metrics = train_run(exp, run, overwrite=True)
    print_verdicts(metrics, lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    labels = run / "labels"  # where report.html's per-slide links expect them
    label_slides(run, [slides_dir], tiles, labels, None, thumbnail_size=512)
    res = evaluate_annotations(run, ann_dir, labels)
    for split, m in res["splits"].items():
        console.print(f"{split:5s} slides {m['n_slides']}  slide AUROC {_f(m['slide_auroc'])}  patch AUROC "
                      f"{_f(m['instance_auroc'])}  patch F1 {_f(m['instance_f1'])}  FROC {_f(m['froc'])}")
    console.print(f"report: {run / 'report_annotations.html'} (and {run / 'report.html'})\n"
                  f"view:   milkit view {labels} --annotations {ann_dir}")
    return res


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"
