"""Typed configuration: one dataclass tree, YAML presets on top, dotted overrides last.

Every key has a default (:mod:`.schema`), so a preset only says what differs. Unknown keys
are an error (a typo must not silently fall back to a default). Load with
:func:`load_config` (:mod:`.load`)::

    cfg = load_config("synthetic", ["train.epochs=3", "data.root=/data/shapes"])

A preset is a YAML path or the name of a file in ``vitpcm/configs/`` (``voc12``,
``coco14``, ``synthetic``).

The modules, one job each: :mod:`.schema` (the dataclasses), :mod:`.load` (layering,
saved run configs), :mod:`.validate` (cross-field checks, sizes against a patch size),
:mod:`.resume` (what may change on ``--resume``), :mod:`.batch` (a global batch as
per-process batch x accumulation).

This package imports neither torch nor timm (``vitpcm crf`` / ``evaluate`` load configs).
What needs the backbone itself, ``input.mean`` / ``input.std: auto`` and the patch size,
is resolved once by :func:`vitpcm.stages.config.prepare_config`, which checks the sizes
with :func:`check_sizes` from here.
"""

from vitpcm.config.batch import batch_plan
from vitpcm.config.load import (
    BASE_KEYS,
    LEGACY_NORMALISATION,
    PRESET_DIR,
    load_config,
    load_saved_config,
    preset_names,
    resolve_preset,
    run_config,
    to_yaml,
)
from vitpcm.config.resume import RESUME_KEYS, check_resume_changes, config_changes, resume_allowed
from vitpcm.config.schema import (
    AugmentConfig,
    Config,
    CRFConfig,
    DataConfig,
    InferConfig,
    InputConfig,
    LossConfig,
    ModelConfig,
    SegmentConfig,
    TrainConfig,
)
from vitpcm.config.validate import (
    check_sizes,
    normalisation_values,
    resolved_normalisation,
    validate_bounds,
    validate_config,
    validate_segment,
)

__all__ = [
    "AugmentConfig",
    "BASE_KEYS",
    "CRFConfig",
    "Config",
    "DataConfig",
    "InferConfig",
    "InputConfig",
    "LEGACY_NORMALISATION",
    "LossConfig",
    "ModelConfig",
    "PRESET_DIR",
    "RESUME_KEYS",
    "SegmentConfig",
    "TrainConfig",
    "batch_plan",
    "check_resume_changes",
    "check_sizes",
    "config_changes",
    "load_config",
    "load_saved_config",
    "normalisation_values",
    "preset_names",
    "resolve_preset",
    "resolved_normalisation",
    "resume_allowed",
    "run_config",
    "to_yaml",
    "validate_bounds",
    "validate_config",
    "validate_segment",
]
