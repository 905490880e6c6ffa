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
#: Those were measured with one smoothing scale; with the two-scale default (feature_alpha_grid
#: [0.8, 0.65], combine mean) the recipe gives seed 0: 0.973 (+0.131), seed 1: 0.966 (+0.243).
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


# -- candidates of issue 11's easy-level patch F1 (docs/benchmarks.md "hard-bags easy/medium patch F1") --------------

def test_own_features_are_the_smoothed_then_the_patch_own_standardised_features():
    torch.manual_seed(0)
    from milkit.data.graph import chain_adjacency

    x, adj = torch.randn(1, 5, 3), [chain_adjacency(5)]
    mask = torch.ones(1, 5, dtype=torch.bool)
    plain = SmoothedInstanceMIL(3, hidden=0, feature_alpha=0.8)
    both = SmoothedInstanceMIL(3, hidden=0, feature_alpha=0.8, own_features=True)
    for m in (plain, both):
        m.mean.fill_(1.0)
        m.std.fill_(2.0)
    h = both.features(x, mask, adj)
    assert h.shape == (1, 5, 6) and both.scorer[-1].in_features == 6 and plain.scorer[-1].in_features == 3
    assert torch.allclose(h[..., :3], plain.features(x, mask, adj))  # the smoothed half is the plain model's
    assert torch.allclose(h[..., 3:], (x - 1.0) / 2.0)  # the patch's own standardised features, unsmoothed
    assert not torch.allclose(h[..., :3], h[..., 3:])  # the graph did smooth the first half
    assert torch.allclose(both.features(x, mask, None), torch.cat([(x - 1) / 2] * 2, -1))  # no graph: Sm is the identity


def test_auroc_minus_bce_by_hand():
    import math

    from milkit.methods.pseudo_label import auroc_minus_bce

    scores = [torch.tensor([2.0, 0.0]), torch.tensor([-1.0, -3.0])]  # maxima 2 (positive slide), -1 (negative)
    bce = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    assert auroc_minus_bce(scores, [1, 0]) == pytest.approx(1.0 - bce)
    assert auroc_minus_bce(scores, [0, 1]) == pytest.approx(0.0 - (math.log1p(math.exp(2.0)) + math.log1p(math.exp(1.0))) / 2)
    assert auroc_minus_bce(scores, [1, 1]) == pytest.approx(0.5 - (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2)


def _grid_method(grid):
    from milkit.methods.pseudo_label import PseudoLabelMethod

    raw = {"seed": 0, "data": SMALL, "method": {"name": "pseudo_label", "in_dim": 4, "feature_alpha_grid": grid,
                                                "feature_alpha_combine": "choose"},
           "trainer": TRAINER}
    return PseudoLabelMethod(build_experiment(raw))


@pytest.mark.parametrize("crit, chosen", [({0.8: 0.3, 0.5: 0.7}, 0.5), ({0.8: 0.7, 0.5: 0.3}, 0.8),
                                          ({0.8: 0.5, 0.5: 0.5}, 0.8)])  # a tie keeps the earlier value
def test_feature_alpha_grid_keeps_the_value_with_the_better_validation_criterion(tmp_path, monkeypatch, crit, chosen):
    import milkit.methods.pseudo_label as pl
    from milkit.data.bag import Bag, BagDataset
    from milkit.data.base import DataSplits
    from milkit.run_dir import RunDir

    def fake_fit(module, train, val, stage_dir, cfg, seed, **kw):  # no training: each trial's model as built
        stage_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"alpha": module.model.sm_feat.alpha if module.model.sm_feat is not None else 0.0}, stage_dir / "model.pt")
        return stage_dir / "model.pt"

    monkeypatch.setattr(pl, "fit_stage", fake_fit)
    seen = []
    monkeypatch.setattr(pl, "bag_scores", lambda model, ds: seen.append(model) or [])
    monkeypatch.setattr(pl, "auroc_minus_bce", lambda scores, labels: crit[round(float(seen[-1].sm_feat.alpha), 3)])
    ds = BagDataset([Bag(torch.randn(3, 4), y, f"b{y}") for y in (0, 1)])
    method, run, trials = _grid_method([0.8, 0.5]), RunDir(tmp_path / "r"), []
    model = method.fit_mil_stage(DataSplits(ds, ds, ds), run, torch.randn(6, 4), trials)
    assert [t["feature_alpha"] for t in trials] == [0.8, 0.5]
    assert [t["val_auroc_minus_bce"] for t in trials] == [crit[0.8], crit[0.5]]
    assert method.feature_alpha == chosen and model is seen[[0.8, 0.5].index(chosen)]
    kept = torch.load(run.model_path("mil"), weights_only=True)  # the kept trial's file is the stage's model.pt
    assert kept["alpha"] == pytest.approx(chosen)
    assert (run.stage_dir("mil") / "alpha-0.8" / "model.pt").is_file() and (run.stage_dir("mil") / "alpha-0.5" / "model.pt").is_file()
    assert method.instance_model().sm_feat.alpha == pytest.approx(chosen)  # later models use the chosen value


@pytest.mark.parametrize("grid, teacher, match", [([1.2], None, "method.feature_alpha_grid.*distinct values in"),
                                                  ([], None, "method.feature_alpha_grid.*distinct values in"),
                                                  ([0.5, 0.5], None, "method.feature_alpha_grid.*distinct values in"),
                                                  ([0.5], {"name": "abmil"}, "feature_alpha_grid needs method.teacher: null")])
