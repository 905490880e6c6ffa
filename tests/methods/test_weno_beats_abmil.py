"""Issue 12 (WENO): on a small generated positive-ratio set, WENO's student labels instances at
least as well as plain ABMIL's attention (the paper's headline claim, Table 1).

Margin: student instance AUROC ≥ ABMIL's + 0.02. Checked by hand on seeds 0, 1, 2 with the
default pseudo_label "code": +0.048, +0.033, +0.123 (paper reading: +0.029, +0.024, +0.092);
see docs/benchmarks.md "WENO student vs ABMIL". The test runs seed 0.
"""

from __future__ import annotations

import tempfile

from milkit.config import build_experiment
from milkit.engine import seed_everything
from milkit.methods.base import evaluate_labeler
from milkit.run_dir import RunDir
from milkit.workflow import make_method

MARGIN = 0.02
DATA = {"kind": "positive_ratio_bags", "source": "digits", "positive_ratio": 0.2, "bag_size": 20,
        "n_train_bags": 30, "n_val_bags": 10, "n_test_bags": 20, "representation": "flat", "image_size": 8}
ENCODER = {"name": "linear", "in_dim": 64, "out_dim": 32}
TRAINER = {"max_epochs": 15, "optimizer": "adam", "lr": 3e-3, "progress_bar": False, "monitor": "val/auroc_minus_bce"}


def instance_aurocs(seed: int) -> dict[str, float]:
    """Test instance AUROC of ABMIL (attention logits) and WENO's student and teacher (shipped defaults)."""
    out = {}
    for method in ({"name": "mil", "encoder": ENCODER, "model": {"name": "abmil", "gated": False}},
                   {"name": "weno", "encoder": ENCODER, "teacher": {"name": "abmil", "gated": False},
                    "student_batch_size": 64, "hpm_warmup_epochs": 8}):
        exp = build_experiment({"seed": seed, "data": DATA, "method": method, "trainer": TRAINER})
        splits = exp.data.build(seed)
        seed_everything(seed)
        labelers = make_method(exp).fit(splits, RunDir(tempfile.mkdtemp()))
        for name, lab in labelers.items():
            out[name] = float(evaluate_labeler(lab, splits.test, None)["instance_auroc"])
    return out


def test_weno_student_labels_instances_at_least_as_well_as_abmil() -> None:
    r = instance_aurocs(0)
    assert r["student"] >= r["mil"] + MARGIN, r
    assert r["student"] >= 0.85, r  # and well above chance (0.5)
