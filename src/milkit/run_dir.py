"""The self-describing run directory (DESIGN.md "Contracts").

::

    RUN_DIR/
      config.yaml                 resolved experiment (everything needed to rebuild models)
      stages/<stage>/model.pt     best weights of each stage (state dict, weights_only)
      stages/<stage>/checkpoints/ Lightning best checkpoint (last.ckpt, full state, while the stage runs)
      stages/<stage>/rng_state.pt RNG state at the end of the stage (a resumed run continues from it)
      stages/<stage>/logs/        CSV log (metrics.csv)
      stages/<stage>/threshold.json   instance threshold chosen on validation
      stages/<stage>/seed-<k>/    replica k of a seed ensemble (trainer.seeds > 1; milkit.trust)
      metrics.json                written by train and by ``milkit evaluate``
      labels/                     default output of ``milkit label``

A run is *finished* when ``metrics.json`` exists, *unfinished* when only ``config.yaml`` does
(``milkit train --resume`` continues it; ``--overwrite`` replaces either).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from milkit import io
from milkit.config import Experiment, build_experiment


def stage_metrics(metrics: dict) -> dict[str, dict]:
    """The stages of a metrics.json: not ``_run`` and not ``annotations`` (what ``evaluate
    --annotations`` adds), only entries that hold a ``val`` or ``test`` split."""
    return {s: m for s, m in metrics.items() if not s.startswith("_") and isinstance(m, dict)
            and any(isinstance(m.get(sp), dict) for sp in ("val", "test"))}


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

    def state(self) -> Literal["absent", "file", "empty", "foreign", "unfinished", "finished"]:
        """What ``path`` holds: nothing, a file, an empty folder, a folder that is not a milkit
        run, an unfinished run (config.yaml, no metrics.json) or a finished one."""
        if not self.path.exists():
            return "absent"
        if not self.path.is_dir():
            return "file"
        if self.config_path.is_file():
            return "finished" if self.metrics_path.is_file() else "unfinished"
        return "foreign" if any(self.path.iterdir()) else "empty"

    def clear(self) -> None:
        """Remove a milkit run's contents (``--overwrite``); refuses anything that is not a run."""
        if not self.config_path.is_file():
            raise FileExistsError(f"{self.path}: not a milkit run (no config.yaml); not removed")
        for p in self.path.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def write_config(self, exp: Experiment) -> None:
        io.write_text(self.config_path, yaml.safe_dump(exp.to_dict(), sort_keys=False))

    def read_raw_config(self) -> dict:
        """config.yaml as a dict; a missing or unparsable one is an error naming the file."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: run directory does not exist")
        if not self.config_path.is_file():
            folds = sorted(p.name for p in self.path.glob("fold-*") if (p / "config.yaml").is_file())
            if folds:  # milkit train --folds K: one run per fold
                raise FileNotFoundError(f"{self.path}: a cross-validation folder ({len(folds)} fold runs), not one run; "
                                        f"give one fold's run, e.g. {self.path / folds[0]}")
            raise FileNotFoundError(f"{self.path}: not a milkit run directory (no config.yaml)")
        try:
            raw = yaml.safe_load(self.config_path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.config_path}: not valid YAML ({_first_line(err)})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{self.config_path}: a run's config.yaml must be a mapping")
        return raw

    def read_config(self) -> Experiment:
        return build_experiment(self.read_raw_config(), source=str(self.config_path))

    def write_threshold(self, stage: str, info: dict) -> None:
        io.write_json(self.stage_dir(stage) / "threshold.json", info)

    def read_threshold(self, stage: str) -> dict:
        return _read_json(self.stage_dir(stage) / "threshold.json")

    def read_metrics(self) -> dict:
        return _read_json(self.metrics_path)

    def update_metrics(self, key: str, value: dict) -> dict:
        m = self.read_metrics()
        m[key] = value
        io.write_json(self.metrics_path, m)
        return m


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _read_json(path: Path) -> dict:
    """A JSON object from ``path`` ({} when absent); a corrupt one is an error naming the file."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({_first_line(err)}); delete it or rerun the command that wrote it") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
