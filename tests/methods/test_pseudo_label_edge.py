"""pseudo_label's edge-blur candidates (issue 11, easy-level patch F1; branch wip-edge): the final
refit on less smoothed features (``edge_refit_alpha``), the three-scale mean row, and the
pre-stated adoption rule with its extra hard-mimic / hard-confounded clause — by hand."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from milkit.benchmarks.hard_bags import (ADOPTION_RULE, EDGE_ADOPTION_RULE, HARD_LEVELS_AUROC_RULE, ROWS,
                                         _scores_path, adoption, method_section)
from milkit.config import build_experiment
from milkit.models.base import MILOutput
from milkit.workflow import load_labelers, train_run

TRAINER = {"optimizer": "adam", "progress_bar": False, "accelerator": "cpu", "monitor": "val/auroc_minus_bce"}
SMALL = {"kind": "hard_bags", "level": "easy", "n_train": 12, "n_val": 8, "n_test": 8}
EDGE_ROWS = ("pseudo_label + edge refit (α 0.5)", "pseudo_label + three-scale mean (α 0.8 / 0.65 / 0.5)",
             "pseudo_label + edge refit (α 0.65)", "pseudo_label + edge refit with context (α 0.5 beside 0.8)",
             "pseudo_label + edge refit on eroded labels (α 0.5)")
SETTINGS = {"feature_dim": 512, "embed_dim": 256, "epochs": 1}


class FixedScores(nn.Module):
    """A 'kept model' whose instance scores are given per bag (by bag size), for the refit's labels."""

    def __init__(self, by_size: dict[int, list[float]]):
        super().__init__()
        self.by_size = by_size

    def forward(self, x, mask=None, adj=None):
        s = torch.tensor([self.by_size[x.shape[1]]])
        return MILOutput(bag_logits=s.amax(1), instance_scores=s, extras={})


def _method(**extra):
    from milkit.methods.pseudo_label import PseudoLabelMethod

    raw = {"seed": 0, "data": SMALL, "method": {"name": "pseudo_label", "in_dim": 4, "negative_quantile": 0.6,
                                                "max_positive_fraction": 1.0, **extra}, "trainer": TRAINER}
    return PseudoLabelMethod(build_experiment(raw))


@pytest.mark.parametrize("val_auc, ref, used", [(0.9, 0.8, True), (0.8, 0.8, True), (0.7, 0.8, False),
                                                (float("nan"), 0.8, False), (0.6, float("nan"), True)])
def test_edge_refit_trains_on_the_kept_models_pseudo_labels_at_its_alpha_and_is_used_only_if_not_worse(
        tmp_path, monkeypatch, val_auc, ref, used):
    import milkit.methods.pseudo_label as pl
    from milkit.data.bag import Bag, BagDataset
    from milkit.data.base import DataSplits
    from milkit.run_dir import RunDir

    seen = {}

    def fake_fit(module, loader, val, stage_dir, cfg, seed, **kw):  # no training: record what it was given
        seen["model"], seen["data"] = module.model, loader.dataset.tensors
        stage_dir.mkdir(parents=True, exist_ok=True)
        return stage_dir / "model.pt"

    monkeypatch.setattr(pl, "fit_stage", fake_fit)
    monkeypatch.setattr(pl, "instance_max_auroc", lambda scores, labels: val_auc)
    torch.manual_seed(0)
    neg, pos = Bag(torch.randn(3, 4), 0, "n"), Bag(torch.randn(4, 4), 1, "p")
    ds = BagDataset([neg, pos])
    # negatives' scores {0, 1, 2}: the 0.6-quantile is 1.2 → in the positive bag 5.0 and 3.0 are positives,
    # 0.5 and −1.0 unlabelled (not trained on)
    kept = FixedScores({3: [0.0, 1.0, 2.0], 4: [5.0, 0.5, 3.0, -1.0]})
    method = _method(edge_refit_alpha=0.5)
    x_all = torch.cat([neg.instances, pos.instances])
    rec, model = method.edge_refit(kept, {"candidate": "mil", "val_instance_max_auroc": ref},
                                   DataSplits(ds, ds, ds), RunDir(tmp_path / "r"), x_all)
    h, t = seen["data"]
    assert t.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    # the refit's features: standardised by the training instances (no graph here, so Sm is the identity)
    std = (x_all - x_all.mean(0)) / x_all.std(0)
    assert torch.allclose(h, std[[0, 1, 2, 3, 5]], atol=1e-6)
    assert model is seen["model"] and model.sm_feat.alpha == pytest.approx(0.5)
    assert (rec["n_positive"], rec["n_negative"], rec["n_unlabelled"]) == (2, 3, 2)
    assert rec["used"] is used and rec["candidate"] == "edge-refit" and rec["labels_from"] == "mil"


