"""Experiment configuration: YAML in, validated pydantic objects out, clear errors.

An experiment YAML has four sections::

    seed: 0
    data:    {kind: digit_bags, ...}        # validated by the dataset's config class
    method:  {name: distill_to_label, ...}  # validated by the method's config class
    trainer: {max_epochs: ..., ...}         # TrainerConfig, shared by every stage

Every key that does not exist is an error naming the key (``extra="forbid"``).
``--set a.b.c=value`` overrides are applied before validation; values are parsed as YAML.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from milkit import registry


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class TrainerConfig(StrictModel):
    """Optimisation and loop settings shared by every training stage (engine.py)."""

    max_epochs: int = Field(20, ge=1)
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = False
    batch_size: int = Field(1, ge=1)
    accumulate_grad_batches: int = Field(1, ge=1)
    warmup_epochs: int = Field(0, ge=0, description="LinearLR warm-up from 0.1x (Sm paper); 0 = off")
    lr_step_every: int = Field(0, ge=0, description="StepLR: lr × lr_gamma every this many epochs; 0 = off")
    lr_milestones: list[int] = Field(default_factory=list, description="MultiStepLR: lr × lr_gamma at each epoch listed")
    lr_gamma: float = Field(0.1, gt=0, le=1, description="decay factor of lr_step_every / lr_milestones")
    min_lr: float = Field(0.0, ge=0, description="the decays never take lr below this")
    gradient_clip_val: float | None = None
    monitor: str = "val/bag_auroc"
    monitor_mode: Literal["max", "min"] = "max"
    early_stopping_patience: int | None = None
    accelerator: str = "auto"
    devices: str | int = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_workers: int = 0
    progress_bar: bool = True
    deterministic: bool = True
    log_every_n_steps: int = 10
    seeds: int = Field(1, ge=1, description="seed replicas per stage, labels from their ensemble (issue 11 §3)")
    threshold_criterion: Literal["f1", "youden_product", "youden"] = Field(
        "f1", description="how the instance threshold is chosen on validation (issue 11 §4: F1)")


class Experiment(BaseModel):
    """A validated experiment: ``data`` and ``method`` hold the registry's typed configs."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    seed: int = 0
    data: Any
    method: Any
    trainer: TrainerConfig = TrainerConfig()

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "data": self.data.model_dump(mode="json"),
            "method": self.method.model_dump(mode="json"),
            "trainer": self.trainer.model_dump(mode="json"),
        }


def _format_validation(err: ValidationError, prefix: str, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        if e["type"] == "extra_forbidden":
            lines.append(f"config key '{loc}' does not exist")
        else:
            lines.append(f"config key '{loc}': {e['msg']}")
    return f"{source}: " + "; ".join(lines)


def apply_overrides(raw: dict, overrides: list[str] | None, source: str = "--set") -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict."""
    out = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"{source}: cannot set {key!r}: '{p}' is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def validate_section(cls: type[BaseModel], raw: Any, prefix: str, source: str) -> BaseModel:
    """Validate one config section, turning pydantic errors into a ConfigError naming the key."""
    try:
        return cls.model_validate(raw if raw is not None else {})
    except ValidationError as err:
        raise ConfigError(_format_validation(err, prefix, source)) from None


def build_experiment(raw: dict, source: str = "<config>") -> Experiment:
    """Validate a raw experiment dict (sections resolved through the registry)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: an experiment config must be a mapping")
    unknown = set(raw) - {"seed", "data", "method", "trainer"}
    if unknown:
        raise ConfigError(f"{source}: config key '{sorted(unknown)[0]}' does not exist")
    data = raw.get("data") or {}
    method = raw.get("method") or {}
    if "kind" not in data:
        raise ConfigError(f"{source}: config key 'data.kind' is required")
    if "name" not in method:
        raise ConfigError(f"{source}: config key 'method.name' is required")
    try:
        data_cls = registry.lookup(registry.DATASETS, "dataset", data["kind"])
        method_cls = registry.lookup(registry.METHODS, "method", method["name"])
    except (ValueError, ImportError) as err:
        raise ConfigError(f"{source}: {err}") from None
    data_cfg = validate_section(data_cls, data, "data", source)
    method_cfg = validate_section(method_cls.Config, method, "method", source)
    trainer = validate_section(TrainerConfig, raw.get("trainer"), "trainer", source)
    seed = raw.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"{source}: config key 'seed' must be an integer")
    return Experiment(seed=seed, data=data_cfg, method=method_cfg, trainer=trainer)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment config must be a mapping")
    return raw


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read a YAML experiment, apply ``--set`` overrides, validate."""
    raw = apply_overrides(load_yaml(path), overrides, source=str(path))
    return build_experiment(raw, source=str(path))
