"""Every YAML shipped in configs/ validates (paper defaults stay loadable)."""

from pathlib import Path

import pytest

from milkit.config import load_experiment

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert any("distill_to_label" in str(p) for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_validates(path):
    exp = load_experiment(path)
    assert exp.method.name and exp.data.kind