@pytest.mark.parametrize("context", [False, True])
def test_edge_refit_run_records_the_refit_and_reloads_the_same_labels(tmp_path, context):
    """Tiny end-to-end run: the refit is a recorded candidate; the labelled model is the refit at
    α 0.5 (with the α 0.8 context features beside them if asked) exactly when selection.json says it
    was used; load_labelers rebuilds the same test scores."""
    from milkit.metrics.classification import auroc
    from milkit.methods.pseudo_label import SmoothedInstanceMIL

    method = {"name": "pseudo_label", "mil_epochs": 2, "rounds": 1, "round_epochs": 1, "edge_refit_alpha": 0.5,
              "edge_refit_context": context}
    raw = {"seed": 0, "data": SMALL, "method": method, "trainer": {**TRAINER, "max_epochs": 1}}
    m = train_run(build_experiment(raw), tmp_path / "edge")
    sel = json.loads((tmp_path / "edge" / "stages" / "pseudo_label" / "selection.json").read_text())
    refit = next(c for c in sel["candidates"] if c["candidate"] == "edge-refit")
    assert sel["edge_refit_alpha"] == 0.5 and refit["n_positive"] >= 1
    assert refit["used"]  # seed 0: validation instance-max AUROC 1.0 for mil, round-1 and the refit (checked by hand)
    ref = next(c for c in sel["candidates"] if c["candidate"] == refit["labels_from"])
    assert refit["used"] == (refit["val_instance_max_auroc"] >= ref["val_instance_max_auroc"])
    assert (sel["chosen"] == "edge-refit") == refit["used"]
    _, labelers, exp = load_labelers(tmp_path / "edge")
    final = labelers["pseudo_label"].model
    assert isinstance(final, SmoothedInstanceMIL) and final.sm_feat.alpha == pytest.approx(0.5)
    assert final.sm_logit is None  # output_alpha 0: no late Sm on the output
    assert final.context_alpha == (0.8 if context else None) == sel["edge_refit_context_alpha"]
    assert final.scorer[0].in_features == 512 * (2 if context else 1)
    rows = labelers["pseudo_label"].predict_dataset(exp.data.build(exp.seed).test)
    y = np.concatenate([r["instance_labels"] for r in rows])
    s = np.concatenate([r["scores"] for r in rows])
    assert abs(auroc(y, s) - m["pseudo_label"]["test"]["instance_auroc"]) < 1e-6


@pytest.mark.parametrize("method, match", [({"edge_refit_alpha": 1.0}, "method.edge_refit_alpha"),
                                           ({"edge_refit_context": True}, "edge_refit_context needs method.edge_refit_alpha"),
                                           ({"edge_refit_erode": True}, "edge_refit_erode needs method.edge_refit_alpha")])
def test_edge_refit_is_off_by_default_and_bad_values_are_one_line_errors_naming_the_key(method, match):
    from milkit.config import ConfigError
    from milkit.methods.pseudo_label import PseudoLabelConfig

    assert PseudoLabelConfig().edge_refit_alpha is None and PseudoLabelConfig().edge_refit_context is False
    with pytest.raises(ConfigError, match=match) as err:
        build_experiment({"seed": 0, "data": SMALL, "method": {"name": "pseudo_label", **method}, "trainer": TRAINER})
    assert "\n" not in str(err.value)