def test_feature_alpha_grid_bad_values_are_one_line_errors_naming_the_key(grid, teacher, match):
    from milkit.config import ConfigError

    method = {"name": "pseudo_label", "feature_alpha_grid": grid, **({"teacher": teacher} if teacher else {})}
    with pytest.raises(ConfigError, match=match) as err:
        build_experiment({"seed": 0, "data": SMALL, "method": method, "trainer": TRAINER})
    assert "\n" not in str(err.value)


def test_scale_mean_is_the_mean_of_the_members_scores_and_its_max():
    from milkit.data.graph import chain_adjacency
    from milkit.methods.pseudo_label import ScaleMeanMIL

    torch.manual_seed(0)
    a, b = SmoothedInstanceMIL(3, hidden=0, feature_alpha=0.8).eval(), SmoothedInstanceMIL(3, hidden=0, feature_alpha=0.3).eval()
    x, adj = torch.randn(1, 6, 3), [chain_adjacency(6)]
    out = ScaleMeanMIL([a, b]).eval()(x, None, adj)
    sa, sb = a(x, None, adj).instance_scores, b(x, None, adj).instance_scores
    assert torch.allclose(out.instance_scores, (sa + sb) / 2)
    assert torch.allclose(out.bag_logits, ((sa + sb) / 2).amax(1))
    assert not torch.allclose(sa, sb)  # two scales, two different scorers


@pytest.mark.parametrize("combine", ["choose", "mean"])
def test_a_run_with_a_feature_alpha_grid_records_its_choice_and_reloads_with_it(tmp_path, combine):
    """Tiny end-to-end run: both grid values trained; `choose` records the argmax of the recorded
    criterion, `mean` keeps both as one model; `load_labelers` rebuilds the same (same test scores)."""
    import numpy as np

    from milkit.methods.pseudo_label import ScaleMeanMIL
    from milkit.metrics.classification import auroc

    data = {"kind": "hard_bags", "level": "easy", "n_train": 12, "n_val": 8, "n_test": 8}
    method = {"name": "pseudo_label", "mil_epochs": 2, "rounds": 1, "round_epochs": 1, "feature_alpha_grid": [0.8, 0.0],
              "own_features": True, "feature_alpha_combine": combine}
    raw = {"seed": 0, "data": data, "method": method, "trainer": {**TRAINER, "max_epochs": 1}}
    m = train_run(build_experiment(raw), tmp_path / "grid")
    sel = json.loads((tmp_path / "grid" / "stages" / "pseudo_label" / "selection.json").read_text())
    trials = sel["feature_alpha_trials"]
    assert [t["feature_alpha"] for t in trials] == [0.8, 0.0]
    if combine == "choose":
        assert sel["feature_alpha"] == max(trials, key=lambda t: t["val_auroc_minus_bce"])["feature_alpha"]
    else:
        assert sel["feature_alpha"] == 0.8  # the rounds' features: the grid's first value
    method_, labelers, exp = load_labelers(tmp_path / "grid")
    assert method_.feature_alpha == sel["feature_alpha"]
    assert isinstance(labelers["mil"].model, ScaleMeanMIL) == (combine == "mean")
    rows = labelers["pseudo_label"].predict_dataset(exp.data.build(exp.seed).test)
    y = np.concatenate([r["instance_labels"] for r in rows])
    s = np.concatenate([r["scores"] for r in rows])
    assert abs(auroc(y, s) - m["pseudo_label"]["test"]["instance_auroc"]) < 1e-6


def test_the_default_is_two_scales_averaged_and_a_lone_alpha_or_a_teacher_means_one_scale():
    from milkit.methods.pseudo_label import PseudoLabelConfig

    c = PseudoLabelConfig()
    assert c.feature_alpha_grid == [0.8, 0.65] and c.feature_alpha_combine == "mean"  # docs/benchmarks.md
    assert PseudoLabelConfig(feature_alpha=0.5).feature_alpha_grid is None  # the one value asked for
    assert PseudoLabelConfig(teacher={"name": "abmil"}).feature_alpha_grid is None  # stage 'mil' is the teacher
    assert PseudoLabelConfig(feature_alpha=0.5, feature_alpha_grid=[0.5, 0.3]).feature_alpha_grid == [0.5, 0.3]
    again = PseudoLabelConfig(**c.model_dump())  # a run's config.yaml (every key written) reads back the same
    assert again.feature_alpha_grid == [0.8, 0.65] and again.feature_alpha_combine == "mean"


def test_a_validation_tie_keeps_stage_mil_and_says_so(tmp_path, monkeypatch, caplog):
    """Two validation slides rank perfectly under every candidate: the first (stage mil) is kept,
    and the run says that stage pseudo_label then labels as stage mil does."""
    import logging

    import milkit.methods.pseudo_label as pl

    monkeypatch.setattr(pl, "instance_max_auroc", lambda scores, labels: 1.0)  # every candidate ties
    data = {"kind": "hard_bags", "level": "easy", "n_train": 12, "n_val": 4, "n_test": 4}
    method = {"name": "pseudo_label", "mil_epochs": 1, "rounds": 2, "round_epochs": 1, "feature_alpha": 0.8,
              "feature_alpha_grid": None}
    raw = {"seed": 3, "data": data, "method": method, "trainer": {**TRAINER, "max_epochs": 1}}
    with caplog.at_level(logging.INFO, logger="milkit"):
        train_run(build_experiment(raw), tmp_path / "tie")
    sel = json.loads((tmp_path / "tie" / "stages" / "pseudo_label" / "selection.json").read_text())
    assert sel["chosen"] == "mil"
    assert "pseudo_label (seed 3): the rounds tie with stage 'mil'" in caplog.text and "on 4 slides" in caplog.text
    # the notice names the run's own file (a --folds run prints one per fold)
    assert f"({tmp_path / 'tie' / 'stages' / 'pseudo_label' / 'selection.json'})" in caplog.text
