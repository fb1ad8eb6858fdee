"""``python -m resilient_train.export SOURCE --out DIR [--weights ema|model] [--dtype D]``: the tokenizer, out.

SOURCE is a run, a checkpoint or a store URL. DIR is self-contained and needs only ``magvit2-pytorch``
(and safetensors) to use:

* ``tokenizer.safetensors``: the generator's weights, no discriminator: by default the weights the run chose
  "best" on (``checkpoint.best_of``: the EMA unless it says ``model`` or EMA was off), or ``--weights``;
  float32 by default, or rounded to bfloat16 / float16 with ``--dtype`` (half the bytes; loading
  casts them back into the float32 model, so the same lines load either);
* ``config.json``: the XXH3-128 of ``tokenizer.safetensors`` (``weights_xxh3_128``: :func:`load_tokenizer`
  refuses weights that do not match it), ``kwargs``, exactly the ``magvit2_pytorch.VideoTokenizer``
  constructor arguments, with what the saved training config cannot pass as is already converted
  (``discr`` -> ``discr_kwargs``, ``use_fsq=true``, ``flash_attn=false``, ``perceptual_loss_weight=0``
  so nothing downloads VGG16, an infinite ``max_dim`` left to the library's default); ``clip`` (frames, size, channels);
  ``video_contains_first_frame``; and the source checkpoint (path, step, XXH3-128 of its manifest);
* ``README.md``: how to load it with magvit2-pytorch alone.

The one conversion JSON cannot carry, ``layers`` as tuples (beartype wants them), is done by the
loader: :func:`load_tokenizer` here, or one line shown in the README. The folder is written as a
temporary sibling and renamed into place, so DIR is complete or absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import xxhash

from ..checkpoint import CheckpointError, load_checkpoint
from ..checkpoint.fetch import fetched
from ..checkpoint.layout import MANIFEST, checkpoints_under, read_best
from ..checkpoint.store import is_remote_url
from ..fsio import fsync_dir, write_durable
from .folder_checks import MAX_CONFIG_BYTES, check_config, check_weights, read_weights

__all__ = ["export_tokenizer", "load_tokenizer", "read_config", "tokenizer_kwargs", "main", "FORMAT"]

FORMAT = "resilient-train-tokenizer/1"
#: ``--dtype``'s choices: the dtype the floating-point weights are stored in.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG = "config.json"
WEIGHTS = "tokenizer.safetensors"

LOAD_SNIPPET = """import json
from magvit2_pytorch import VideoTokenizer
from safetensors.torch import load_file
kw = json.load(open("{dir}/config.json"))["kwargs"]
kw["layers"] = tuple(tuple(x) if isinstance(x, list) else x for x in kw["layers"])
tokenizer = VideoTokenizer(**kw).copy_for_eval()
tokenizer.load_state_dict(load_file("{dir}/tokenizer.safetensors"))"""


def tokenizer_kwargs(model_cfg: Any) -> dict[str, Any]:
    """The constructor arguments of the trained tokenizer, JSON-able (``layers`` as lists)."""
    from .model import model_kwargs

    kw = model_kwargs(model_cfg)
    kw["perceptual_loss_weight"] = 0.0  # inference needs no VGG16 (and the library would download it)
    if math.isinf(kw["max_dim"]):
        del kw["max_dim"]  # the library's default is inf; JSON has no infinity
    kw["layers"] = [list(x) if isinstance(x, tuple) else x for x in kw["layers"]]
    return kw


def _constructor_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    kw = dict(kw)
    kw["layers"] = tuple(tuple(x) if isinstance(x, list) else x for x in kw["layers"])
    return kw


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an exported tokenizer folder (its format checked)."""
    path = Path(path)
    try:
        size = (path / CONFIG).stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path / CONFIG}: {size} bytes, more than a tokenizer config holds ({MAX_CONFIG_BYTES})")
        cfg = json.loads((path / CONFIG).read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path / CONFIG}: not an exported tokenizer (python -m resilient_train.export)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path / CONFIG}: not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    check_config(cfg, path / CONFIG, FORMAT)
    return cfg


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An exported tokenizer, in eval mode, weights loaded strictly."""
    from magvit2_pytorch import VideoTokenizer

    path = Path(path)
    cfg = read_config(path)
    kwargs = _constructor_kwargs(cfg["kwargs"])
    weights = read_weights(path / WEIGHTS, cfg.get("weights_xxh3_128"))
    try:
        model = VideoTokenizer(**kwargs).copy_for_eval()
    except Exception as exc:  # beartype's and the constructor's own refusals of a combination the checks allow
        raise ValueError(f"{path / CONFIG}: VideoTokenizer refuses these kwargs: {str(exc)[:300]}") from None
    check_weights(model, weights, path / WEIGHTS)
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval()


def _best_of(cfg: dict[str, Any], state: dict[str, Any]) -> str:
    """The weights a run called "best" (``checkpoint.best_of``; runs before the key: the EMA), ``model`` without EMA."""
    best_of = cfg.get("checkpoint", {}).get("best_of", "ema") if isinstance(cfg.get("checkpoint"), dict) else "ema"
    return best_of if best_of in ("ema", "model") and "ema" in state else "model"


def _checkpoint_of(source: Path) -> Path:
    found = checkpoints_under(source)
    if not found:
        raise FileNotFoundError(f"{source}: no committed checkpoint here")
    return found[-1]


def export_tokenizer(
    source: str | os.PathLike, out: str | os.PathLike, weights: str | None = None, dtype: str = "float32"
) -> Path:
    """Write the tokenizer of ``source`` (a checkpoint, or a run directory: its newest checkpoint) to ``out``,
    its floating-point weights in ``dtype`` (:data:`DTYPES`); ``weights``: ``ema`` or ``model`` (``None``: the ones
    the run's ``checkpoint.best_of`` named, which "best" was chosen on)."""
    from magvit2_pytorch import VideoTokenizer
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new folder (an export is never written over)")
    ckpt = _checkpoint_of(source)
    loaded = load_checkpoint(ckpt)  # every file's size and hash checked
    state, cfg = loaded.state, loaded.state.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{ckpt}: holds no config")
    from omegaconf import OmegaConf

    mcfg, dcfg = OmegaConf.create(cfg["model"]), cfg["data"]
    weights = weights or _best_of(cfg, state)
    kwargs = tokenizer_kwargs(mcfg)
    with torch.random.fork_rng(devices=[]):  # the generator the folder describes (its init draws random numbers)
        generator = VideoTokenizer(**_constructor_kwargs(kwargs)).copy_for_eval()
    if weights == "ema":
        if "ema" not in state:
            raise CheckpointError(f"{ckpt}: no ema.safetensors (EMA was off); pass --weights model")
        tensors = state["ema"]
    elif weights == "model":
        keys = set(generator.state_dict())
        tensors = {k: v for k, v in state["model"].items() if k in keys}
    else:
        raise ValueError(f"--weights must be ema or model, got {weights!r}")
    generator.load_state_dict(tensors, strict=True)  # the folder must load, strictly, into what its kwargs build
    tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
    lost = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if lost:  # float16 tops out at 65504: a weight beyond it would be stored as inf
        raise ValueError(f"--dtype {dtype}: {lost[:3]} do not fit (non-finite after the cast); use bf16 or float32")
    manifest_hash = xxhash.xxh3_128((ckpt / MANIFEST).read_bytes()).hexdigest()
    config = {
        "format": FORMAT,
        "kwargs": kwargs,
        "clip": {
            "num_frames": int(dcfg["num_frames"]),
            "image_size": int(mcfg.image_size),
            "channels": int(mcfg.channels),
        },
        "video_contains_first_frame": bool(mcfg.video_contains_first_frame),
        "weights": weights,
        "dtype": dtype,
        "source": {"checkpoint": str(ckpt.resolve()), "step": loaded.step, "manifest_xxh3_128": manifest_hash},
        "best": read_best(ckpt.parent),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        with open(tmp / WEIGHTS, "rb+") as f:
            os.fsync(f.fileno())
        config["weights_xxh3_128"] = xxhash.xxh3_128((tmp / WEIGHTS).read_bytes()).hexdigest()  # load checks it
        write_durable(tmp / CONFIG, (json.dumps(config, indent=1) + "\n").encode())
        write_durable(tmp / "README.md", _readme(config, out).encode())
        fsync_dir(tmp)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _readme(config: dict[str, Any], out: Path) -> str:
    c, src = config["clip"], config["source"]
    return (
        f"# MAGVIT-v2 FSQ video tokenizer ({config['weights']} weights, stored as {config['dtype']})\n\n"
        f"Exported by resilient-train from `{src['checkpoint']}` (step {src['step']}, manifest XXH3-128 "
        f"`{src['manifest_xxh3_128']}`).\n\n"
        f"Clips: {c['num_frames']} frames of {c['image_size']}x{c['image_size']}, {c['channels']} channels, "
        f"values in [0, 1], shape (batch, channels, frames, height, width); "
        f"`video_contains_first_frame={config['video_contains_first_frame']}` (pass it to encode/decode).\n\n"
        "Load it with magvit2-pytorch alone:\n\n```python\n"
        + LOAD_SNIPPET.format(dir=out)
        + "\n```\n\nor `resilient_train.load_tokenizer(DIR)`.\n"
    )


def main(argv: list[str] | None = None) -> int:
    from .model import quiet_library_warnings

    quiet_library_warnings()
    p = argparse.ArgumentParser(prog="python -m resilient_train.export", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "source", help="a checkpoint directory, a run directory (its newest checkpoint), or a store URL (s3://...)"
    )
    p.add_argument("--out", type=Path, required=True, help="the folder to create")
    p.add_argument(
        "--weights", choices=["ema", "model"], default=None, help="default: those the run chose best on (best_of)"
    )
    p.add_argument(
        "--dtype", choices=list(DTYPES), default="float32", help="how the weights are stored (half: bf16, fp16)"
    )
    args = p.parse_args(argv)
    try:
        if is_remote_url(args.source):
            with fetched(args.source, newest_only=True) as items:
                if not items:
                    raise FileNotFoundError(f"{args.source}: no committed checkpoint on the store")
                out = export_tokenizer(items[-1].path, args.out, args.weights, args.dtype)
        else:
            out = export_tokenizer(Path(args.source), args.out, args.weights, args.dtype)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
