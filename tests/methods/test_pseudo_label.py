"""pseudo_label (issue 11 §2): the pseudo-label rule by hand, and a small hard-bags run that beats ABMIL by a stated margin."""

import json

import pytest
import torch
import yaml

from milkit.config import build_experiment
from milkit.methods.pseudo_label import SmoothedInstanceMIL, instance_max_auroc, pseudo_labels
from milkit.workflow import load_labelers, train_run

#: a small hard set: the hardest level (witness rate 2–4 %, signal 3.0, full-size 14–18-patch
#: slides) with fewer slides — 60 / 30 / 30 instead of 100 / 40 / 100
SMALL = {"kind": "hard_bags", "level": "hard", "n_train": 60, "n_val": 30, "n_test": 30}
TRAINER = {"optimizer": "adam", "progress_bar": False, "accelerator": "cpu", "monitor": "val/auroc_minus_bce"}
ABMIL = {"name": "mil", "encoder": {"name": "linear", "in_dim": 512, "out_dim": 256}, "model": {"name": "abmil"}}
PSEUDO = {"name": "pseudo_label", "mil_epochs": 12, "rounds": 1}
#: test patch AUROC on SMALL with these settings (ABMIL 6 epochs at lr 3e-4; pseudo_label 12 + 1 × 5
#: epochs), seeds tried by hand — recipe / ABMIL / difference:
#: seed 0: 0.970 / 0.842 / +0.128; 1: 0.963 / 0.723 / +0.240; 2: 0.974 / 0.872 / +0.102;
#: 3: 0.974 / 0.802 / +0.172; 4: 0.977 / 0.760 / +0.217 (smallest +0.102). On 40 / 16 / 24 slides
#: the recipe was not stable (seeds 0–2, before output_alpha: 0.904, 0.618, 0.785; ABMIL at
#: 6 epochs 0.290, 0.223, 0.751).
#: The margin asserted (seed 0) is below the smallest difference seen.
MARGIN = 0.05


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


def _run(tmp_path, name, method, seed, epochs):
    raw = {"seed": seed, "data": SMALL, "method": method, "trainer": {**TRAINER, "lr": 3e-4, "max_epochs": epochs}}
    return train_run(build_experiment(raw), tmp_path / f"{name}_{seed}")


@pytest.mark.slow
def test_small_hard_run_beats_abmil_writes_primary_stage_and_reloads(tmp_path):
    """Issue 11 tests: the recipe beats ABMIL by MARGIN = 0.05 test patch AUROC on a small hard
    set (seed 0). Seeds 0–4 tried by hand gave differences +0.128, +0.240, +0.102, +0.172, +0.217
    (recipe 0.963–0.977, ABMIL 0.723–0.872), see the comment above MARGIN."""
    ours = _run(tmp_path, "pl", PSEUDO, 0, 1)
    a = ours["pseudo_label"]["test"]["instance_auroc"]
    abmil = _run(tmp_path, "abmil", ABMIL, 0, 6)["mil"]["test"]["instance_auroc"]
    assert a - abmil >= MARGIN, (a, abmil)
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


def test_slide_normalise_by_hand_and_ignores_padding():
    from milkit.methods.pseudo_label import slide_normalise

    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, -100.0]]])  # the third instance is padding
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(slide_normalise(x, mask, "none"), x)
    # mean (2, 4); deviations ±(1, 2); sd (1, 2)
    assert torch.allclose(slide_normalise(x, mask, "centre"), torch.tensor([[[-1.0, -2.0], [1.0, 2.0], [0.0, 0.0]]]))
    assert torch.allclose(slide_normalise(x, mask, "standardise"), torch.tensor([[[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]]))


@pytest.mark.parametrize("mode", ["centre", "standardise"])
def test_slide_norm_makes_scores_invariant_to_a_slide_batch_effect(mode):
    # a per-slide shift (centre) or per-feature gain and shift (standardise) of every instance
    # of a slide — a stain / scanner effect — leaves every instance score unchanged
    torch.manual_seed(0)
    m = SmoothedInstanceMIL(6, hidden=4, alpha=0.5, feature_alpha=0.8, slide_norm=mode).eval()
    m.set_standardisation(torch.randn(50, 6).abs() + 0.5)
    x = torch.randn(1, 7, 6)
    gain = torch.rand(6) + 0.5 if mode == "standardise" else torch.ones(6)
    shifted = x * gain + torch.randn(6) * 3
    assert torch.allclose(m(x).instance_scores, m(shifted).instance_scores, atol=1e-5)
    plain = SmoothedInstanceMIL(6, hidden=4, slide_norm="none").eval()
    assert not torch.allclose(plain(x).instance_scores, plain(shifted).instance_scores, atol=1e-3)


def test_centre_scores_by_hand_and_median_scores_ignore_a_slide_wide_shift():
    from milkit.methods.pseudo_label import centre_scores

    s = torch.tensor([[1.0, 5.0, 2.0, 9.0], [4.0, 0.0, 3.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    # medians: (1, 2, 5) → 2; (0, 0, 3, 4) → torch's lower median 0
    assert torch.equal(centre_scores(s, mask), torch.tensor([[-1.0, 3.0, 0.0, 0.0], [4.0, 0.0, 3.0, 0.0]]))
    torch.manual_seed(0)
    m = SmoothedInstanceMIL(6, hidden=0, alpha=0.5, feature_alpha=0.8, score_centre="median").eval()
    x = torch.randn(2, 5, 6)
    out = m(x)
    assert torch.allclose(out.bag_logits, m.instance_logits(x).amax(1))
    with torch.no_grad():
        m.scorer[-1].bias += 3.0  # every instance logit of every slide up by 3: nothing changes
    assert torch.allclose(m(x).instance_scores, out.instance_scores, atol=1e-5)
    assert torch.allclose(m(x).bag_logits, out.bag_logits, atol=1e-5)
