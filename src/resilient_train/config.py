"""Configuration: dataclass schemas registered with Hydra's ConfigStore, and value validation.

The schema makes Hydra reject an unknown or mistyped key (``trainer.max_step=5``) and a value of
the wrong type at composition time, naming the key. :func:`validate_config` then checks what a
type cannot express (ranges, FSQ levels, frame counts the model can take) and reports every
problem in one ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

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
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class DiscrConfig:
    dim: int = 16
    max_dim: int = 128
    attn_heads: int = 2
    attn_dim_head: int = 16
    linear_attn_heads: int = 2
    linear_attn_dim_head: int = 8


@dataclass
class ModelConfig:
    image_size: int = 64
    channels: int = 3
    init_dim: int = 64
    max_dim: float | None = None
    # Each entry is a layer name or [name, dim]; see magvit2_pytorch.VideoTokenizer.
    layers: list[Any] = field(default_factory=lambda: ["residual", ["compress_space", 128], "residual"])
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    num_codebooks: int = 1
    attn_dim_head: int = 32
    attn_heads: int = 4
    # With compress_time layers, (frames - int(video_contains_first_frame)) must divide by 2**n.
    video_contains_first_frame: bool = True
    use_gan: bool = True
    adversarial_loss_weight: float = 0.1
    grad_penalty_loss_weight: float = 10.0
    # Gradient penalty on every n-th discriminator step (lazy regularisation); 1 = every step.
    grad_penalty_every: int = 4
    perceptual_loss_weight: float = 0.0
    vgg_weights_path: str | None = None
    discr: DiscrConfig = field(default_factory=DiscrConfig)


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | folder
    path: str | None = None
    num_frames: int = 16
    image_size: int = 64
    channels: int = 3
    batch_size: int = 1
    num_workers: int = 0
    train_size: int = 512
    val_size: int = 8
    num_shapes: int = 3
    val_fraction: float = 0.1
    extensions: list[str] = field(default_factory=lambda: [".mp4", ".webm", ".gif", ".mkv", ".mov", ".avi"])
    # data=folder: clips of num_frames frames, every frame_step-th frame, one clip starting every
    # clip_stride frames (0: right after the previous clip ends) over each whole video.
    frame_step: int = 1
    clip_stride: int = 0
    val_path: str | None = None  # a separate validation folder (else train/ + val/ subfolders, else a hash split)
    cache: str = "none"  # none | memory | disk: finished clips, bit-identical to decoding again
    cache_dir: str | None = None  # data.cache=disk: where (default ~/.cache/resilient_train/clips)
    skip_bad_files: bool = False  # skip unreadable files with a warning (recorded in the data fingerprint)


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    discr_lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 100
    # Length of the cosine schedule in optimizer steps; independent of trainer.max_steps so that a
    # run stopped at 40 and continued to 80 matches one trained straight to 80.
    schedule_steps: int = 10000
    min_lr_ratio: float = 0.1


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.999
    update_every: int = 1


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    grad_accum_steps: int = 1
    num_threads: int = 2
    device: str = "cpu"
    deterministic: bool = True
    eval_every_n_steps: int = 100
    eval_batches: int = 2
    log_every_n_steps: int = 1
    num_samples: int = 2
    heartbeat_secs: float = 10.0
    progress_bar: bool = True
    # With ranks (torchrun): how long a collective waits for a peer before failing (then torchrun restarts).
    dist_timeout_secs: float = 120.0
    ema: EMAConfig = field(default_factory=EMAConfig)


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100
    # Keep the K newest committed checkpoints plus the best; 0 keeps all.
    keep_last: int = 3
    async_save: bool = False
    save_on_best: bool = True


@dataclass
class ResumeConfig:
    allow_config_change: bool = False
    # Resume on a different number of ranks: exact weights and optimizer state, the data position
    # converted through samples consumed, fresh per-rank RNG streams (no bitwise continuity; recorded).
    allow_world_size_change: bool = False


@dataclass
class ChaosConfig:
    enabled: bool = False
    seed: int = 0
    # Per-step probabilities of each event kind.
    step_kill_rate: float = 0.0
    save_kill_rate: float = 0.0
    sigterm_rate: float = 0.0
    corrupt_rate: float = 0.0
    # Explicit steps, in addition to the rates.
    step_kill_steps: list[int] = field(default_factory=list)
    save_kill_steps: list[int] = field(default_factory=list)
    sigterm_steps: list[int] = field(default_factory=list)
    corrupt_steps: list[int] = field(default_factory=list)
    # Negative control: on resume, drop one restored part ("", "rng", "data") so the proof must fail.
    skip_restore: str = ""
    # For tests: park the checkpoint writer at a save phase ("<phase>" or "<phase>@<step>") to SIGKILL it there.
    hold_phase: str = ""


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
    "trainer.num_samples",
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


def to_plain(cfg: Any) -> Any:
    """Plain dicts and lists from a DictConfig, ListConfig or config dataclass; anything else as is."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    return cfg


def typed(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """The composed config as a :class:`TrainConfig` object: attribute access with the schema's types."""
    if isinstance(cfg, TrainConfig):
        return cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))  # type: ignore[return-value]


def config_hash(cfg: Any, drop: tuple[str, ...] = RESUME_SAFE_KEYS) -> str:
    """SHA-256 of the config that determines the weights (resume-safe keys dropped)."""
    flat = {k: v for k, v in flatten(to_plain(cfg)).items() if not is_resume_safe(k, drop)}
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


