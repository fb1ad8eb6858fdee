"""``python -m resilient_train.status RUN_DIR [--json] [--stale-after SECS]``: is this run alive, and how far is it?

Reads ``RUN/heartbeat.json`` and ``RUN/history.jsonl`` (see :mod:`resilient_train.monitor`). States:

- ``finished`` / ``stopped`` / ``failed``: the heartbeat says so (the trainer wrote its final heartbeat);
- ``running``: the heartbeat says running, its pid is alive (checked only when the heartbeat was written on this
  host) and it is younger than ``--stale-after`` seconds;
- ``stale``: it says running but the pid is gone or the heartbeat is too old (``reason`` says which).

Exit status: 0 for running/finished, 1 for stale/stopped/failed, 2 when RUN_DIR or its heartbeat is missing.

Every side file is read defensively: a heartbeat over 1 MiB (checked before reading), not a regular file, or
not a JSON object is reported as a :class:`StatusError` (exit 2); a field of the wrong type reads as unknown
(``null``); bad history lines and a damaged ``best.json`` are skipped. No content makes the command fail with
a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from resilient_train.checkpoint.layout import CHECKPOINTS_DIR, committed, read_best, read_small_json
from resilient_train.checkpoint.manifest import CheckpointError
from resilient_train.checkpoint.store import is_remote_url
from resilient_train.monitor import HEARTBEAT_FILE, HISTORY_FILE, finite_float, read_history

__all__ = ["StatusError", "run_status", "format_status", "pid_alive", "main"]

_OK_STATES = ("running", "finished")
#: A heartbeat (ours are about 250 bytes) larger than this is refused without being read.
MAX_HEARTBEAT_BYTES = 1 << 20


class StatusError(Exception):
    """The directory is not a readable run directory (missing, or no heartbeat)."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone; no permission counts as alive)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:  # 0 and negatives address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):  # OverflowError: a pid beyond the C type
        return False
    try:  # Linux: an exited but unreaped child still answers kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2 :].startswith("Z"):
            return False
    except (OSError, ValueError):
        pass
    return True


def _latest_step_dir(run_dir: Path) -> str | None:
    try:
        found = committed(run_dir / CHECKPOINTS_DIR)
    except OSError:
        return None
    return found[-1].name if found else None


