"""Build the MAGVIT-v2 FSQ video tokenizer from config.

The only module that knows ``magvit2_pytorch``. It converts Hydra's ListConfig values to the
exact Python types the library's beartype checks want, pins the attention path
(``flash_attn=False``) so every machine computes the same bits, and refuses to download
anything: the perceptual loss needs a local VGG16 weights file.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import layer_specs, time_downsample_factor, to_plain

__all__ = [
    "build_model",
    "eval_copy",
    "import_library",
    "model_kwargs",
    "quiet_library_warnings",
    "time_downsample_factor",
]

log = logging.getLogger(__name__)


def quiet_library_warnings() -> None:
    """Silence the deprecation warnings magvit2-pytorch and its dependencies raise from torch on import: they are
    not the user's to act on (the command-line entry points call this first)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|magvit2_pytorch|vector_quantize)")


def import_library() -> None:
    """Import magvit2-pytorch (and torchvision, which imports torch._dynamo: about 3 s on a 2-core machine), so a
    caller can time it as one phase (:mod:`resilient_train.startup`) instead of in whichever step first needs it."""
    import magvit2_pytorch  # noqa: F401


def model_kwargs(model_cfg: Any) -> dict[str, Any]:
    """Keyword arguments for ``magvit2_pytorch.VideoTokenizer``, with the types beartype checks."""
    m = model_cfg
    discr = to_plain(m.discr)
    return dict(
        image_size=int(m.image_size),
        channels=int(m.channels),
        init_dim=int(m.init_dim),
        max_dim=float(m.max_dim) if m.max_dim is not None else float("inf"),
        layers=layer_specs(m.layers),
        use_fsq=True,
        fsq_levels=[int(v) for v in to_plain(m.fsq_levels)],
        num_codebooks=int(m.num_codebooks),
        attn_dim_head=int(m.attn_dim_head),
        attn_heads=int(m.attn_heads),
        flash_attn=False,
        use_gan=bool(m.use_gan),
        adversarial_loss_weight=float(m.adversarial_loss_weight) if m.use_gan else 0.0,
        grad_penalty_loss_weight=float(m.grad_penalty_loss_weight),
        perceptual_loss_weight=float(m.perceptual_loss_weight),
        discr_kwargs=dict(
            dim=int(discr["dim"]),
            image_size=int(m.image_size),
            channels=int(m.channels),
            max_dim=int(discr["max_dim"]),
            attn_heads=int(discr["attn_heads"]),
            attn_dim_head=int(discr["attn_dim_head"]),
            linear_attn_heads=int(discr["linear_attn_heads"]),
            linear_attn_dim_head=int(discr["linear_attn_dim_head"]),
        ),
    )


def _local_vgg(weights_path: str | None) -> torch.nn.Module:
    if not weights_path:
        raise ValueError(
            "model.perceptual_loss_weight > 0 needs model.vgg_weights_path: a local VGG16 state_dict file "
            "(nothing is downloaded at run time). Set model.perceptual_loss_weight=0 to train without it."
        )
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.vgg_weights_path: no such file: {path}")
    import torchvision

    vgg = torchvision.models.vgg16(weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    vgg.load_state_dict(state)
    vgg.classifier = torch.nn.Sequential(*vgg.classifier[:-2])
    vgg.requires_grad_(False)
    return vgg


def build_model(model_cfg: Any) -> torch.nn.Module:
    """A ``VideoTokenizer`` built from ``cfg.model``; the discriminator is always built."""
    from magvit2_pytorch import VideoTokenizer

    kwargs = model_kwargs(model_cfg)
    if kwargs["perceptual_loss_weight"] > 0:
        kwargs["vgg"] = _local_vgg(model_cfg.vgg_weights_path)
    return VideoTokenizer(**kwargs)


#: The parts of a ``VideoTokenizer`` that only training uses (the GAN and the perceptual loss).
TRAINING_ONLY = ("discr", "vgg", "multiscale_discrs")


def eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The generator alone, in eval mode, on the device ``model`` is on; ``model`` is not touched.

    What ``VideoTokenizer.copy_for_eval()`` returns, without its side effect: that method runs
    ``deepcopy(self.cpu())``, which moves the model it copies to the CPU in place, so a model
    being trained on a GPU would continue on the CPU. The training-only parts are not copied
    at all (the deep copy maps them to ``None``), then removed from the copy.
    """
    memo: dict[int, object] = {}
    for name in TRAINING_ONLY:
        part = getattr(model, name, None)
        if part is not None:
            memo[id(part)] = None
    out = copy.deepcopy(model, memo)
    for name in TRAINING_ONLY:
        if hasattr(out, name):
            delattr(out, name)
    return out.eval()