def validate_config(cfg: Any) -> None:
    """Check values a type cannot; raise one ``ValueError`` listing every bad key."""
    from .checkpoint.layout import SAVE_PHASES
    from .model import time_downsample_factor

    errors: list[str] = []

    def need(cond: bool, key: str, value: Any, why: str) -> None:
        if not cond:
            errors.append(f"{key}={value!r}: {why}")

    m, d, o, t, c = cfg.model, cfg.data, cfg.optimizer, cfg.trainer, cfg.checkpoint
    levels = list(m.fsq_levels)
    need(
        len(levels) > 0 and all(int(v) >= 3 for v in levels),
        "model.fsq_levels",
        levels,
        "each FSQ level must be an integer >= 3 (a level of 2 is not supported by FSQ here)",
    )
    need(
        m.image_size >= 8 and (m.image_size & (m.image_size - 1)) == 0,
        "model.image_size",
        m.image_size,
        "must be a power of two >= 8",
    )
    need(d.image_size == m.image_size, "data.image_size", d.image_size, f"must equal model.image_size ({m.image_size})")
    need(d.channels == m.channels, "data.channels", d.channels, f"must equal model.channels ({m.channels})")
    try:
        tdf = time_downsample_factor(m)
        usable = d.num_frames - int(m.video_contains_first_frame)
        need(
            usable > 0 and usable % tdf == 0,
            "data.num_frames",
            d.num_frames,
            f"num_frames - int(model.video_contains_first_frame) must be a positive multiple of {tdf} "
            f"(2 ** number of compress_time layers); for 16 frames set model.video_contains_first_frame=false",
        )
    except (TypeError, ValueError) as exc:
        errors.append(f"model.layers={to_plain(m.layers)!r}: {exc}")
    need(
        m.perceptual_loss_weight == 0 or bool(m.vgg_weights_path),
        "model.vgg_weights_path",
        m.vgg_weights_path,
        "model.perceptual_loss_weight > 0 needs a local VGG16 weights file (nothing is downloaded)",
    )
    need(m.grad_penalty_every >= 1, "model.grad_penalty_every", m.grad_penalty_every, "must be >= 1")
    need(d.name in ("synthetic", "folder"), "data.name", d.name, "must be 'synthetic' or 'folder'")
    need(d.name != "folder" or bool(d.path), "data.path", d.path, "data=folder needs data.path=DIR")
    need(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    need(cfg.logger in ("none", "tensorboard"), "logger", cfg.logger, "must be none or tensorboard")
    need(d.frame_step >= 1, "data.frame_step", d.frame_step, "must be >= 1")
    need(d.clip_stride >= 0, "data.clip_stride", d.clip_stride, "must be >= 0 (0: clips end to end)")
    need(d.cache in ("none", "memory", "disk"), "data.cache", d.cache, "must be none, memory or disk")
    need(d.name != "folder" or d.channels in (1, 3), "data.channels", d.channels, "real videos give 1 or 3 channels")
    need(d.train_size >= d.batch_size, "data.train_size", d.train_size, "must be >= data.batch_size")
    need(d.val_size >= 1, "data.val_size", d.val_size, "must be >= 1")
    need(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
    need(o.discr_lr > 0, "optimizer.discr_lr", o.discr_lr, "must be > 0")
    need(len(o.betas) == 2, "optimizer.betas", list(o.betas), "must be two numbers")
    need(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, "must be >= 0")
    need(
        o.schedule_steps > o.warmup_steps,
        "optimizer.schedule_steps",
        o.schedule_steps,
        f"must be > optimizer.warmup_steps ({o.warmup_steps})",
    )
    need(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    need(t.max_steps >= 1, "trainer.max_steps", t.max_steps, "must be >= 1")
    need(t.grad_accum_steps >= 1, "trainer.grad_accum_steps", t.grad_accum_steps, "must be >= 1")
    need(t.num_threads >= 1, "trainer.num_threads", t.num_threads, "must be >= 1")
    need(t.eval_every_n_steps >= 1, "trainer.eval_every_n_steps", t.eval_every_n_steps, "must be >= 1")
    need(t.dist_timeout_secs > 0, "trainer.dist_timeout_secs", t.dist_timeout_secs, "must be > 0")
    need(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", t.log_every_n_steps, "must be >= 1")
    need(0 < t.ema.decay < 1, "trainer.ema.decay", t.ema.decay, "must be in (0, 1)")
    need(t.device == "cpu" or t.device.startswith("cuda"), "trainer.device", t.device, "must be 'cpu' or 'cuda[:N]'")
    need(c.every_n_steps >= 1, "checkpoint.every_n_steps", c.every_n_steps, "must be >= 1")
    need(c.keep_last >= 0, "checkpoint.keep_last", c.keep_last, "must be >= 0 (0 keeps every checkpoint)")
    rf = cfg.resume_from
    need(rf is None or str(rf).strip() != "", "resume_from", rf, "must be null, 'auto' or a path")
    need(
        cfg.chaos.skip_restore in ("", "rng", "data"),
        "chaos.skip_restore",
        cfg.chaos.skip_restore,
        "must be '', 'rng' or 'data'",
    )
    hold_phase, _, hold_step = str(cfg.chaos.hold_phase).partition("@")
    need(
        hold_phase in ("", *SAVE_PHASES) and (not hold_step or hold_step.isdigit()),
        "chaos.hold_phase",
        cfg.chaos.hold_phase,
        f"must be '' or one of {list(SAVE_PHASES)}, optionally followed by @STEP",
    )
    if errors:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))