def run_status(run_dir: str | os.PathLike, stale_after: float = 120.0) -> dict[str, Any]:
    """Summarise a run directory as a JSON-able dict. Raises :class:`StatusError` if it is not a run directory.

    Keys: run_dir, state, reason, exit_code, heartbeat_status, pid, host, pid_alive, step, max_steps, epoch,
    last_train_loss, last_train_step, last_val_loss, last_val_step, latest_checkpoint, best_checkpoint,
    heartbeat_time, heartbeat_age_secs, stale_after_secs.
    """
    # Long on purpose: one reader per field of the status, each tolerant of hostile content.
    run = Path(run_dir)
    if not run.is_dir():
        raise StatusError(f"run directory {str(run)!r} does not exist")
    hb_path = run / HEARTBEAT_FILE
    try:
        hb = read_small_json(hb_path, MAX_HEARTBEAT_BYTES)
    except FileNotFoundError:
        raise StatusError(f"no heartbeat at {hb_path} (is {str(run)!r} a run directory?)") from None
    except ValueError as e:
        raise StatusError(f"cannot read heartbeat {hb_path}: {e}") from None
    if not isinstance(hb, dict):
        raise StatusError(f"heartbeat {hb_path} is not a JSON object")

    now = time.time()
    hb_time = finite_float(hb.get("time"))
    age = None if hb_time is None else round(now - hb_time, 1)
    pid = _count(hb.get("pid"), low=1)
    host = _text(hb.get("host"))
    same_host = host is None or host == socket.gethostname()
    alive: bool | None = pid_alive(pid) if (pid is not None and same_host) else None

    hb_status = _text(hb.get("status"))
    reasons: list[str] = []
    if hb_status in ("finished", "stopped", "failed"):
        state = hb_status
    elif hb_status == "running":
        if pid is None:
            reasons.append("heartbeat has no pid")
        elif alive is False:
            reasons.append(f"pid {pid} is gone")
        if age is None:
            reasons.append("heartbeat has no time")
        elif age > stale_after:
            reasons.append(f"heartbeat {age:.0f} s old (stale after {stale_after:g} s)")
        state = "stale" if reasons else "running"
        if not reasons and alive is None:
            reasons.append(f"pid not checked: heartbeat written on host {host!r}")
    else:
        state = "stale"
        raw_status = repr(hb.get("status"))
        reasons.append(f"unknown heartbeat status {raw_status if len(raw_status) <= 60 else raw_status[:57] + '...'}")

    last_train = last_eval = None
    for rec in read_history(run / HISTORY_FILE):  # only records with a non-negative int step
        kind = rec.get("kind", "train" if "loss" in rec else None)
        if kind == "train":
            last_train = rec
        elif kind == "eval":
            last_eval = rec

    best = read_best(run / CHECKPOINTS_DIR)
    return {
        "ranks": _ranks(run, host),
        "run_dir": str(run.resolve()),
        "state": state,
        "reason": "; ".join(reasons) or None,
        "exit_code": 0 if state in _OK_STATES else 1,
        "heartbeat_status": hb_status,
        "pid": pid,
        "host": host,
        "pid_alive": alive,
        "step": _count(hb.get("step")),
        "max_steps": _count(hb.get("max_steps")),
        "epoch": _count(hb.get("epoch")),
        "last_train_loss": finite_float(last_train.get("loss")) if last_train else finite_float(hb.get("last_loss")),
        "last_train_step": last_train.get("step") if last_train else None,
        "scaler": _scaler(last_train),
        "last_val_loss": finite_float(last_eval.get("val_loss")) if last_eval else None,
        "last_val_step": last_eval.get("step") if last_eval else None,
        "last_eval_metrics": {k: finite_float(last_eval.get(k)) for k in EVAL_METRICS if k in last_eval}
        if last_eval
        else {},
        "other_eval": _other_eval(last_eval),
        "latest_checkpoint": _text(hb.get("latest_checkpoint")) or _latest_step_dir(run),
        "best_checkpoint": best,
        "upload": _upload(hb.get("upload")),
        "faults": _faults(hb.get("faults")),
        "hangs": sorted(p.name for p in (run / "hangs").glob("*.txt"))[-20:] if (run / "hangs").is_dir() else [],
        "heartbeat_time": hb_time,
        "heartbeat_age_secs": age,
        "stale_after_secs": stale_after,
    }


def _upload(u: Any) -> dict[str, Any] | None:
    """The heartbeat's object-store side, read defensively: url, newest step there, backlog, last error."""
    if not isinstance(u, dict):
        return None
    return {
        "url": _text(u.get("url")),
        "newest_step": _count(u.get("newest_step")),
        "backlog": _count(u.get("backlog")),
        "last_error": _text(u.get("last_error")),
    }


