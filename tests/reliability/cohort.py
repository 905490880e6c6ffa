"""A tiny feature-bag cohort on disk (h5 files + labels CSV + experiment YAML) that trains in
about a second; the reliability corpus breaks one thing at a time in a copy of it."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import yaml

N_SLIDES = 12
D = 8
SPLITS = ["train"] * 8 + ["val"] * 2 + ["test"] * 2


def write_h5(path: Path, feats: np.ndarray, coords: np.ndarray | None = None, ps0: int = 256) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        if coords is None:
            xs = np.arange(len(feats), dtype=np.int64) * ps0
            coords = np.stack([xs, np.zeros_like(xs)], 1)
        c = f.create_dataset("coords", data=coords)
        c.attrs["patch_size_level0"] = ps0
    return path


def bag_features(i: int, label: int, n: int = 6, d: int = D) -> np.ndarray:
    """Gaussian features; a positive bag has two instances shifted along the first axis."""
    rng = np.random.default_rng(i)
    x = rng.normal(size=(n, d)).astype(np.float32)
    if label:
        x[:2, 0] += 4.0
    return x


def make_cohort(root: Path, max_epochs: int = 2, splits: list[str] | None = None) -> dict:
    """``root/feats/s00.h5 …``, ``root/labels.csv``, ``root/exp.yaml``; returns their paths."""
    root = Path(root)
    splits = SPLITS if splits is None else splits
    rows = ["slide_id,label,split"]
    for i, sp in enumerate(splits):
        label = i % 2
        write_h5(root / "feats" / f"s{i:02d}.h5", bag_features(i, label))
        rows.append(f"s{i:02d},{label},{sp}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    exp = {
        "seed": 0,
        "data": {"kind": "feature_bags", "features_dir": str(root / "feats"), "labels_csv": str(root / "labels.csv")},
        "method": {"name": "mil", "encoder": {"name": "linear", "out_dim": 8},
                   "model": {"name": "abmil", "attention_hidden": 8}},
        "trainer": {"max_epochs": max_epochs, "lr": 0.01, "progress_bar": False, "accelerator": "cpu",
                    "devices": 1, "log_every_n_steps": 1},
    }
    cfg = root / "exp.yaml"
    cfg.write_text(yaml.safe_dump(exp, sort_keys=False))
    return {"root": root, "feats": root / "feats", "labels": root / "labels.csv", "config": cfg}
