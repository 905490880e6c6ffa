"""pseudo_label's `within_slide` option (issue 11 hard-confounded): pseudo-labels and selection blind to a
slide-wide score shift, by hand, and a tiny run that records the criterion and reloads."""

import json

import numpy as np
import pytest
import torch

from milkit.config import build_experiment
from milkit.methods.pseudo_label import (PseudoLabelConfig, centred, centred_instance_max_auroc, instance_max_auroc,
                                         pseudo_labels, within_slide_pseudo_labels)
from milkit.workflow import load_labelers, train_run

TRAINER = {"optimizer": "adam", "progress_bar": False, "accelerator": "cpu", "monitor": "val/auroc_minus_bce"}


def test_within_slide_pseudo_labels_by_hand():
    # negative bag centred by its median 1: [-1, 0, 1], so the 0.5-quantile of negatives is 0.
    # bag A (lower median 0.5) centred [4.5, 0, 2.5, -1.5]: idx 0 and 2 positive; its 2 lowest (idx 3, 1) negative.
    # bag B (median 10.1) centred [0, 0.1]: idx 1 positive, its lowest one (idx 0) negative.
    scores = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([5.0, 0.5, 3.0, -1.0]), torch.tensor([10.1, 10.2])]
    labels = [0, 1, 1]
    t = within_slide_pseudo_labels(scores, labels, quantile=0.5, max_fraction=1.0, negative_fraction=0.5)
    assert [x.tolist() for x in t] == [[0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0], [0.0, 1.0]]
    # the global rule makes all of the shifted bag B positive and leaves A's low half unlabelled
    g = pseudo_labels(scores, labels, quantile=0.5, max_fraction=1.0)
    assert g[2].tolist() == [1.0, 1.0] and g[1].tolist() == [1.0, -1.0, 1.0, -1.0]
    # invariant to a constant added to every score of a slide (negative or positive)
    shifted = [scores[0] - 7.0, scores[1] + 100.0, scores[2] - 3.0]
    t2 = within_slide_pseudo_labels(shifted, labels, 0.5, 1.0, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(t, t2))
    # fraction 0: no extra negatives (then it is pseudo_labels on centred scores); the top one is never overwritten
    t0 = within_slide_pseudo_labels(scores, labels, 0.5, 1.0, 0.0)
    assert t0[1].tolist() == [1.0, -1.0, 1.0, -1.0]
    one = within_slide_pseudo_labels([torch.tensor([0.0]), torch.tensor([2.0, 1.0])], [0, 1], 0.99, 1.0, 0.9)
    assert one[1].tolist() == [1.0, 0.0]  # the bag's top instance stays positive (≥ 1 positive per positive bag)


def test_centred_instance_max_auroc_gives_no_credit_for_a_slide_wide_shift():
    shifted_pos, neg = torch.tensor([3.0, 3.0, 3.0, 3.0]), torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert instance_max_auroc([shifted_pos, neg], [1, 0]) == 1.0  # the shift alone wins globally
    assert centred_instance_max_auroc([shifted_pos, neg], [1, 0]) == 0.0  # no patch stands out in the positive
    standout = torch.tensor([3.0, 3.0, 3.0, 5.0])
    assert centred_instance_max_auroc([standout, neg], [1, 0]) == 1.0
    assert [c.tolist() for c in centred([standout])] == [[0.0, 0.0, 0.0, 2.0]]


def test_within_slide_is_off_by_default_and_its_fraction_is_checked():
    c = PseudoLabelConfig()
    assert c.within_slide is False and c.within_slide_negative_fraction == 0.5
    with pytest.raises(ValueError, match="within_slide_negative_fraction"):
        PseudoLabelConfig(within_slide=True, within_slide_negative_fraction=1.0)


