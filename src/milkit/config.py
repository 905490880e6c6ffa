"""Experiment configuration: YAML in, validated pydantic objects out, clear errors.

An experiment YAML has four sections::

    seed: 0
    data:    {kind: digit_bags, ...}        # validated by the dataset's config class
    method:  {name: distill_to_label, ...}  # validated by the method's config class
    trainer: {max_epochs: ..., ...}         # TrainerConfig, shared by every stage

Every key that does not exist is an error naming the key (``extra="forbid"``), with the
closest existing key when one is close ("did you mean"). ``--set a.b.c=value`` overrides are
applied before validation; values are parsed as YAML, and ``--set a.b.c=null`` removes the key
(its default then applies), e.g. ``gated`` after switching ``method.model.name`` to ``maxpool``.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from milkit import registry


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


#: ``trainer.accelerator`` values milkit runs on (milkit.distributed.accelerator_for); ``mps`` is refused below
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


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
    accelerator: str = Field("auto", description="auto (a CUDA GPU when one is visible, else the CPU), cpu, or "
                             "gpu/cuda; milkit.distributed.accelerator_for")
    devices: str | int = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | int = Field("32-true", description="Lightning's precision: 32-true, 16-mixed or bf16-mixed")
    num_workers: int = 0
    progress_bar: bool = True
    deterministic: bool = True
    log_every_n_steps: int = 10
    seeds: int = Field(1, ge=1, description="seed replicas per stage, labels from their ensemble (issue 11 §3)")
    threshold_criterion: Literal["f1", "youden_product", "youden"] = Field(
        "f1", description="how the instance threshold is chosen on validation (issue 11 §4: F1)")
    label_free_threshold: Literal["top_patch", "sure_positives"] = Field(
        "top_patch", description="the instance threshold when validation has no patch labels: 0.5 on the probability "
        "calibrated from slide labels (top_patch), or 0.5 of a Platt map whose positives are every positive-slide "
        "patch above the highest negative-slide patch (sure_positives: more recall where lesions are large, fooled "
        "by look-alikes more common in positive slides); not from a paper, docs/benchmarks.md")
    ensemble_threshold: Literal["median_of_seeds", "ensemble"] = Field(
        "median_of_seeds", description="the seed ensemble's instance threshold (trainer.seeds > 1): the median of "
        "the seeds' own validation thresholds, or the one chosen on the ensemble's validation probabilities "
        "(issue 11 §3; milkit.trust.ensemble, docs/benchmarks.md)")
    parallel_seeds: int | Literal["auto"] = Field(
        1, description="worker processes training the trainer.seeds replicas at once (issue 15; 1 = one after "
                       "the other in this process, 'auto' = one per GPU or CPU core); milkit.trust.parallel_seeds")

    @field_validator("parallel_seeds")
    @classmethod
    def _parallel_seeds(cls, v: int | str) -> int | str:
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{v!r} is not a process count: use a whole number ≥ 1 or 'auto'")
        return v

    @field_validator("accelerator")
    @classmethod
    def _accelerator(cls, v: str) -> str:
        if v == "mps":
            raise ValueError("'mps' is not supported: Apple's MPS backend has no float64 and no embedding_bag "
                             "(pytorch/pytorch#162270), which milkit's calibration, VAT-MIL and patch-graph smoothing "
                             "use; use cpu ('auto' does on a Mac)")
        if v not in ACCELERATORS:
            raise ValueError(f"{v!r} is not supported; use one of {', '.join(ACCELERATORS)}")
        return v

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: str | int) -> str:
        v = str(v)
        if v in ("64", "64-true", "16-true", "bf16-true") or v.startswith("transformer-engine"):
            raise ValueError(f"{v!r} is not supported: it casts the model but not the float32 features it reads; "
                             "use 32-true, 16-mixed or bf16-mixed")
        if v not in ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16"):  # Lightning's aliases: 16, bf16 mixed
            raise ValueError(f"{v!r} is not a precision; use 32-true, 16-mixed or bf16-mixed")
        return v

    # -- several processes (milkit.distributed, docs/scale.md) ---------------------------
    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from milkit.distributed import SUPPORTED_STRATEGIES

        if v not in SUPPORTED_STRATEGIES:
            why = (" (it starts the ranks from inside this process; milkit needs every rank to be a copy of the "
                   "command, as 'ddp', torchrun and srun start them)"
                   if v.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")) else "")
            raise ValueError(f"{v!r} is not supported{why}; use one of {', '.join(SUPPORTED_STRATEGIES)}")
        return v

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: str | int) -> str | int:
        if isinstance(v, int):
            ok = v == -1 or v >= 1
        else:
            t = v.strip()
            ok = t in ("auto", "-1") or (t.isdigit() and int(t) >= 1) or (
                "," in t and all(p.strip().isdigit() for p in t.split(",") if p.strip()))
        if not ok:
            raise ValueError(f"{v!r} is not a device count: use a number ≥ 1, -1 or 'auto' (all), or GPU ids '0,1'")
        return v

    @model_validator(mode="after")
    def _processes(self) -> "TrainerConfig":
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be ≥ 1, got {self.num_nodes}")
        many = self.num_nodes > 1 or (isinstance(self.devices, int) and self.devices > 1) or (
            isinstance(self.devices, str) and ("," in self.devices.strip(",") or self.devices.strip().isdigit()
                                              and int(self.devices) > 1))
        if many and self.strategy == "single_device":
            raise ValueError(f"strategy 'single_device' runs one process but devices is "
                             f"{self.devices!r} and num_nodes {self.num_nodes}; use strategy ddp")
        return self


class Experiment(BaseModel):
    """A validated experiment: ``data`` and ``method`` hold the registry's typed configs."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    seed: int = 0
    data: Any
    method: Any
    trainer: TrainerConfig = TrainerConfig()

    def to_dict(self) -> dict:
        """The resolved experiment (what config.yaml holds), without the encoder fields that do
        not apply to the named encoder (image sizes of a feature encoder, ``in_dim`` of a CNN)."""
        return _prune_encoders({
            "seed": self.seed,
            "data": self.data.model_dump(mode="json"),
            "method": self.method.model_dump(mode="json"),
            "trainer": self.trainer.model_dump(mode="json"),
        })


