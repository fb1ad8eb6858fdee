"""The whole config: :class:`TrainConfig` assembled from the sections, Hydra's view of it, and what a resume may change.

The schema makes Hydra reject an unknown or mistyped key (``trainer.max_step=5``) and a value of
the wrong type at composition time, naming the key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .chaos import ChaosConfig
from .checkpoint import CheckpointConfig, ResumeConfig
from .data import DataConfig
from .model import ModelConfig
from .training import OptimizerConfig, TrainerConfig
from .values import Get, Need, is_int, to_plain

#: The YAML configs (``train.yaml``, the groups, the experiments): ``resilient_train/configs``.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainConfig:
    experiment: str = "default"
    seed: int = 0
    resume_from: str | None = None
    logger: str = "none"  # none | tensorboard (RUN/tensorboard, besides history.jsonl)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)


def check_top_level(get: Get, need: Need) -> None:
    """The checks of :class:`TrainConfig`'s own keys (``experiment`` is free)."""
    seed = get("seed")
    need(
        is_int(seed) and 0 <= seed < 2**63,
        "seed",
        seed,
        "must be an integer in [0, 2**63) (torch.manual_seed takes 64 bits; negative seeds are refused)",
    )
    rf = get("resume_from")
    need(rf is None or (isinstance(rf, str) and rf.strip() != ""), "resume_from", rf, "must be null, 'auto' or a path")
    need(get("logger") in ("none", "tensorboard"), "logger", get("logger"), "must be none or tensorboard")


# Keys that may change on resume because they cannot change the weights. Everything else is
# compared against the checkpoint's config before training starts.
RESUME_SAFE_KEYS: tuple[str, ...] = (
    "resume_from",
    "logger",
    "resume.",
    "trainer.max_steps",
    "trainer.log_every_n_steps",
    "trainer.heartbeat_secs",
    "trainer.progress_bar",
    "trainer.dist_timeout_secs",
    "trainer.hang_timeout_secs",
    "trainer.max_rollbacks",
    "trainer.replica_check_every_n_steps",
    "trainer.num_samples",
    # The device a run trains on is recorded in each checkpoint's environment and compared there.
    "trainer.device",
    # Compiled kernels order the floating-point operations differently, as another device does: a speed
    # choice that a resume may switch (the bits then follow the new setting).
    "trainer.compile",
    "checkpoint.",
    "chaos.",
    "data.num_workers",
    # Where the data lives and how it is cached do not change the result: the data fingerprint in every
    # checkpoint compares the files themselves on resume.
    "data.path",
    "data.val_path",
    "data.cache",
    "data.cache_dir",
    "data.skip_bad_files",
)


def register_configs() -> None:
    """Register the schema as ``base_train`` (the first entry of ``configs/train.yaml``'s defaults)."""
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainConfig)


def compose(overrides: list[str]) -> DictConfig:
    """Compose the config exactly as ``train.py`` does, without running anything (tests, bench)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def typed(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """The composed config as a :class:`TrainConfig` object: attribute access with the schema's types."""
    if isinstance(cfg, TrainConfig):
        return cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))  # type: ignore[return-value]


#: Keys that change the weights, added to the schema after checkpoints were written without them, with the value
#: those runs had: a config holding that value hashes as one without the key, so old checkpoints keep their hash,
#: and a checkpoint without the key resumes with that value (:func:`saved_config`), not the new default.
LEGACY_VALUES: dict[str, Any] = {"trainer.precision": "32", "trainer.ema.warmup": False}


def saved_config(cfg: dict[str, Any]) -> DictConfig:
    """A checkpoint's config as a resume runs with it: the schema applied (keys added to the schema since the
    checkpoint was written take the value those runs had, :data:`LEGACY_VALUES`, else their defaults).
    Raises what OmegaConf raises."""
    had = flatten(cfg)
    legacy = OmegaConf.create()
    for key, value in LEGACY_VALUES.items():
        if key not in had:
            OmegaConf.update(legacy, key, value, force_add=True)
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), legacy, OmegaConf.create(cfg))


def config_hash(cfg: Any, drop: tuple[str, ...] = RESUME_SAFE_KEYS) -> str:
    """SHA-256 of the config that determines the weights (resume-safe keys, and :data:`LEGACY_VALUES`, dropped)."""
    flat = {
        k: v
        for k, v in flatten(to_plain(cfg)).items()
        if not is_resume_safe(k, drop) and not (k in LEGACY_VALUES and LEGACY_VALUES[k] == v)
    }
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(flatten(v, key + "."))
            else:
                out[key] = v
    return out


def is_resume_safe(key: str, safe: tuple[str, ...] = RESUME_SAFE_KEYS) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in safe)
