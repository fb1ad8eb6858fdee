"""The ``data`` section: which clips a run trains on and how they are read, and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import time_downsample_factor
from .values import AtLeast, Get, Need, RealRange, int_ge, is_int, plain_list


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


# ----------------------------------------------------------------------------------------------
# validation

AT_LEAST: tuple[AtLeast, ...] = (
    AtLeast("data.num_frames", 1),
    AtLeast("data.batch_size", 1),
    AtLeast("data.num_workers", 0),
    AtLeast("data.train_size", 1),
    AtLeast("data.val_size", 1),
    AtLeast("data.num_shapes", 1),
    AtLeast("data.frame_step", 1),
    AtLeast("data.clip_stride", 0, " (0: clips end to end)"),
)

REAL_RANGES: tuple[RealRange, ...] = (RealRange("data.val_fraction", 0, True, 1, False, "must be a number in [0, 1)"),)


def check_data(get: Get, need: Need, model_layers_ok: bool) -> None:
    """The data's checks beyond :data:`AT_LEAST` and :data:`REAL_RANGES`.

    Some compare against the ``model`` section: the clip's size and channels must be the model's, and
    its frame count must suit the model's ``compress_time`` layers (checked only when
    ``model_layers_ok``, what :func:`~.model.check_model` returned).
    """
    name = get("data.name")
    need(name in ("synthetic", "folder"), "data.name", name, "must be 'synthetic' or 'folder'")
    path = get("data.path")
    need(
        name != "folder" or (isinstance(path, str) and path.strip() != ""),
        "data.path",
        path,
        "data=folder needs data.path=DIR",
    )
    image_size, channels = get("model.image_size"), get("model.channels")
    d_image, d_channels = get("data.image_size"), get("data.channels")
    need(d_image == image_size, "data.image_size", d_image, f"must equal model.image_size ({image_size!r})")
    need(d_channels == channels, "data.channels", d_channels, f"must equal model.channels ({channels!r})")
    need(name != "folder" or d_channels in (1, 3), "data.channels", d_channels, "real videos give 1 or 3 channels")

    frames, vcff = get("data.num_frames"), get("model.video_contains_first_frame")
    if model_layers_ok and int_ge(frames, 1) and isinstance(vcff, bool):
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
    if name == "synthetic" and int_ge(batch, 1):
        # Both loaders drop an incomplete last batch: fewer clips than a batch means no batch at all.
        for key in ("data.train_size", "data.val_size"):
            v = get(key)
            need(not is_int(v) or v >= batch, key, v, f"must be >= data.batch_size ({batch})")

    exts = plain_list(get("data.extensions"))
    need(
        exts is not None and len(exts) > 0 and all(isinstance(e, str) and len(e) > 1 and e[0] == "." for e in exts),
        "data.extensions",
        exts if exts is not None else get("data.extensions"),
        "must be a non-empty list of file extensions, each starting with '.' (e.g. .mp4)",
    )
    need(
        get("data.cache") in ("none", "memory", "disk"), "data.cache", get("data.cache"), "must be none, memory or disk"
    )
