"""Configuration: the dataclass schema registered in Hydra's ConfigStore, and value validation.

Owns: the schema, one module per section with its dataclasses beside that section's validator
(:mod:`.model`, :mod:`.data`, :mod:`.training` for ``optimizer`` and ``trainer``, :mod:`.checkpoint`
for ``checkpoint`` and ``resume``, :mod:`.chaos`); the whole :class:`TrainConfig`, the resume-safe
keys and compose/to_plain/typed/flatten/config_hash/saved_config (:mod:`.schema`); the parsing of the model's
layer specs (:mod:`.model`); and :func:`validate_config` (:mod:`.validate`), which checks what a
type cannot express (ranges, FSQ levels, frame counts the model can take) and reports every
problem in one ``ValueError``. :mod:`.values` holds what the validators share.

May import: the standard library, hydra and omegaconf, and the torch-free ``checkpoint.layout``
(``HOOK_PHASES``) and ``checkpoint.store`` (the store URL schemes). Never torch, nor anything
else. The YAML configs are not here: they live in ``resilient_train/configs`` (:data:`CONFIG_DIR`).
"""

from .chaos import ChaosConfig
from .checkpoint import CheckpointConfig, ResumeConfig
from .data import DataConfig
from .model import LAYER_TYPES, MAX_CODEBOOK_SIZE, DiscrConfig, ModelConfig, layer_specs, time_downsample_factor
from .schema import (
    CONFIG_DIR,
    LEGACY_VALUES,
    RESUME_SAFE_KEYS,
    TrainConfig,
    compose,
    config_hash,
    flatten,
    is_resume_safe,
    register_configs,
    saved_config,
    typed,
)
from .training import DEVICE_SPEC, EMAConfig, OptimizerConfig, TrainerConfig
from .validate import validate_config
from .values import to_plain

__all__ = [
    "CONFIG_DIR",
    "TrainConfig",
    "register_configs",
    "compose",
    "validate_config",
    "config_hash",
    "to_plain",
    "typed",
    "RESUME_SAFE_KEYS",
    "LEGACY_VALUES",
    "DEVICE_SPEC",
    "layer_specs",
    "time_downsample_factor",
    # the sections' schemas and the rest of the old module's public names
    "DiscrConfig",
    "ModelConfig",
    "DataConfig",
    "OptimizerConfig",
    "EMAConfig",
    "TrainerConfig",
    "CheckpointConfig",
    "ResumeConfig",
    "ChaosConfig",
    "LAYER_TYPES",
    "MAX_CODEBOOK_SIZE",
    "flatten",
    "is_resume_safe",
    "saved_config",
]
