"""Build any registered MIL model (registry.MODELS) from its config section."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, SerializeAsAny

from milkit import registry
from milkit.config import StrictModel
from milkit.models.base import MILModel
from milkit.nn.encoders import EncoderConfig, build_encoder


def model_config(raw: Any) -> StrictModel:
    """Validate a ``model:`` section ``{name: ..., ...}`` with that model's own Config."""
    if isinstance(raw, StrictModel):
        return raw
    if not isinstance(raw, dict) or "name" not in raw:
        raise ValueError("a model section needs 'name' (one of: " + ", ".join(sorted(registry.MODELS)) + ")")
    cls = registry.lookup(registry.MODELS, "model", raw["name"])
    return cls.Config.model_validate(raw)


#: a ``model:`` config field: validated by the named model's own Config, dumped in full
ModelSection = Annotated[SerializeAsAny[StrictModel], BeforeValidator(model_config)]


def build_mil_model(model_cfg: StrictModel, encoder_cfg: EncoderConfig) -> MILModel:
    """Encoder + MIL head, as named in the config."""
    cls = registry.lookup(registry.MODELS, "model", model_cfg.name)  # type: ignore[attr-defined]
    encoder, dim = build_encoder(encoder_cfg)
    return cls.from_config(model_cfg, encoder, dim)
