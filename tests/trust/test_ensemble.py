"""Seed ensembles (milkit.trust.ensemble): identical seeds = one seed; the spread is the sd over
replicas; ``milkit train --seeds 2`` keeps each replica under stages/<stage>/seed-<k>/, labels
with the ensemble, records every seed and prints the verdict last."""

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from milkit.cli import main
from milkit.data.bag import Bag, BagDataset, collate_bags
from milkit.io import load_state_dict
from milkit.methods.base import Labeler
from milkit.models.factory import build_mil_model, model_config
from milkit.nn.encoders import EncoderConfig
from milkit.trust.calibration import Calibrator
from milkit.trust.ensemble import EnsembleLabeler
from milkit.workflow import label_run, load_labelers

TINY = {
    "seed": 0,
    "data": {"kind": "spatial_bags", "n_train": 24, "n_val": 16, "n_test": 12, "min_side": 5, "max_side": 6,
             "feature_dim": 8, "signal": 3.0},
    "method": {"name": "mil", "encoder": {"name": "linear", "in_dim": 8, "out_dim": 8}},
    "trainer": {"max_epochs": 2, "lr": 0.005, "progress_bar": False, "accelerator": "cpu", "devices": 1},
}


def _labeler(seed: int, slope: float = 1.0) -> Labeler:
    torch.manual_seed(seed)
    model = build_mil_model(model_config({"name": "abmil"}), EncoderConfig(name="linear", in_dim=4, out_dim=8))
    return Labeler(model, "model", calibrator=Calibrator(slope, -0.2, 0.1, 2.0, source="test"))


def _batch():
    g = torch.Generator().manual_seed(0)
    return collate_bags([Bag(torch.randn(7, 4, generator=g), 1, "a"), Bag(torch.randn(4, 4, generator=g), 0, "b")])


def test_an_ensemble_of_identical_seeds_equals_one_seed():
    one = _labeler(0)
    ens = EnsembleLabeler([one, _labeler(0), _labeler(0)])
    b = _batch()
    o1, oe = one.outputs(b), ens.outputs(b)
    torch.testing.assert_close(oe.probability, o1.probability, atol=1e-6, rtol=0)
    torch.testing.assert_close(oe.bag_prob, o1.bag_prob, atol=1e-6, rtol=0)
    torch.testing.assert_close(oe.raw, o1.raw, atol=1e-6, rtol=0)
    assert o1.uncertainty is None  # one model: no spread, not a made-up one
    assert float(oe.uncertainty.abs().max()) < 1e-6
    ds = BagDataset([Bag(torch.randn(5, 4), 1, "c", instance_labels=torch.tensor([1, 0, 0, 0, 0]))])
    r1, re = one.predict_dataset(ds)[0], ens.predict_dataset(ds)[0]
    np.testing.assert_allclose(re["probability"], r1["probability"], atol=1e-6)