#: encoders of pre-extracted features (N, D): ``in_dim`` applies, image sizes do not
FEATURE_ENCODERS = ("identity", "linear", "linear_bn", "linear_ln")
_ENCODER_KEYS = {"name", "in_channels", "image_size", "in_dim"}


def _prune_encoders(node: Any) -> Any:
    if isinstance(node, list):
        return [_prune_encoders(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _prune_encoders(v) for k, v in node.items()}
    if _ENCODER_KEYS <= set(out):
        drop = ("in_channels", "image_size") if out["name"] in FEATURE_ENCODERS else (("in_dim",) if out["in_dim"] is None else ())
        for k in drop:
            out.pop(k)
    return out


def _model_in(ann: Any) -> type[BaseModel] | None:
    """The pydantic model class inside a field annotation (Optional, Annotated, ...), if any."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        m = _model_in(a)
        if m is not None:
            return m
    return None


def known_keys(cls: type[BaseModel], path: tuple, raw: Any) -> list[str]:
    """The keys that exist at ``path`` inside config class ``cls`` (model sections resolved by
    their ``name`` through the registry); [] when it cannot be told."""
    node: Any = cls
    for p in path:
        field = node.model_fields.get(p) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return []
        raw = raw.get(p) if isinstance(raw, dict) else None
        sub = _model_in(field.annotation)
        if sub is not None and not sub.model_fields and isinstance(raw, dict) and "name" in raw:
            try:  # a ``model:`` section: the named model's own Config
                sub = registry.lookup(registry.MODELS, "model", raw["name"]).Config
            except (ValueError, ImportError, AttributeError):
                return []
        node = sub
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def did_you_mean(key: str, known: list[str], parent: str = "") -> str:
    """``; did you mean 'parent.x'?`` for the known key closest to ``key``, else ''."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""


def _format_validation(err: ValidationError, prefix: str, source: str, cls: type[BaseModel] | None = None,
                       raw: Any = None) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        if e["type"] == "extra_forbidden":
            hint = ""
            if cls is not None and e["loc"]:
                parent = ".".join(str(p) for p in (prefix, *e["loc"][:-1]) if p != "")
                hint = did_you_mean(str(e["loc"][-1]), known_keys(cls, tuple(e["loc"][:-1]), raw), parent)
                if not hint:
                    hint = f" (remove it, or --set {loc}=null)"
            lines.append(f"config key '{loc}' does not exist{hint}")
        else:
            lines.append(f"config key '{loc}': {e['msg'].removeprefix('Value error, ')}")
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
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: --set {key}: value {value!r} is not valid YAML ({' '.join(str(err).split())})") from None
        if parsed is None:  # key=null removes the key: its default applies
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = parsed
    return out


def validate_section(cls: type[BaseModel], raw: Any, prefix: str, source: str) -> BaseModel:
    """Validate one config section, turning pydantic errors into a ConfigError naming the key."""
    try:
        return cls.model_validate(raw if raw is not None else {})
    except ValidationError as err:
        raise ConfigError(_format_validation(err, prefix, source, cls, raw)) from None


def build_experiment(raw: dict, source: str = "<config>") -> Experiment:
    """Validate a raw experiment dict (sections resolved through the registry)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: an experiment config must be a mapping")
    unknown = set(raw) - {"seed", "data", "method", "trainer"}
    if unknown:
        key = sorted(map(str, unknown))[0]
        raise ConfigError(f"{source}: config key '{key}' does not exist"
                          + did_you_mean(key, ["seed", "data", "method", "trainer"]))
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
    if not path.exists():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment config must be a mapping")
    return raw


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read a YAML experiment, apply ``--set`` overrides, validate."""
    raw = apply_overrides(load_yaml(path), overrides, source=str(path))
    return build_experiment(raw, source=str(path))
