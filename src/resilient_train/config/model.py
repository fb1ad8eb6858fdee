"""The ``model`` section: the tokenizer's and discriminator's shape and loss weights, and its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .values import AtLeast, Get, Need, RealRange, finite, int_ge, is_int, not_nan, plain_list, to_plain


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


def layer_specs(raw: Any) -> tuple:
    """``["residual", ["compress_space", 64]]`` -> ``("residual", ("compress_space", 64))``."""
    out = []
    for item in to_plain(raw):
        if isinstance(item, (list, tuple)):
            name, *args = item
            out.append((str(name), *[int(a) for a in args]))
        else:
            out.append(str(item))
    return tuple(out)


def time_downsample_factor(model_cfg: Any) -> int:
    """2 ** (number of ``compress_time`` layers)."""
    n = 0
    for item in layer_specs(model_cfg.layers):
        name = item[0] if isinstance(item, tuple) else item
        n += name == "compress_time"
    return 2**n


# ----------------------------------------------------------------------------------------------
# validation

AT_LEAST: tuple[AtLeast, ...] = (
    AtLeast("model.channels", 1),
    AtLeast("model.init_dim", 1),
    AtLeast("model.num_codebooks", 1),
    AtLeast("model.attn_dim_head", 1),
    AtLeast("model.attn_heads", 1),
    AtLeast("model.grad_penalty_every", 1),
    AtLeast("model.discr.dim", 1),
    AtLeast("model.discr.max_dim", 1),
    AtLeast("model.discr.attn_heads", 1),
    AtLeast("model.discr.attn_dim_head", 1),
    AtLeast("model.discr.linear_attn_heads", 1),
    AtLeast("model.discr.linear_attn_dim_head", 1),
)

REAL_RANGES: tuple[RealRange, ...] = (
    RealRange("model.adversarial_loss_weight", 0, True, math.inf, False, "must be a finite number >= 0"),
    RealRange("model.grad_penalty_loss_weight", 0, True, math.inf, False, "must be a finite number >= 0"),
    RealRange("model.perceptual_loss_weight", 0, True, math.inf, False, "must be a finite number >= 0"),
)


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
    if args and not int_ge(args[0], 1):
        return f"the argument of {name!r} must be an integer >= 1"
    return None


def check_model(get: Get, need: Need) -> bool:
    """The model's checks beyond :data:`AT_LEAST` and :data:`REAL_RANGES`; True when ``model.layers`` is sound."""
    # Long on purpose: one check per key of the model section, each with its message.
    image_size, channels, init_dim = get("model.image_size"), get("model.channels"), get("model.init_dim")
    image_ok = int_ge(image_size, 8) and (image_size & (image_size - 1)) == 0
    need(image_ok, "model.image_size", image_size, "must be a power of two >= 8")

    levels = plain_list(get("model.fsq_levels"))
    levels_ok = levels is not None and len(levels) > 0 and all(int_ge(v, 3) for v in levels)
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

    layers = plain_list(get("model.layers"))
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
    max_dim_ok = max_dim is None or (not_nan(max_dim) and max_dim > 0)
    need(max_dim_ok, "model.max_dim", max_dim, "must be null (no cap) or a number > 0")
    if layers_ok and max_dim_ok and max_dim is not None and int_ge(init_dim, 1):
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
    if finite(pw) and pw > 0:
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
    if is_int(discr_max) and is_int(channels):
        need(
            discr_max >= channels,
            "model.discr.max_dim",
            discr_max,
            f"must be >= model.channels ({channels}): the discriminator caps its input width too",
        )
    return layers_ok
