"""The self-describing run directory (DESIGN.md "Contracts").

::

    RUN_DIR/
      config.yaml                 resolved experiment (everything needed to rebuild models)
      stages/<stage>/model.pt     best weights of each stage (state dict, weights_only)
      stages/<stage>/checkpoints/ Lightning best checkpoint
      stages/<stage>/logs/        CSV log (metrics.csv)
      stages/<stage>/threshold.json   instance threshold chosen on validation
      stages/<stage>/seed-<k>/    replica k of a seed ensemble (trainer.seeds > 1; milkit.trust)
      metrics.json                written by train and by ``milkit evaluate``
      labels/                     default output of ``milkit label``
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from milkit import io
from milkit.config import Experiment, build_experiment


@dataclass
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    def stage_dir(self, stage: str) -> Path:
        return self.path / "stages" / stage

    def seed_stage_dir(self, stage: str, k: int) -> Path:
        """Where replica ``k`` of a seed ensemble keeps ``stage`` (milkit.trust.ensemble)."""
        return self.stage_dir(stage) / f"seed-{k}"

    def model_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "model.pt"

    def write_config(self, exp: Experiment) -> None:
        io.write_text(self.config_path, yaml.safe_dump(exp.to_dict(), sort_keys=False))

    def read_config(self) -> Experiment:
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path}: not a milkit run directory (no config.yaml)")
        raw = yaml.safe_load(self.config_path.read_text())
        return build_experiment(raw, source=str(self.config_path))

    def write_threshold(self, stage: str, info: dict) -> None:
        io.write_json(self.stage_dir(stage) / "threshold.json", info)

    def read_threshold(self, stage: str) -> dict:
        p = self.stage_dir(stage) / "threshold.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def read_metrics(self) -> dict:
        return json.loads(self.metrics_path.read_text()) if self.metrics_path.is_file() else {}

    def update_metrics(self, key: str, value: dict) -> dict:
        m = self.read_metrics()
        m[key] = value
        io.write_json(self.metrics_path, m)
        return m