def test_context_features_are_the_features_then_the_same_patches_smoothed_at_the_context_alpha():
    from milkit.data.graph import chain_adjacency
    from milkit.methods.pseudo_label import SmoothedInstanceMIL

    torch.manual_seed(0)
    x, mask, adj = torch.randn(1, 6, 3), torch.ones(1, 6, dtype=torch.bool), [chain_adjacency(6)]
    both = SmoothedInstanceMIL(3, feature_alpha=0.5, context_alpha=0.8)
    local, ctx = SmoothedInstanceMIL(3, feature_alpha=0.5), SmoothedInstanceMIL(3, feature_alpha=0.8)
    h = both.features(x, mask, adj)
    assert h.shape == (1, 6, 6)
    assert torch.allclose(h[..., :3], local.features(x, mask, adj)) and torch.allclose(h[..., 3:], ctx.features(x, mask, adj))
    assert not torch.allclose(h[..., :3], h[..., 3:])
    assert both(x, mask, adj).instance_scores.shape == (1, 6)


def test_edge_rows_are_listed_together_and_build_the_options_they_name():
    from milkit.methods.pseudo_label import PseudoLabelMethod, ScaleMeanMIL

    i = ROWS.index(EDGE_ROWS[0])
    assert ROWS[i:i + len(EDGE_ROWS)] == EDGE_ROWS  # one block, in the order run
    for row, alpha in ((EDGE_ROWS[0], 0.5), (EDGE_ROWS[2], 0.65)):
        method, stage = method_section(row, SETTINGS)
        assert method == {"name": "pseudo_label", "edge_refit_alpha": alpha} and stage == "pseudo_label"
    assert method_section(EDGE_ROWS[3], SETTINGS)[0] == {"name": "pseudo_label", "edge_refit_alpha": 0.5,
                                                         "edge_refit_context": True}
    assert method_section(EDGE_ROWS[4], SETTINGS)[0] == {"name": "pseudo_label", "edge_refit_alpha": 0.5,
                                                         "edge_refit_erode": True}
    method, _ = method_section(EDGE_ROWS[1], SETTINGS)
    exp = build_experiment({"seed": 0, "data": SMALL, "method": {**method, "in_dim": 4}, "trainer": TRAINER})
    mil = PseudoLabelMethod(exp).stage_mil_model()
    assert isinstance(mil, ScaleMeanMIL) and [m.sm_feat.alpha for m in mil.members] == pytest.approx([0.8, 0.65, 0.5])


#: validation patches y = [0, 0, 1, 1]: WEAK has F1 0.8 / AUROC 0.75, SHARP F1 1 / AUROC 1 (as in
#: tests/trust/test_hard_bags_adoption.py)
WEAK, SHARP = [0.1, 0.6, 0.5, 0.9], [0.1, 0.2, 0.5, 0.9]
BASE, CAND = "pseudo_label (this recipe)", EDGE_ROWS[0]


def _keep(out, level, row, seed, val_prob):
    p = _scores_path(out, level, row, seed)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, val_prob=np.array(val_prob), val_y=np.array([0, 0, 1, 1]), val_bag_prob=np.array([0.2, 0.8]),
             val_bag_y=np.array([0, 1]))


