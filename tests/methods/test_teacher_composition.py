"""Issue 16: every registered MIL model serves as WENO's teacher and as Distill-to-Label's
teacher on graph-carrying bags, with instances dropped (HPM, sub-bags) or appended (noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from milkit.config import build_experiment
from milkit.data.bag import collate_bags
from milkit.run_dir import RunDir
from milkit.workflow import make_method

DATA = {"kind": "spatial_bags", "n_train": 4, "n_val": 2, "n_test": 2, "min_side": 3, "max_side": 4,
        "feature_dim": 6, "missing_rate": 0.2, "signal": 2.0}
ENCODER = {"name": "identity", "in_dim": 6}
TRAINER = {"max_epochs": 1, "batch_size": 2, "optimizer": "adam", "lr": 1e-3, "progress_bar": False,
           "monitor": "val/bag_auroc"}
SM = {"embed_dim": 8, "attention_hidden": 4, "sm_steps": 2}

#: every registered MIL model that can be an attention teacher, small sizes
TEACHERS = {
    "abmil": {"name": "abmil", "embed_dim": 8, "attention_hidden": 4},
    "abmil_gated": {"name": "abmil", "gated": True, "embed_dim": 8, "attention_hidden": 4},
    "clam_sb": {"name": "clam_sb", "embed_dim": 8, "attention_hidden": 4, "k_sample": 2},
    "clam_mb": {"name": "clam_mb", "embed_dim": 8, "attention_hidden": 4, "k_sample": 2},
    "dsmil": {"name": "dsmil", "query_dim": 4},
    "transmil": {"name": "transmil", "embed_dim": 16, "heads": 2, "landmarks": 4},
    "dtfd": {"name": "dtfd", "embed_dim": 8, "attention_hidden": 4},
    "smap_early": {"name": "smap", "sm_where": "early", **SM},
    "smap_mid": {"name": "smap", "sm_where": "mid", **SM},
    "smap_late": {"name": "smap", "sm_where": "late", **SM},
    "smtap": {"name": "smtap", "layers": 1, "heads": 2, **SM},
}


def _model_fields(cfg: dict) -> dict:
    """Drop keys a model's Config does not have (sizes differ in name between models)."""
    from milkit import registry

    cls = registry.lookup(registry.MODELS, "model", cfg["name"])
    return {k: v for k, v in cfg.items() if k == "name" or k in cls.Config.model_fields}


def _label_everything(labelers, ds) -> None:
    for name, lab in labelers.items():
        rows = lab.predict_dataset(ds)
        assert len(rows) == len(ds), name
        for r, bag in zip(rows, ds):
            assert r["scores"].shape == (len(bag),) and np.all(np.isfinite(r["scores"])), name
            assert 0.0 <= r["bag_prob"] <= 1.0, name


@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_weno_with_every_teacher_and_hpm_from_epoch_0(teacher: str, tmp_path) -> None:
    exp = build_experiment({
        "seed": 0, "data": DATA, "trainer": TRAINER,
        "method": {"name": "weno", "encoder": ENCODER, "teacher": _model_fields(TEACHERS[teacher]),
                   "hpm_warmup_epochs": 0, "hpm_threshold": 0.5, "student_batch_size": 16},
    })
    splits = exp.data.build(exp.seed)
    assert all(b.adj is not None for b in splits.train)
    method = make_method(exp)
    # HPM really drops instances in the first step: a student that is sure everything is positive
    from milkit.methods.weno import WENOModule, build_net

    net = build_net(method.cfg)
    with torch.no_grad():
        net.student_head.bias.fill_(5.0)
    mod = WENOModule(net, method.cfg, exp.trainer, splits.train)
    pos = [b for b in splits.train if b.label == 1][:2]
    batch = collate_bags(pos)
    loss, _, _, keep = mod.teacher_loss(batch)
    assert int(keep.sum()) < int(batch.mask.sum()) and torch.isfinite(loss)
    # one epoch of the whole recipe, then label
    labelers = method.fit(splits, RunDir(tmp_path / teacher))
    assert set(labelers) == {"student", "teacher"}
    _label_everything(labelers, splits.test)


@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_distill_to_label_teacher_with_noise_and_subbags(teacher: str, tmp_path) -> None:
    exp = build_experiment({
        "seed": 0, "data": DATA, "trainer": TRAINER,
        "method": {"name": "distill_to_label", "encoder": ENCODER, "model": _model_fields(TEACHERS[teacher]),
                   "baseline": False, "train_student": teacher in ("abmil", "smap_early"),
                   "teacher": {"use_noise": True, "use_entropy": True, "use_perturbation": True,
                               "noise_fraction": 0.3, "subbag_fraction": 0.5}},
    })
    splits = exp.data.build(exp.seed)
    method = make_method(exp)
    labelers = method.fit(splits, RunDir(tmp_path / teacher))
    assert "teacher" in labelers
    _label_everything(labelers, splits.test)


@pytest.mark.parametrize("model", ["meanpool", "maxpool"])
def test_weno_refuses_a_teacher_without_attention_at_config_time(model: str) -> None:
    with pytest.raises((ValidationError, ValueError), match=f"'{model}' has no attention"):
        build_experiment({"seed": 0, "data": DATA, "trainer": TRAINER,
                          "method": {"name": "weno", "encoder": ENCODER, "teacher": {"name": model}}})