def test_ensemble_is_the_mean_and_spread_is_the_sd_of_calibrated_probabilities():
    a, c = _labeler(0), _labeler(1, slope=0.5)
    b = _batch()
    pa, pc = a.outputs(b).probability, c.outputs(b).probability
    oe = EnsembleLabeler([a, c]).outputs(b)
    torch.testing.assert_close(oe.probability, (pa + pc) / 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(oe.uncertainty, (pa - pc).abs() / 2 * b.mask, atol=1e-6, rtol=0)
    assert float(oe.uncertainty[1, 4:].abs().max()) == 0  # padding


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--out", str(root / "k1")]) == 0
    return root, cfg


def test_cli_seeds_two_replicas_ensemble_and_verdict_last(runs, capsys):
    root, cfg = runs
    capsys.readouterr()
    assert main(["train", str(cfg), "--out", str(root / "k2"), "--seeds", "2"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("verdict mil: ") and "rule" not in printed[-1].split(":")[0]
    k2 = root / "k2"
    for k in (0, 1):
        assert (k2 / "stages" / "mil" / f"seed-{k}" / "model.pt").is_file()
        assert json.loads((k2 / "stages" / "mil" / f"seed-{k}" / "calibration.json").read_text())["slope"] >= 0
    # replica 0 is the one-seed run, weight for weight (different seeds differ)
    w1 = load_state_dict(root / "k1" / "stages" / "mil" / "model.pt")
    w20, w21 = (load_state_dict(k2 / "stages" / "mil" / f"seed-{k}" / "model.pt") for k in (0, 1))
    assert all(torch.equal(w1[n], w20[n]) for n in w1)
    assert not all(torch.equal(w20[n], w21[n]) for n in w20)
    m = json.loads((k2 / "metrics.json").read_text())["mil"]
    assert [s["seed"] for s in m["seeds"]] == [0, 1] and len(m["calibration"]) == 2
    assert m["threshold"]["criterion"] == "f1" and m["threshold"]["applies_to"] == "probability"
    assert m["trust"]["verdict"] in ("trustworthy", "uncertain", "do not use") and m["trust"]["n_seeds"] == 2
    assert m["trust"]["seed_agreement"]["rho"] is not None
    sp = m["seed_spread"]["test"]["instance_auroc"]
    assert sp["min"] <= sp["median"] <= sp["max"] and sp["ensemble"] == m["test"]["instance_auroc"]
    page = (k2 / "report.html").read_text()
    assert "verdict:" in page and "seeds (2 replicas" in page and "mean ± sd over seeds" in page
    # ensemble or replica, decided on validation and recorded (trust.ensemble.choose_labels)
    choice = m["ensemble"]
    assert choice["used"] in ("ensemble", "seed-0", "seed-1") and choice["basis"] == "validation patch labels"
    assert (choice["used"] == "ensemble") == (choice["below_median_on"] == [])
    picked = choice["val"]["ensemble"] if choice["used"] == "ensemble" else \
        choice["val"]["replicas"][int(choice["used"][5:])]
    if choice["used"] == "ensemble":  # trainer.ensemble_threshold median_of_seeds (the default)
        assert m["threshold"]["ensemble_threshold"] == "median_of_seeds"
        assert m["threshold"]["threshold"] == pytest.approx(float(np.median([s["threshold"]["threshold"]
                                                                             for s in m["seeds"]])))
        assert m["threshold"]["seed_thresholds"] == pytest.approx([s["threshold"]["threshold"] for s in m["seeds"]])
    else:
        assert m["threshold"]["threshold"] == pytest.approx(picked["threshold"])
    assert [r["threshold"] for r in choice["val"]["replicas"]] == pytest.approx(
        [s["threshold"]["threshold"] for s in m["seeds"]])
    _, labelers, _ = load_labelers(k2)
    assert isinstance(labelers["mil"], EnsembleLabeler) and len(labelers["mil"].members) == 2
    assert labelers["mil"].used == choice["used"]
    path, _ = label_run(k2, root / "lab2", None, "test", None)
    rows = list(csv.DictReader(path.open()))
    assert {"score", "probability", "uncertainty", "label", "criterion"} <= set(rows[0])
    thr = m["threshold"]["threshold"]
    assert all(r["uncertainty"] != "" and float(r["uncertainty"]) >= 0 for r in rows)
    assert all(int(r["label"]) == int(float(r["probability"]) >= thr) for r in rows
               if abs(float(r["probability"]) - thr) > 1e-5)
    assert all(r["criterion"] == "f1" for r in rows)


def test_one_seed_says_uncertainty_is_unavailable(runs):
    root, _ = runs
    m = json.loads((root / "k1" / "metrics.json").read_text())["mil"]
    assert "seeds" not in m and m["trust"]["seed_agreement"]["rho"] is None
    src = json.loads((root / "k1" / "stages" / "mil" / "calibration.json").read_text())["source"]
    assert src.startswith("validation patch labels")  # spatial bags carry instance labels
    path, _ = label_run(root / "k1", root / "lab1", None, "test", None)
    rows = list(csv.DictReader(path.open()))
    assert rows and all(r["uncertainty"] == "" for r in rows) and all(r["probability"] != "" for r in rows)


def test_pixel_map_methods_refuse_seed_ensembles(tmp_path, capsys):
    cfg = {"seed": 0, "data": {"kind": "seg_synthetic", "n_train": 4, "n_val": 2, "n_test": 2},
           "method": {"name": "ikd"}, "trainer": {"max_epochs": 1, "progress_bar": False, "seeds": 2}}
    p = tmp_path / "seg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(p), "--out", str(tmp_path / "r")]) == 2
    assert "trainer.seeds" in capsys.readouterr().err and not (tmp_path / "r").exists()