def test_edge_rule_also_needs_hard_mimic_and_hard_confounded_patch_auroc(tmp_path):
    assert EDGE_ADOPTION_RULE[:len(ADOPTION_RULE)] == ADOPTION_RULE
    assert HARD_LEVELS_AUROC_RULE == (("patch_auroc", ("hard-mimic", "hard-confounded"), -0.005),)
    for seed in (0, 1):
        for level in ("easy", "medium", "hard", "hard-mimic", "hard-confounded"):
            _keep(tmp_path, level, BASE, seed, WEAK)
            _keep(tmp_path, level, CAND, seed, SHARP)
    a = adoption(tmp_path, CAND, seeds=(0, 1), rule=EDGE_ADOPTION_RULE)
    assert a["adopt"] and len(a["clauses"]) == 2 + 3 + 3 + 2
    # sharper everywhere except hard-mimic, where one seed's patch AUROC drops 1.0 → 0.75 against the
    # baseline (mean −0.125): the old rule adopts, the edge rule does not, and only that clause fails
    for seed in (0, 1):
        _keep(tmp_path, "hard-mimic", BASE, seed, SHARP)
    _keep(tmp_path, "hard-mimic", CAND, 1, WEAK)
    assert adoption(tmp_path, CAND, seeds=(0, 1), rule=ADOPTION_RULE)["adopt"]
    a = adoption(tmp_path, CAND, seeds=(0, 1), rule=EDGE_ADOPTION_RULE)
    assert not a["adopt"]
    bad = [k for k in a["clauses"] if not k["ok"]]
    assert [(k["metric"], k["level"]) for k in bad] == [("patch_auroc", "hard-mimic")]
    assert bad[0]["diff"] == pytest.approx(-0.125)
    # a hard-confounded seed missing is an error naming it, not a silent pass
    _scores_path(tmp_path, "hard-confounded", CAND, 1).unlink()
    with pytest.raises(FileNotFoundError, match="hard-confounded / pseudo_label \\+ edge refit"):
        adoption(tmp_path, CAND, seeds=(0, 1), rule=EDGE_ADOPTION_RULE)


def test_erode_positives_by_hand_on_a_chain():
    from milkit.data.graph import chain_adjacency
    from milkit.methods.pseudo_label import erode_positives

    g = chain_adjacency(7)  # 0 - 1 - 2 - 3 - 4 - 5 - 6
    t = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0])
    # 1 touches 0 (negative), 4 touches 5 (unlabelled), 6 touches 5: the border; 2 and 3 are the interior
    assert erode_positives(t, g).tolist() == [0.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0]
    lone = torch.tensor([0.0, 0.0, 1.0, -1.0, 1.0, 0.0, 0.0])  # all border: the first positive is kept
    assert erode_positives(lone, g).tolist() == [0.0, 0.0, 1.0, -1.0, -1.0, 0.0, 0.0]
    assert erode_positives(lone, None).tolist() == lone.tolist()  # no graph: unchanged
    neg = torch.zeros(7)
    assert erode_positives(neg, g).tolist() == neg.tolist()


def test_the_refit_trains_on_eroded_labels_when_asked(tmp_path, monkeypatch):
    import milkit.methods.pseudo_label as pl
    from milkit.data.bag import Bag, BagDataset
    from milkit.data.base import DataSplits
    from milkit.data.graph import chain_adjacency
    from milkit.run_dir import RunDir

    seen = {}

    def fake_fit(module, loader, val, stage_dir, cfg, seed, **kw):
        seen["t"] = loader.dataset.tensors[1]
        stage_dir.mkdir(parents=True, exist_ok=True)
        return stage_dir / "model.pt"

    monkeypatch.setattr(pl, "fit_stage", fake_fit)
    monkeypatch.setattr(pl, "instance_max_auroc", lambda scores, labels: 1.0)
    torch.manual_seed(0)
    neg, pos = Bag(torch.randn(3, 4), 0, "n"), Bag(torch.randn(5, 4), 1, "p", adj=chain_adjacency(5))
    ds = BagDataset([neg, pos])
    # negatives {0, 1, 2}, 0.6-quantile 1.2: positives 5.0, 4.0, 3.0 (nodes 1–3) of the chain 0–4; eroded: node 2 only
    kept = FixedScores({3: [0.0, 1.0, 2.0], 5: [0.5, 5.0, 4.0, 3.0, -1.0]})
    x_all = torch.cat([neg.instances, pos.instances])
    rec, _ = _method(edge_refit_alpha=0.5, edge_refit_erode=True).edge_refit(
        kept, {"candidate": "mil", "val_instance_max_auroc": 1.0}, DataSplits(ds, ds, ds), RunDir(tmp_path / "r"), x_all)
    assert seen["t"].tolist() == [0.0, 0.0, 0.0, 1.0]  # 3 negatives, node 2; nodes 0, 1, 3, 4 unlabelled
    assert (rec["n_positive"], rec["n_unlabelled"], rec["eroded"]) == (1, 4, True)