def test_a_within_slide_run_records_its_criterion_and_reloads(tmp_path):
    from milkit.metrics.classification import auroc

    data = {"kind": "hard_bags", "level": "hard-confounded", "n_train": 12, "n_val": 8, "n_test": 8}
    method = {"name": "pseudo_label", "mil_epochs": 2, "rounds": 1, "round_epochs": 1, "within_slide": True}
    raw = {"seed": 0, "data": data, "method": method, "trainer": {**TRAINER, "max_epochs": 1}}
    m = train_run(build_experiment(raw), tmp_path / "ws")
    sel = json.loads((tmp_path / "ws" / "stages" / "pseudo_label" / "selection.json").read_text())
    assert sel["criterion"].endswith("minus its median (within_slide)")
    assert [c["candidate"] for c in sel["candidates"]] == ["mil", "round-1"]
    best = max(sel["candidates"], key=lambda c: c["val_instance_max_auroc"])
    assert sel["chosen"] == best["candidate"]
    r1 = sel["rounds"][0]
    assert r1["n_positive"] + r1["n_negative"] + r1["n_unlabelled"] > 0
    # the extra negatives: more negatives than the negative slides' patches alone
    _, labelers, exp = load_labelers(tmp_path / "ws")
    splits = exp.data.build(exp.seed)
    n_neg_slides = sum(len(b.instances) for b in splits.train if b.label == 0)
    assert r1["n_negative"] > n_neg_slides
    rows = labelers["pseudo_label"].predict_dataset(splits.test)
    y = np.concatenate([r["instance_labels"] for r in rows])
    s = np.concatenate([r["scores"] for r in rows])
    assert abs(auroc(y, s) - m["pseudo_label"]["test"]["instance_auroc"]) < 1e-6


def test_round_scales_grid_fits_each_round_at_every_scale_and_reloads(tmp_path):
    """`round_scales: grid`: each round is a ScaleMeanMIL of one classifier per grid α (own folders), the
    labelled model is one whichever candidate is kept, and `load_labelers` rebuilds the same scores."""
    from milkit.methods.pseudo_label import ScaleMeanMIL
    from milkit.metrics.classification import auroc

    assert PseudoLabelConfig().round_scales == "first"  # the default is unchanged
    data = {"kind": "hard_bags", "level": "hard", "n_train": 12, "n_val": 8, "n_test": 8}
    method = {"name": "pseudo_label", "mil_epochs": 1, "rounds": 1, "round_epochs": 1, "within_slide": True,
              "round_scales": "grid"}
    raw = {"seed": 0, "data": data, "method": method, "trainer": {**TRAINER, "max_epochs": 1}}
    m = train_run(build_experiment(raw), tmp_path / "rs")
    r1 = tmp_path / "rs" / "stages" / "pseudo_label" / "round-1"
    assert (r1 / "alpha-0.8" / "model.pt").is_file() and (r1 / "alpha-0.65" / "model.pt").is_file()
    _, labelers, exp = load_labelers(tmp_path / "rs")
    model = labelers["pseudo_label"].model
    assert isinstance(model, ScaleMeanMIL) and len(model.members) == 2
    assert [float(mm.sm_feat.alpha) for mm in model.members] == pytest.approx([0.8, 0.65])
    rows = labelers["pseudo_label"].predict_dataset(exp.data.build(exp.seed).test)
    y = np.concatenate([r["instance_labels"] for r in rows])
    s = np.concatenate([r["scores"] for r in rows])
    assert abs(auroc(y, s) - m["pseudo_label"]["test"]["instance_auroc"]) < 1e-6


@pytest.mark.parametrize("extra", [{"feature_alpha_grid": None}, {"feature_alpha_combine": "choose"}])
def test_round_scales_grid_without_a_scale_mean_is_a_one_line_error(extra):
    """`round_scales: grid` fits the rounds at the scales of the stage-'mil' mean; without that mean it
    would silently fall back to one scale, so it is refused naming the key."""
    from milkit.config import ConfigError

    raw = {"seed": 0, "data": {"kind": "hard_bags", "level": "easy"},
           "method": {"name": "pseudo_label", "round_scales": "grid", **extra}, "trainer": {"max_epochs": 1}}
    with pytest.raises(ConfigError, match="method.round_scales: grid needs method.feature_alpha_grid") as err:
        build_experiment(raw)
    assert "\n" not in str(err.value)
