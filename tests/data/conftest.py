"""Fixtures shared by the hard_bags level tests."""

import pytest


@pytest.fixture
def level_on_the_cli(monkeypatch, tmp_path):
    """``run(level)`` → (the levels `milkit benchmark hard-bags --levels LEVEL` hands to the benchmark, with its
    run replaced by a stub, and the built data config of that level's SmAP experiment)."""
    import milkit.benchmarks.hard_bags as hb
    from milkit.cli import main
    from milkit.config import build_experiment

    seen = {}

    def fake_run(out, levels, rows, seeds, s, resume=True, progress=print):
        seen.update(levels=levels)
        return {"settings": s, "levels": [], "cells": {}, "probe": {}, "wall_s": 0.0}

    monkeypatch.setattr(hb, "run", fake_run)

    def run(level: str):
        assert main(["benchmark", "hard-bags", "--out", str(tmp_path), "--levels", level, "--rows", "SmAP"]) == 0
        raw, _ = hb.experiment("SmAP", level, 0, {"generator_seed": 0, "feature_dim": 512, "embed_dim": 8,
                                                   "lr": 1e-3, "epochs": 1})
        return seen["levels"], build_experiment(raw).data

    return run
