"""Every configs/sm/*.yaml validates (keys exist, values in range) and names an Sm-paper model."""

from pathlib import Path

import pytest

from milkit.config import load_experiment

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "sm").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates(path):
    exp = load_experiment(path)
    model = exp.method.model
    assert model.name in {"smap", "smtap"}
    assert model.alpha == 0.5 and model.sm_steps == 10
    assert exp.trainer.warmup_epochs == 5 and exp.trainer.monitor == "val/auroc_minus_bce"
