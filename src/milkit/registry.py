"""Where milkit finds its pieces by name: methods, models, encoders, datasets, CLI commands.

Entries are ``"module:attribute"`` strings imported on first use, so that a
config naming a method pulls in only that method's code.
"""

from __future__ import annotations

import importlib
from typing import Any

METHODS: dict[str, str] = {
    "mil": "milkit.methods.mil:MILMethod",
    "distill_to_label": "milkit.methods.distill_to_label:DistillToLabel",
    "weno": "milkit.methods.weno:WENOMethod",
    "ikd": "milkit.methods.ikd:IKDMethod",
    "maxmin": "milkit.methods.maxmin:MaxMinMethod",
    "segmentation_baseline": "milkit.methods.seg_baselines:SegBaselineMethod",
    "pseudo_label": "milkit.methods.pseudo_label:PseudoLabelMethod",
}

MODELS: dict[str, str] = {
    "abmil": "milkit.models.abmil:ABMIL",
    "meanpool": "milkit.models.pooling_mil:MeanPoolMIL",
    "maxpool": "milkit.models.pooling_mil:MaxPoolMIL",
    "smap": "milkit.models.sm:SmAP",
    "smtap": "milkit.models.sm:SmTAP",
    "clam_sb": "milkit.models.clam:CLAMSB",
    "clam_mb": "milkit.models.clam:CLAMMB",
    "dsmil": "milkit.models.dsmil:DSMIL",
    "transmil": "milkit.models.transmil:TransMIL",
    "dtfd": "milkit.models.dtfd:DTFDMIL",
    "smoothed_instance": "milkit.methods.pseudo_label:SmoothedInstanceMIL",  # pseudo_label's instance model
}

DATASETS: dict[str, str] = {
    "digit_bags": "milkit.data.synthetic:DigitBagsConfig",
    "positive_ratio_bags": "milkit.data.positive_ratio:PositiveRatioBagsConfig",
    "spatial_bags": "milkit.data.spatial:SpatialBagsConfig",
    "hard_bags": "milkit.data.hard_bags:HardBagsConfig",
    "feature_bags": "milkit.data.features:FeatureBagsConfig",
    "colon_nuclei": "milkit.data.histology:ColonNucleiConfig",
    "breast_ucsb": "milkit.data.histology:BreastUCSBConfig",
    "seg_synthetic": "milkit.data.seg_synthetic:SyntheticTissueConfig",
    "seg_images": "milkit.data.images:SegImagesConfig",
}

# Modules exposing ``register(app: typer.Typer)`` that add top-level commands.
COMMAND_MODULES: list[str] = [
    "milkit.slide.commands",
    "milkit.view.commands",  # milkit view
]

# Modules exposing ``register(app: typer.Typer)`` that add ``milkit benchmark <name>`` commands.
BENCHMARK_MODULES: list[str] = [
    "milkit.benchmarks.mnist_bags",  # Distill-to-Label Fig. 2 / Tables I–II on digit-bags
    "milkit.benchmarks.extract",  # tiling and feature-extraction throughput
    "milkit.benchmarks.label_outputs",  # one whole slide's milkit label outputs
    "milkit.benchmarks.sm_spatial",  # Sm: spatial synthetic
    "milkit.benchmarks.speed",  # MIL models' speed and memory (vs torchmil)
    "milkit.benchmarks.train_loop",  # milkit train vs a plain PyTorch loop (issue 15)
    "milkit.benchmarks.positive_ratio",  # WENO Table 1 / Table 4
    "milkit.benchmarks.segmentation",  # IKD-MIL Table 1, Max-Min Tables 1–2
    "milkit.benchmarks.d2l_histology",  # Distill-to-Label Tables I–II on colon/breast
    "milkit.benchmarks.hard_bags",  # issue 11: every recipe on hard feature bags
]


def resolve(target: str) -> Any:
    """Import ``"module:attr"`` and return the attribute."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def lookup(table: dict[str, str], kind: str, name: str) -> Any:
    """Resolve ``name`` in ``table`` or raise a ValueError listing the known names."""
    if name not in table:
        known = ", ".join(sorted(table))
        raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {known}")
    return resolve(table[name])
