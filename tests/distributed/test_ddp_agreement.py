"""Two processes (Lightning ``ddp``, gloo on CPU, batch 1 per rank) give the validation metrics,
checkpoint choice, weights and thresholds of one process at batch 2.

Why they should agree: every rank takes every 2nd bag of the one-process shuffle order, so
global step k holds the bags of one-process step k, and DDP's average of the ranks' per-bag
loss gradients is the gradient of the batch-mean loss; validation predictions are gathered
before the AUROC. What is left is float rounding (a padded batch of 2 vs single bags, the
all-reduce's summation order): measured 1e-8–1e-7 on every logged value after 3 epochs
(docs/scale.md "DDP agreement"). The tolerances (1e-6 on AUROC, 1e-5/1e-4 on BCE, 1e-4 on
weights and thresholds) leave room for other CPUs' rounding but not for a real difference:
a different bag order or a per-rank validation AUROC moves these values by more than 1e-3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_helpers import val_epochs  # noqa: E402

#: ABMIL's attention-logit bias: its gradient is 0 in exact arithmetic (the softmax over a bag
#: ignores a shift), so Adam turns float rounding into lr-sized steps of random sign. It changes
#: no bag probability and no ranking (raw attention logits shift by a constant, which the
#: calibration absorbs); every other weight agrees to ~1e-7.
SHIFT_ONLY = {"model.pool.scorer.w.bias"}


def _best_epoch(run_dir: Path, stage: str) -> int:
    ckpt = torch.load(run_dir / "stages" / stage / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    return int(ckpt["epoch"])


def _weights(run_dir: Path, stage: str) -> dict:
    return torch.load(run_dir / "stages" / stage / "model.pt", weights_only=True)


@pytest.mark.parametrize("name,stage,bce_tol", [("abmil", "mil", 1e-5), ("weno", "student", 1e-4)])
def test_validation_per_epoch_and_checkpoint_choice_agree(ddp_job, name, stage, bce_tol) -> None:
    one, two = ddp_job["one"][name], ddp_job["two"][name]
    a, b = val_epochs(one, stage), val_epochs(two, stage)
    assert len(a) == len(b) == 3
    bce = [r["val/bag_bce"] for r in a]
    assert max(bce) - min(bce) > 1e-3  # training moves the model: the agreement is not trivial
    keys = [k for k in a[0] if k.startswith("val/")]
    for ra, rb in zip(a, b):
        for k in keys:
            tol = 1e-6 if k.endswith("auroc") else bce_tol
            assert rb[k] == pytest.approx(ra[k], abs=tol), (k, ra["epoch"])
    assert _best_epoch(two, stage) == _best_epoch(one, stage)
    wa, wb = _weights(one, stage), _weights(two, stage)
    assert wa.keys() == wb.keys()
    for k in wa.keys() - SHIFT_ONLY:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", ["abmil", "weno"])
def test_thresholds_and_test_metrics_agree(ddp_job, name) -> None:
    one, two = ddp_job["one"][name], ddp_job["two"][name]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    stages = ma["_run"]["stages"]
    assert mb["_run"]["stages"] == stages
    for stage in stages:
        ta, tb = (json.loads((d / "stages" / stage / "threshold.json").read_text()) for d in (one, two))
        assert tb["source"] == ta["source"] == "validation:f1"  # chosen on validation instance labels
        assert tb["threshold"] == pytest.approx(ta["threshold"], abs=1e-4), stage
        for split in ("val", "test"):
            assert mb[stage][split]["n_bags"] == ma[stage][split]["n_bags"] == 12  # nothing twice, nothing left out
            for key in ("bag_auroc", "instance_auroc", "instance_f1"):
                assert mb[stage][split][key] == pytest.approx(ma[stage][split][key], abs=1e-4), (stage, split, key)


def test_train_losses_are_the_mean_over_every_rank(ddp_job) -> None:
    """``train/*`` epoch means are summed over the ranks' shares before they are logged, so two
    processes log the loss one process logs (not rank 0's half of the bags)."""
    import csv

    def train_rows(run_dir: Path) -> list[dict[str, float]]:
        rows = csv.DictReader((run_dir / "stages" / "mil" / "logs" / "metrics.csv").open())
        return [{k: float(v) for k, v in r.items() if v} for r in rows if r.get("train/loss")]

    a, b = train_rows(ddp_job["one"]["abmil"]), train_rows(ddp_job["two"]["abmil"])
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], abs=1e-5), ra["epoch"]