def _scaler(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    """``16-mixed``: the generator's loss scale and the steps each optimizer skipped, from the last train record."""
    skipped = rec.get("skipped") if rec else None
    if not isinstance(skipped, dict):
        return None
    return {"scale": finite_float(rec.get("scale")), "skipped": {k: _count(skipped.get(k)) for k in ("gen", "discr")}}


def _faults(f: Any) -> dict[str, Any] | None:
    """The heartbeat's recovery side, read defensively: rollbacks (and the latest), failed saves (and the latest)."""
    if not isinstance(f, dict):
        return None
    last = f.get("last_rollback") if isinstance(f.get("last_rollback"), dict) else {}
    return {
        "rollbacks": _count(f.get("rollbacks")) or 0,
        "last_rollback": {k: _count(last.get(k)) for k in ("fault_step", "to_step")} | {"kind": _text(last.get("kind"))}
        if last
        else None,
        "save_failures": _count(f.get("save_failures")) or 0,
        "last_save_error": _text(f.get("last_save_error")),
    }


def _fmt_faults(f: dict[str, Any]) -> str:
    text = f"{f['rollbacks']} rollback(s)"
    if f["last_rollback"]:
        r = f["last_rollback"]
        text += f" (last: {r['kind']} at step {r['fault_step']}, back to step {r['to_step']})"
    text += f", {f['save_failures']} failed save(s)"
    return text + (f" (last: {f['last_save_error'][:200]})" if f["last_save_error"] else "")


def _fmt_upload(u: dict[str, Any] | None) -> str:
    if u is None:
        return "-"
    text = f"{u['url']}: newest step {u['newest_step'] if u['newest_step'] is not None else '-'}"
    text += f", {u['backlog']} waiting" if u["backlog"] else ", none waiting"
    return text + (f"; last error: {u['last_error'][:200]}" if u["last_error"] else "")


def remote_status(url: str) -> dict[str, Any]:
    """What a store holds under ``url``: every checkpoint folder, committed or not, and the newest committed."""
    from .checkpoint.fetch import remote_listing

    store, found = remote_listing(url)
    rows = [
        {"name": c.name, "step": c.step, "committed": c.committed, "problem": c.invalid or c.problem} for c in found
    ]
    done = [r for r in rows if r["committed"]]
    return {"url": store.url, "checkpoints": rows, "newest_committed": done[-1]["name"] if done else None}


def format_remote(r: dict[str, Any]) -> str:
    lines = [f"store:       {r['url']}", f"newest:      {r['newest_committed'] or '-'}"]
    for c in r["checkpoints"]:
        lines.append(f"  {c['name']}  " + ("committed" if c["committed"] else f"not committed: {c['problem']}"))
    return "\n".join(lines)


#: The metrics of an evaluation record shown beside the validation loss (see resilient_train.metrics).
EVAL_METRICS = ("psnr", "ssim", "mse", "codebook_usage", "codebook_perplexity")


def _other_eval(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The evaluation of the weights besides the ones "best" is about (``model_psnr`` ...): their name and metrics."""
    for name in ("model", "ema"):
        if rec and f"{name}_val_loss" in rec:
            keys = ("val_loss", *EVAL_METRICS)
            return {"weights": name} | {k: finite_float(rec.get(f"{name}_{k}")) for k in keys if f"{name}_{k}" in rec}
    return None


def _fmt_other(o: dict[str, Any]) -> str:
    loss = o.get("val_loss")
    return ("-" if loss is None else f"loss {loss:.6g}") + ", " + _fmt_metrics(o)


def _fmt_metrics(m: dict[str, Any]) -> str:
    parts = []
    if m.get("psnr") is not None:
        parts.append(f"PSNR {m['psnr']:.2f} dB")
    if m.get("ssim") is not None:
        parts.append(f"SSIM {m['ssim']:.4f}")
    if m.get("codebook_usage") is not None:
        parts.append(f"codebook {100 * m['codebook_usage']:.1f}% used")
    if m.get("codebook_perplexity") is not None:
        parts.append(f"perplexity {m['codebook_perplexity']:.1f}")
    return ", ".join(parts) or "-"


def _count(x: Any, low: int = 0) -> int | None:
    """``x`` when it is an int (not a bool) of at least ``low``, else ``None``: a heartbeat's counter read back."""
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= low else None


def _text(x: Any) -> str | None:
    return x if isinstance(x, str) else None


def _ranks(run: Path, host: Any) -> list[dict[str, Any]]:
    """Under torchrun: every rank's own heartbeat (``ranks/<r>/heartbeat.json``), with its pid checked.

    A rank whose heartbeat is missing, unreadable, over 1 MiB or not a JSON object is left out; a field of the
    wrong type reads as ``None``."""
    out = []
    root = run / "ranks"
    try:
        dirs = [p for p in root.iterdir() if p.name.isascii() and p.name.isdigit()] if root.is_dir() else []
    except OSError:
        return []
    for d in sorted(dirs, key=lambda p: int(p.name)):
        try:
            beat = read_small_json(d / "heartbeat.json", MAX_HEARTBEAT_BYTES)
        except (FileNotFoundError, ValueError):
            continue
        if not isinstance(beat, dict):
            continue
        pid = _count(beat.get("pid"), low=1)
        alive = pid_alive(pid) if pid is not None and host in (None, socket.gethostname()) else None
        out.append(
            {
                "rank": _count(beat.get("rank")),
                "pid": pid,
                "step": _count(beat.get("step")),
                "restart": _count(beat.get("restart")),
                "status": _text(beat.get("status")),
                "pid_alive": alive,
            }
        )
    return out


def _fmt_loss(value: float | None, step: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" + (f" (step {step})" if step is not None else "")


def format_status(s: dict[str, Any]) -> str:
    """The human-readable summary printed by ``main``."""
    state = s["state"] + (f" ({s['reason']})" if s["reason"] else "")
    pid = "-" if s["pid"] is None else f"{s['pid']}" + (f" on {s['host']}" if s["host"] else "")
    step = f"{s['step']}/{s['max_steps']}" if s["max_steps"] is not None else f"{s['step']}"
    best = s["best_checkpoint"]
    if best:
        best_txt = str(best.get("path", "-"))
        if finite_float(best.get("val_loss")) is not None:
            weights = f", {best['weights']} weights" if best.get("weights") in ("ema", "model") else ""
            best_txt += f" (val_loss {best['val_loss']:.6g}, step {best.get('step')}{weights})"
    else:
        best_txt = "-"
    age = "-" if s["heartbeat_age_secs"] is None else f"{s['heartbeat_age_secs']:.1f} s ago"
    rows = [
        ("run", s["run_dir"]),
        ("state", state),
        ("pid", pid),
        ("step", step),
        ("epoch", "-" if s["epoch"] is None else str(s["epoch"])),
        ("train loss", _fmt_loss(s["last_train_loss"], s["last_train_step"])),
        ("val loss", _fmt_loss(s["last_val_loss"], s["last_val_step"])),
        ("val metrics", _fmt_metrics(s.get("last_eval_metrics") or {})),
        *[(f"val ({o['weights']})", _fmt_other(o)) for o in [s.get("other_eval")] if o],
        ("latest ckpt", s["latest_checkpoint"] or "-"),
        ("best ckpt", best_txt),
        ("heartbeat", age),
    ]
    if s.get("upload") is not None:
        rows.insert(-1, ("uploads", _fmt_upload(s["upload"])))
    if s.get("scaler") is not None:
        sc = s["scaler"]
        skipped = ", ".join(f"{k} {v}" for k, v in sc["skipped"].items())
        scale = "-" if sc["scale"] is None else f"{sc['scale']:g}"
        rows.insert(-1, ("fp16 scaler", f"scale {scale}, steps skipped (inf/NaN gradients): {skipped}"))
    if s.get("faults") is not None:
        rows.insert(-1, ("faults", _fmt_faults(s["faults"])))
    if s.get("hangs"):
        rows.insert(-1, ("hangs", f"{len(s['hangs'])} (stacks in hangs/: {', '.join(s['hangs'][-3:])})"))
    for r in s.get("ranks", []):
        alive = {True: "alive", False: "gone", None: "not checked"}[r["pid_alive"]]
        rows.append(
            (f"rank {r['rank']}", f"{r['status']} step {r['step']}, pid {r['pid']} ({alive}), restart {r['restart']}")
        )
    return "\n".join(f"{k + ':':<13}{v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resilient_train.status", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "run_dir", help="run directory (holds heartbeat.json, history.jsonl, checkpoints/), or a store URL"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--stale-after", type=float, default=120.0, metavar="SECS", help="heartbeat age that counts as stale"
    )
    args = parser.parse_args(argv)
    if not args.stale_after > 0:
        parser.error("--stale-after must be > 0")
    if is_remote_url(args.run_dir):
        try:
            r = remote_status(args.run_dir)
        except CheckpointError as e:  # a StoreError: the URL and what the store answered
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(r) if args.json else format_remote(r))
        return 0 if r["newest_committed"] else 1
    try:
        s = run_status(args.run_dir, stale_after=args.stale_after)
    except StatusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s) if args.json else format_status(s))
    return s["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
