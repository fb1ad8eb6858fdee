"""``python -m resilient_train.verify PATH [--json] [--compare OTHER] [--no-model]``

PATH is a checkpoint directory or a run directory (then every committed checkpoint in it), or a
store URL (``s3://bucket/prefix``: every checkpoint there, downloaded to a temporary folder;
``.../step_N``: that one; an upload that did not finish is listed as not committed). For
each checkpoint, exactly what a resume checks before it trusts one: manifest, presence, sizes
(before reading) and hashes of every file; safe loading (safetensors and JSON only); then the
content (:mod:`resilient_train.resume.checks`): the saved config valid, counters that agree (manifest
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
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, verify_files
from .checkpoint.compare import compare_checkpoints, compare_states
from .checkpoint.fetch import fetched
from .checkpoint.layout import checkpoints_under
from .checkpoint.store import StoreError, is_remote_url
from .config import saved_config, to_plain
from .resume.checks import check_checkpoint

__all__ = ["verify_checkpoint", "compare_checkpoints", "compare_states", "checkpoints_under", "main"]


def verify_checkpoint(ckpt: Path, *, check_model: bool = True) -> dict[str, Any]:
    """Every check on one checkpoint; returns a result dict with ``ok`` and ``errors``.

    The files (:func:`verify_files`) and their content (:func:`~resilient_train.resume.checks.check_checkpoint`)
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

    from .tokenizer.model import build_model

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


def _remote_results(url: str, stack: ExitStack, check_model: bool) -> list[dict[str, Any]]:
    """Every checkpoint a store URL names: downloaded and verified, or INVALID with why it is not committed."""
    results = []
    for item in stack.enter_context(fetched(url)):
        if item.path is None:
            results.append(
                {
                    "path": item.url,
                    "ok": False,
                    "step": item.remote.step,
                    "epoch": None,
                    "bytes": 0,
                    "errors": [f"{item.url}: not committed: {item.problem}"],
                    "checks": [],
                }
            )
            continue
        result = verify_checkpoint(item.path, check_model=check_model)
        result["path"] = item.url
        results.append(result)
    return results


def _newest(where: str, stack: ExitStack) -> Path | None:
    """The newest committed checkpoint under a local path or a store URL (downloaded for the comparison)."""
    if is_remote_url(where):
        items = stack.enter_context(fetched(where, newest_only=True))
        return items[-1].path if items else None
    found = checkpoints_under(Path(where))
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m resilient_train.verify", description=__doc__.split("\n\n")[1])
    p.add_argument("path", help="a checkpoint directory, a run directory, or a store URL (s3://bucket/prefix[/step_N])")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--compare", metavar="OTHER", help="compare PATH with OTHER (a folder or a URL) bit for bit")
    p.add_argument("--no-model", action="store_true", help="skip rebuilding the model and encoding")
    args = p.parse_args(argv)
    for where in (args.path, args.compare):
        if where is not None and not is_remote_url(where) and not Path(where).exists():
            print(f"error: no such checkpoint or run directory: {where}", file=sys.stderr)
            return 2
    try:
        with ExitStack() as stack:
            if args.compare is not None:
                return _compare(args, stack)
            if is_remote_url(args.path):
                results = _remote_results(args.path, stack, not args.no_model)
            else:
                results = [
                    verify_checkpoint(c, check_model=not args.no_model) for c in checkpoints_under(Path(args.path))
                ]
    except (StoreError, ValueError) as exc:  # ValueError: not a checkpoint (a temporary folder)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not results:
        print(f"error: no committed checkpoints under {args.path}", file=sys.stderr)
        return 1
    print(
        json.dumps({"ok": all(r["ok"] for r in results), "checkpoints": results}, indent=1)
        if args.json
        else _table(results)
    )
    return 0 if all(r["ok"] for r in results) else 1


def _compare(args: argparse.Namespace, stack: ExitStack) -> int:
    a, b = _newest(args.path, stack), _newest(args.compare, stack)
    if a is None or b is None:
        print("error: no committed checkpoint to compare", file=sys.stderr)
        return 2
    try:
        diff = compare_checkpoints(a, b)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"a": str(a), "b": str(b), "identical": diff is None, "first_difference": diff}))
    else:
        print("identical" if diff is None else f"differ: {diff}")
    return 0 if diff is None else 1


if __name__ == "__main__":
    sys.exit(main())
