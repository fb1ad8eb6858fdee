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
import math
import re
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
    # auto: this process's GPU when torch sees CUDA (LOCAL_RANK's under torchrun), else the CPU; or cpu, cuda, cuda:N.
    device: str = "auto"
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


#: What ``trainer.device`` may say (resolved against the machine by :mod:`.device`).
DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")

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
    # The device a run trains on is recorded in each checkpoint's environment and compared there.
    "trainer.device",
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


# ----------------------------------------------------------------------------------------------
# validation

#: Layers of ``magvit2_pytorch.VideoTokenizer`` this project can build (the ``cond_*`` layers need
#: ``dim_cond`` and a conditioning input, which nothing here passes). Name -> its argument:
#: None (takes none), "dim" (optional output width), "count" (required number of residual units).
LAYER_TYPES: dict[str, str | None] = {
    "residual": None,
    "attend_space": None,
    "linear_attend_space": None,
    "attend_time": None,
    "gateloop_time": None,
    "compress_space": "dim",
    "compress_time": "dim",
    "consecutive_residual": "count",
}

#: The FSQ codebook (the product of ``model.fsq_levels``) is materialised in memory by the quantizer
#: and by the codebook metrics; beyond this many codes that alone exhausts a machine's memory.
MAX_CODEBOOK_SIZE = 2**24


class _Unreadable:
    """What :func:`validate_config` sees for a key it cannot read (missing, ``???``, a broken interpolation)."""

    def __init__(self, exc: BaseException) -> None:
        self.why = f"{type(exc).__name__}: {exc}".splitlines()[0]

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<unreadable: {self.why}>"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_ge(v: Any, lo: int) -> bool:
    return _is_int(v) and v >= lo


