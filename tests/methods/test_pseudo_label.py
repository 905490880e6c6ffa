"""pseudo_label (issue 11 §2): the pseudo-label rule by hand, and a small hard-bags run against ABMIL."""

import json

import pytest
import torch
import yaml

from milkit.config import build_experiment
from milkit.methods.pseudo_label import SmoothedInstanceMIL, instance_max_auroc, pseudo_labels
from milkit.workflow import load_labelers, train_run

#: a small hard set: hardest level's witness rate and signal, fewer and smaller slides
SMALL = {"kind": "hard_bags", "level": "hard", "n_train": 40, "n_val": 16, "n_test": 24, "min_side": 10, "max_side": 12}
TRAINER = {"optimizer": "adam", "progress_bar": False, "accelerator": "cpu", "monitor": "val/auroc_minus_bce"}
#: test patch AUROC on SMALL with the settings below, seeds 0, 1, 2 by hand: 0.679, 0.672, 0.727
#: (ABMIL, 6 epochs: 0.589, 0.680, 0.901 — on a set this small the recipe does NOT beat ABMIL;
#: on the full hardest level it does, docs/benchmarks.md "hard-bags")
CHANCE_MARGIN = 0.1


def test_pseudo_labels_by_hand():
    scores = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([5.0, 0.5, 3.0, -1.0]), torch.tensor([0.1, 0.2])]
    labels = [0, 1, 1]
    # negatives' scores {0, 1, 2}: the 0.5-quantile is 1.0
    t = pseudo_labels(scores, labels, quantile=0.5, max_fraction=1.0)
    assert t[0].tolist() == [0.0, 0.0, 0.0]  # every instance of a negative bag is a clean negative
    assert t[1].tolist() == [1.0, -1.0, 1.0, -1.0]  # above 1.0 → positive, the rest unlabelled
    assert t[2].tolist() == [-1.0, 1.0]  # none above: the top one is positive (each positive bag ≥ 1)
    capped = pseudo_labels(scores, labels, quantile=0.5, max_fraction=0.25)
    assert capped[1].tolist() == [1.0, -1.0, -1.0, -1.0]  # at most 25 % of the bag
    mi_svm = pseudo_labels(scores, labels, quantile=0.5, max_fraction=1.0, unlabelled="negative")
    assert mi_svm[1].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_instance_max_auroc_sees_an_inverted_scorer():
    pos, neg = torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])
    assert instance_max_auroc([pos, neg], [1, 0]) == 1.0
    assert instance_max_auroc([-pos, -neg], [1, 0]) == 0.0


def test_smoothed_instance_model_without_graph_is_max_of_instance_logits():
    torch.manual_seed(0)
    m = SmoothedInstanceMIL(6, hidden=0, alpha=0.5, feature_alpha=0.8).eval()
    x = torch.randn(2, 5, 6)
    out = m(x)
    assert torch.allclose(out.bag_logits, m.instance_logits(x).amax(1))


def _run(tmp_path, name, method, seed):
    raw = {"seed": seed, "data": SMALL, "method": method, "trainer": {**TRAINER, "lr": 3e-4, "max_epochs": 6}}
    return train_run(build_experiment(raw), tmp_path / f"{name}_{seed}")


@pytest.mark.slow
def test_small_hard_run_beats_chance_writes_primary_stage_and_reloads(tmp_path):
    ours = _run(tmp_path, "pl", {"name": "pseudo_label", "mil_epochs": 12, "rounds": 1}, 0)
    a = ours["pseudo_label"]["test"]["instance_auroc"]
    assert a >= 0.5 + CHANCE_MARGIN, a
    run = tmp_path / "pl_0"
    assert ours["_run"]["primary_stage"] == "pseudo_label"
    assert json.loads((run / "metrics.json").read_text())["_run"]["primary_stage"] == "pseudo_label"
    assert yaml.safe_load((run / "config.yaml").read_text())["method"]["in_dim"] == 512  # read from the data
    sel = json.loads((run / "stages" / "pseudo_label" / "selection.json").read_text())
    assert sel["chosen"] in {c["candidate"] for c in sel["candidates"]}
    method, labelers, exp = load_labelers(run)
    assert set(labelers) == {"mil", "pseudo_label"} and method.primary_stage == "pseudo_label"
    test = exp.data.build(exp.seed).test
    rows = labelers["pseudo_label"].predict_dataset(test)
    from milkit.metrics.classification import auroc
    import numpy as np

    y = np.concatenate([r["instance_labels"] for r in rows])
    s = np.concatenate([r["scores"] for r in rows])
    assert abs(auroc(y, s) - a) < 1e-6  # the reloaded run scores exactly as the trained one


def test_images_are_refused_with_a_clear_error(tmp_path):
    from milkit.data.bag import Bag, BagDataset
    from milkit.data.base import DataSplits
    from milkit.methods.pseudo_label import PseudoLabelMethod
    from milkit.run_dir import RunDir

    raw = {"seed": 0, "data": SMALL, "method": {"name": "pseudo_label"}, "trainer": TRAINER}
    method = PseudoLabelMethod(build_experiment(raw))
    ds = BagDataset([Bag(torch.zeros(3, 1, 8, 8), 1, "img")])
    with pytest.raises(ValueError, match="needs feature bags"):
        method.fit(DataSplits(ds, ds, ds), RunDir(tmp_path / "r"))
