"""``python -m resilient_train.verify PATH [--json] [--compare OTHER] [--no-model]``

PATH is a checkpoint directory or a run directory (then every committed checkpoint in it). For
each checkpoint, exactly what a resume checks before it trusts one: manifest, presence, sizes
(before reading) and hashes of every file; safe loading (safetensors and JSON only); then the
content (:mod:`resilient_train.checks`): the saved config valid, counters that agree (manifest
step = trainer step = optimizer step count = scheduler step), every tensor shaped as the model the
config builds, RNG states restorable, one data position. Then the model rebuilt from the saved
config, weights loaded strictly, and a fixed input encoded to finite codes (``--no-model`` skips
this). Exit 0 when everything is valid, 1 otherwise (or, with ``--compare``, when the two
checkpoints differ), 2 for a bad command line.

``--compare OTHER`` compares two checkpoints tensor by tensor, bit for bit, and prints the first
difference (key, shape, number of differing elements) or ``identical``. Wall-clock values
(manifest times, pids) are not compared; of the config, only keys that can change the result are.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load_checkpoint, verify_files
from .checkpoint.layout import checkpoints_under
from .checks import check_checkpoint, saved_config
from .config import flatten, is_resume_safe, to_plain

__all__ = ["verify_checkpoint", "compare_checkpoints", "compare_states", "checkpoints_under", "main"]

# State keys that do not describe the training state itself.
IGNORED_STATE_KEYS = {"config_changes"}


def verify_checkpoint(ckpt: Path, *, check_model: bool = True) -> dict[str, Any]:
    """Every check on one checkpoint; returns a result dict with ``ok`` and ``errors``.

    The files (:func:`verify_files`) and their content (:func:`~resilient_train.checks.check_checkpoint`)
    are checked exactly as a resume checks them; ``check_model`` adds encoding a fixed input.
    """
    ckpt = Path(ckpt)
    result: dict[str, Any] = {
        "path": str(ckpt),
        "ok": False,
        "step": None,
        "epoch": None,
        "bytes": 0,
        "errors": [],
        "checks": [],
    }
    report = verify_files(ckpt)  # the one read of the checkpoint
    result["bytes"] = report.bytes
    result["step"] = report.step
    if report.newer:
        result["newer_format"] = True
    if not report.ok:
        result["errors"] = report.errors
        return result
    result["checks"].append("files: manifest, sizes, hashes, safe load")
    state, manifest = report.loaded.state, report.loaded.manifest
    epoch = manifest.get("epoch")
    result["epoch"] = epoch if isinstance(epoch, int) else None
    errors = result["errors"]
    errors += check_checkpoint(report.loaded)
    if not errors:
        result["checks"].append(
            "content: config, counters = manifest = optimizer = scheduler step, tensors match the model, RNG, position"
        )
        world = manifest.get("world_size", 1)
        if world > 1:
            result["checks"].append(f"ranks: {world} ranks' files, one data position")
    cfg = state.get("config")
    if check_model and not errors and cfg:
        try:
            result["codes"] = _encode_fixed_input(to_plain(saved_config(cfg)), state)  # as a resume builds it
            result["checks"].append("model: rebuilt from saved config, strict load, finite codes")
        except Exception as exc:  # report any failure of the model check, naming the file
            errors.append(f"{ckpt / 'model.safetensors'}: model check failed: {type(exc).__name__}: {exc}")
    result["ok"] = not errors
    return result


def _encode_fixed_input(cfg: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from .model import build_model

    mcfg = OmegaConf.create(cfg["model"])
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(0)
        model = build_model(mcfg)
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    g = torch.Generator().manual_seed(1234)
    frames = int(cfg["data"]["num_frames"])
    video = torch.rand(1, int(mcfg.channels), frames, int(mcfg.image_size), int(mcfg.image_size), generator=g)
    vcff = bool(mcfg.video_contains_first_frame)
    with torch.no_grad():
        quantized, codes = model.encode(video, quantize=True, video_contains_first_frame=vcff)
        recon = model.decode(quantized, video_contains_first_frame=vcff)
    if not (torch.isfinite(quantized).all() and torch.isfinite(recon).all()):
        raise ValueError("non-finite output for a fixed input")
    return {"shape": list(codes.shape), "unique": int(codes.unique().numel())}


# -- comparison ------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if t.is_complex() or t.element_size() not in ints:
        return t.view(torch.uint8)
    return t.view(ints[t.element_size()])


def compare_states(a: Any, b: Any, path: str = "") -> str | None:
    """The first difference between two states (bit for bit), or None if identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: tensor vs {type(b if isinstance(a, torch.Tensor) else a).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: dtype/shape {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        diff = int((_bits(a) != _bits(b)).sum())
        if diff:
            return f"{path}: shape {tuple(a.shape)}, {diff} of {a.numel()} elements differ"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}/{k}: present in only one checkpoint"
            d = compare_states(a[k], b[k], f"{path}/{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = compare_states(x, y, f"{path}/{i}")
            if d:
                return d
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    if a != b or type(a) is not type(b):
        return f"{path}: {a!r} vs {b!r}"
    return None


def compare_checkpoints(a: Path, b: Path) -> str | None:
    la, lb = load_checkpoint(a), load_checkpoint(b)
    if la.step != lb.step:
        return f"manifest/step: {la.step} vs {lb.step}"
    sa, sb = la.state, lb.state
    for s in (sa, sb):
        for k in IGNORED_STATE_KEYS:
            s.pop(k, None)
        cfg = s.pop("config", {})
        s["config"] = {k: v for k, v in flatten(cfg).items() if not is_resume_safe(k)}
    return compare_states(sa, sb)


# -- command line ----------------------------------------------------------------------------


def _table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'checkpoint':<40} {'step':>8} {'epoch':>6} {'MB':>8}  result"]
    for r in results:
        name = Path(r["path"]).name
        mb = r["bytes"] / 1e6
        status = "OK" if r["ok"] else "INVALID"
        lines.append(
            f"{name:<40} {r['step'] if r['step'] is not None else '-':>8} "
            f"{r['epoch'] if r['epoch'] is not None else '-':>6} {mb:8.2f}  {status}"
        )
        for e in r["errors"]:
            lines.append(f"    error: {e}")
    ok = sum(r["ok"] for r in results)
    lines.append(f"{ok} of {len(results)} checkpoints valid")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m resilient_train.verify", description=__doc__.split("\n\n")[1])
    p.add_argument("path", type=Path, help="a checkpoint directory or a run directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--compare", type=Path, metavar="OTHER", help="compare PATH with OTHER bit for bit")
    p.add_argument("--no-model", action="store_true", help="skip rebuilding the model and encoding")
    args = p.parse_args(argv)
    if not args.path.exists():
        print(f"error: no such checkpoint or run directory: {args.path}", file=sys.stderr)
        return 2
    if args.compare is not None:
        if not args.compare.exists():
            print(f"error: no such checkpoint: {args.compare}", file=sys.stderr)
            return 2
        a, b = checkpoints_under(args.path), checkpoints_under(args.compare)
        if not a or not b:
            print("error: no committed checkpoint to compare", file=sys.stderr)
            return 2
        try:
            diff = compare_checkpoints(a[-1], b[-1])
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"a": str(a[-1]), "b": str(b[-1]), "identical": diff is None, "first_difference": diff}))
        else:
            print("identical" if diff is None else f"differ: {diff}")
        return 0 if diff is None else 1
    ckpts = checkpoints_under(args.path)
    if not ckpts:
        print(f"error: no committed checkpoints under {args.path}", file=sys.stderr)
        return 1
    results = [verify_checkpoint(c, check_model=not args.no_model) for c in ckpts]
    print(
        json.dumps({"ok": all(r["ok"] for r in results), "checkpoints": results}, indent=1)
        if args.json
        else _table(results)
    )
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