def _finite(v: Any) -> bool:
    """A real number that is neither NaN nor infinite (ints are always finite)."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _not_nan(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, float) and not math.isnan(v))


def _plain_list(v: Any) -> list[Any] | None:
    """``v`` as a plain list (a ListConfig converted), or None when it is not a list."""
    try:
        v = to_plain(v)
    except Exception:
        return None
    return list(v) if isinstance(v, (list, tuple)) else None


def _show(v: Any) -> Any:
    try:
        return to_plain(v)
    except Exception:
        return v


def _layer_problem(item: Any) -> str | None:
    """Why one ``model.layers`` entry cannot be built, or None when it can."""
    known = sorted(LAYER_TYPES)
    name = item[0] if isinstance(item, (list, tuple)) and item else item
    if isinstance(name, str) and name.startswith("cond_"):
        return f"{name!r} needs a conditioning input (dim_cond, cond), which this trainer does not pass; known: {known}"
    if isinstance(item, str):
        if item not in LAYER_TYPES:
            return f"unknown layer {item!r}; known layers: {known}"
        if LAYER_TYPES[item] == "count":
            return f"{item!r} needs its number of residual units: [{item}, N]"
        return None
    if not isinstance(item, (list, tuple)):
        return f"must be a layer name or [name, positive int] (got a {type(item).__name__}); known layers: {known}"
    if not item or not isinstance(item[0], str) or item[0] not in LAYER_TYPES:
        return f"the first element must be a known layer name: {known}"
    name, args, arg = item[0], list(item[1:]), LAYER_TYPES[item[0]]
    if arg is None and args:
        return f"{name!r} takes no argument (it keeps the width); write it as the plain string {name!r}"
    if arg == "count" and len(args) != 1:
        return f"{name!r} needs exactly one argument: [{name}, N] with N residual units"
    if len(args) > 1:
        return f"{name!r} takes at most one argument: [{name}, DIM] (DIM: the output width)"
    if args and not _int_ge(args[0], 1):
        return f"the argument of {name!r} must be an integer >= 1"
    return None


def validate_config(cfg: Any) -> None:
    """Check values a type cannot; raise one ``ValueError`` listing every bad key.

    Every key of the schema is either checked against its meaning here or is free (strings such as
    paths and names, booleans). Nothing but that one ``ValueError`` escapes, whatever the values
    (a config read back from a checkpoint is not type-checked by the schema).
    """
    from .checkpoint.layout import SAVE_PHASES
    from .model import time_downsample_factor

    errors: list[str] = []

    def need(cond: bool, key: str, value: Any, why: str) -> None:
        if not cond:
            errors.append(f"{key}={_show(value)!r}: {why}")

    def get(key: str) -> Any:
        node = cfg
        try:
            for part in key.split("."):
                node = node[part] if isinstance(node, dict) else getattr(node, part)
        except Exception as exc:  # a missing key, a ``???`` value, a broken interpolation
            return _Unreadable(exc)
        return node

    try:
        _check_all(cfg, get, need, SAVE_PHASES, time_downsample_factor)
    except Exception as exc:  # a backstop: every check above is written not to raise
        errors.append(f"the configuration could not be checked completely ({type(exc).__name__}: {exc})")
    if errors:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))


def _check_all(cfg: Any, get: Any, need: Any, save_phases: tuple[str, ...], time_downsample_factor: Any) -> None:
    # ------------------------------------------------------------------ plain integer ranges
    at_least = {
        "model.channels": 1,
        "model.init_dim": 1,
        "model.num_codebooks": 1,
        "model.attn_dim_head": 1,
        "model.attn_heads": 1,
        "model.grad_penalty_every": 1,
        "model.discr.dim": 1,
        "model.discr.max_dim": 1,
        "model.discr.attn_heads": 1,
        "model.discr.attn_dim_head": 1,
        "model.discr.linear_attn_heads": 1,
        "model.discr.linear_attn_dim_head": 1,
        "data.num_frames": 1,
        "data.batch_size": 1,
        "data.num_workers": 0,
        "data.train_size": 1,
        "data.val_size": 1,
        "data.num_shapes": 1,
        "data.frame_step": 1,
        "data.clip_stride": 0,
        "optimizer.warmup_steps": 0,
        "trainer.max_steps": 1,
        "trainer.grad_accum_steps": 1,
        "trainer.num_threads": 1,
        "trainer.eval_every_n_steps": 1,
        "trainer.eval_batches": 1,
        "trainer.log_every_n_steps": 1,
        "trainer.num_samples": 0,
        "trainer.ema.update_every": 1,
        "checkpoint.every_n_steps": 1,
        "checkpoint.keep_last": 0,
        "chaos.seed": 0,
    }
    notes = {
        "data.clip_stride": " (0: clips end to end)",
        "checkpoint.keep_last": " (0 keeps every checkpoint)",
        "trainer.eval_batches": " (the validation loss is a mean over these batches)",
        "trainer.num_samples": " (0: no sample images)",
    }
    for key, lo in at_least.items():
        need(_int_ge(get(key), lo), key, get(key), f"must be an integer >= {lo}{notes.get(key, '')}")

    # ------------------------------------------------------------------ real-number ranges
    # (key, low, low inclusive, high, high inclusive, why); NaN and inf always refused here.
    real_ranges: list[tuple[str, float, bool, float, bool, str]] = [
        ("model.adversarial_loss_weight", 0, True, math.inf, False, "must be a finite number >= 0"),
        ("model.grad_penalty_loss_weight", 0, True, math.inf, False, "must be a finite number >= 0"),
        ("model.perceptual_loss_weight", 0, True, math.inf, False, "must be a finite number >= 0"),
        ("data.val_fraction", 0, True, 1, False, "must be a number in [0, 1)"),
        ("optimizer.lr", 0, False, math.inf, False, "must be a finite number > 0"),
        ("optimizer.discr_lr", 0, False, math.inf, False, "must be a finite number > 0"),
        ("optimizer.weight_decay", 0, True, math.inf, False, "must be a finite number >= 0"),
        ("optimizer.min_lr_ratio", 0, True, 1, True, "must be a number in [0, 1]"),
        ("trainer.heartbeat_secs", 0, True, math.inf, False, "must be a finite number >= 0"),
        ("trainer.dist_timeout_secs", 0, False, math.inf, False, "must be a finite number > 0"),
        ("trainer.ema.decay", 0, False, 1, False, "must be a number in (0, 1)"),
        ("chaos.step_kill_rate", 0, True, 1, True, "must be a probability in [0, 1]"),
        ("chaos.save_kill_rate", 0, True, 1, True, "must be a probability in [0, 1]"),
        ("chaos.sigterm_rate", 0, True, 1, True, "must be a probability in [0, 1]"),
        ("chaos.corrupt_rate", 0, True, 1, True, "must be a probability in [0, 1]"),
    ]
    for key, lo, lo_in, hi, hi_in, why in real_ranges:
        v = get(key)
        ok = _finite(v) and (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
        need(ok, key, v, why)

    # ------------------------------------------------------------------ top level
    seed = get("seed")
    need(
        _is_int(seed) and 0 <= seed < 2**63,
        "seed",
        seed,
        "must be an integer in [0, 2**63) (torch.manual_seed takes 64 bits; negative seeds are refused)",
    )
    rf = get("resume_from")
    need(rf is None or (isinstance(rf, str) and rf.strip() != ""), "resume_from", rf, "must be null, 'auto' or a path")
    need(get("logger") in ("none", "tensorboard"), "logger", get("logger"), "must be none or tensorboard")

    # ------------------------------------------------------------------ model
    image_size, channels, init_dim = get("model.image_size"), get("model.channels"), get("model.init_dim")
    image_ok = _int_ge(image_size, 8) and (image_size & (image_size - 1)) == 0
    need(image_ok, "model.image_size", image_size, "must be a power of two >= 8")

    levels = _plain_list(get("model.fsq_levels"))
    levels_ok = levels is not None and len(levels) > 0 and all(_int_ge(v, 3) for v in levels)
    need(
        levels_ok,
        "model.fsq_levels",
        levels if levels is not None else get("model.fsq_levels"),
        "each FSQ level must be an integer >= 3 (a level of 2 is not supported by FSQ here)",
    )
    if levels_ok:
        size = math.prod(levels)
        need(
            size <= MAX_CODEBOOK_SIZE,
            "model.fsq_levels",
            levels,
            f"the codebook (the product of the levels, {size}) must hold at most 2**24 codes: FSQ builds it in memory",
        )

    layers = _plain_list(get("model.layers"))
    layers_ok = layers is not None
    if layers is None:
        need(False, "model.layers", get("model.layers"), "must be a list of layers (names or [name, int])")
    else:
        for i, item in enumerate(layers):
            problem = _layer_problem(item)
            layers_ok = layers_ok and problem is None
            need(problem is None, f"model.layers[{i}]", item, problem or "")
    if layers_ok:
        names = [item if isinstance(item, str) else item[0] for item in layers]
        n_space = names.count("compress_space")
        need(
            not image_ok or 2**n_space <= image_size,
            "model.layers",
            layers,
            f"{n_space} compress_space layers halve model.image_size={image_size!r} below one pixel",
        )
    max_dim = get("model.max_dim")
    max_dim_ok = max_dim is None or (_not_nan(max_dim) and max_dim > 0)
    need(max_dim_ok, "model.max_dim", max_dim, "must be null (no cap) or a number > 0")
    if layers_ok and max_dim_ok and max_dim is not None and _int_ge(init_dim, 1):
        # The model passes max_dim as a float: a layer it caps gets a float width and torch fails.
        dim, capped = init_dim, []
        for item in layers:
            name, args = (item, []) if isinstance(item, str) else (item[0], list(item[1:]))
            if LAYER_TYPES[name] == "dim":
                dim = args[0] if args else dim * 2
                if dim > max_dim:
                    capped.append(dim)
        need(
            not capped,
            "model.max_dim",
            max_dim,
            f"must be >= every compress layer's width (here {max(capped, default=0)}); "
            "a capped layer gets a non-integer width and the model fails to build",
        )

    pw = get("model.perceptual_loss_weight")
    if _finite(pw) and pw > 0:
        need(
            bool(get("model.vgg_weights_path")),
            "model.vgg_weights_path",
            get("model.vgg_weights_path"),
            "model.perceptual_loss_weight > 0 needs a local VGG16 weights file (nothing is downloaded)",
        )
        need(
            channels in (1, 3, 4),
            "model.perceptual_loss_weight",
            pw,
            f"the perceptual loss needs model.channels in (1, 3, 4) (it is {channels!r}); otherwise it is silently off",
        )
    discr_max = get("model.discr.max_dim")
    if _is_int(discr_max) and _is_int(channels):
        need(
            discr_max >= channels,
            "model.discr.max_dim",
            discr_max,
            f"must be >= model.channels ({channels}): the discriminator caps its input width too",
        )

    # ------------------------------------------------------------------ data
    name = get("data.name")
    need(name in ("synthetic", "folder"), "data.name", name, "must be 'synthetic' or 'folder'")
    path = get("data.path")
    need(
        name != "folder" or (isinstance(path, str) and path.strip() != ""),
        "data.path",
        path,
        "data=folder needs data.path=DIR",
    )
    d_image, d_channels = get("data.image_size"), get("data.channels")
    need(d_image == image_size, "data.image_size", d_image, f"must equal model.image_size ({image_size!r})")
    need(d_channels == channels, "data.channels", d_channels, f"must equal model.channels ({channels!r})")
    need(name != "folder" or d_channels in (1, 3), "data.channels", d_channels, "real videos give 1 or 3 channels")

    frames, vcff = get("data.num_frames"), get("model.video_contains_first_frame")
    if layers_ok and _int_ge(frames, 1) and isinstance(vcff, bool):
        try:
            tdf = time_downsample_factor(get("model"))
            usable = frames - int(vcff)
            need(
                usable > 0 and usable % tdf == 0,
                "data.num_frames",
                frames,
                f"num_frames - int(model.video_contains_first_frame) must be a positive multiple of {tdf} "
                f"(2 ** number of compress_time layers); for 16 frames set model.video_contains_first_frame=false",
            )
        except (TypeError, ValueError) as exc:
            need(False, "model.layers", get("model.layers"), str(exc))

    batch = get("data.batch_size")
    if name == "synthetic" and _int_ge(batch, 1):
        # Both loaders drop an incomplete last batch: fewer clips than a batch means no batch at all.
        for key in ("data.train_size", "data.val_size"):
            v = get(key)
            need(not _is_int(v) or v >= batch, key, v, f"must be >= data.batch_size ({batch})")

    exts = _plain_list(get("data.extensions"))
    need(
        exts is not None and len(exts) > 0 and all(isinstance(e, str) and len(e) > 1 and e[0] == "." for e in exts),
        "data.extensions",
        exts if exts is not None else get("data.extensions"),
        "must be a non-empty list of file extensions, each starting with '.' (e.g. .mp4)",
    )
    need(
        get("data.cache") in ("none", "memory", "disk"), "data.cache", get("data.cache"), "must be none, memory or disk"
    )

    # ------------------------------------------------------------------ optimizer
    betas = _plain_list(get("optimizer.betas"))
    need(
        betas is not None and len(betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in betas),
        "optimizer.betas",
        betas if betas is not None else get("optimizer.betas"),
        "must be two numbers, each in [0, 1) (Adam's moment decay rates)",
    )
    mgn = get("optimizer.max_grad_norm")
    need(_not_nan(mgn) and mgn > 0, "optimizer.max_grad_norm", mgn, "must be a number > 0 (inf: no clipping)")
    warmup, schedule = get("optimizer.warmup_steps"), get("optimizer.schedule_steps")
    need(
        _is_int(schedule) and (not _is_int(warmup) or schedule > warmup),
        "optimizer.schedule_steps",
        schedule,
        f"must be an integer > optimizer.warmup_steps ({warmup!r})",
    )

    # ------------------------------------------------------------------ trainer
    device = get("trainer.device")
    need(
        isinstance(device, str) and DEVICE_SPEC.fullmatch(device) is not None,
        "trainer.device",
        device,
        "must be 'auto' (the GPU when there is one), 'cpu', 'cuda' or 'cuda:N'",
    )

    # ------------------------------------------------------------------ chaos
    for kind in ("step_kill", "save_kill", "sigterm", "corrupt"):
        key = f"chaos.{kind}_steps"
        steps = _plain_list(get(key))
        need(
            steps is not None and all(_int_ge(s, 1) for s in steps),
            key,
            steps if steps is not None else get(key),
            "must be a list of steps, each an integer >= 1",
        )
    skip = get("chaos.skip_restore")
    need(skip in ("", "rng", "data"), "chaos.skip_restore", skip, "must be '', 'rng' or 'data'")
    hold = get("chaos.hold_phase")
    hold_phase, at, hold_step = (hold if isinstance(hold, str) else "?").partition("@")
    need(
        (hold_phase == "" and not at) or (hold_phase in save_phases and (not at or hold_step.isdigit())),
        "chaos.hold_phase",
        hold,
        f"must be '' or one of {list(save_phases)}, optionally followed by @STEP",
    )
