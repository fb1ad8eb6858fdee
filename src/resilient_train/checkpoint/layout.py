"""Where checkpoints live in a run directory, and how to recognise them. Torch-free.

::

    RUN/checkpoints/step_00000120/manifest.json   a committed checkpoint (the manifest is written last)
    RUN/checkpoints/best.json                     {"step", "path", "val_loss"}: the best checkpoint
    RUN/checkpoints/.tmp-*  .trash-*              leftovers of an interrupted save or delete

The manager, the CLI, ``verify``, ``status`` and the chaos orchestrator all read the layout
through this module, so that none of them needs torch to find a checkpoint.

``best.json`` is a side file: :func:`read_best` returns ``None`` for a damaged one (so no reader
trips over it), :func:`check_best` says what is wrong with it, and :func:`rebuild_best` (called
once at start-up, by the run's writer) rewrites it from the committed checkpoints' manifests, so
that retention never purges the best checkpoint because its pointer was damaged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

from ..fsio import TMP_PREFIX, atomic_write, fsync_dir

__all__ = [
    "CHECKPOINTS_DIR",
    "MANIFEST",
    "BEST_POINTER",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "SAVE_PHASES",
    "UPLOAD_PHASE",
    "HOOK_PHASES",
    "step_dir_name",
    "parse_step",
    "committed",
    "is_checkpoint_dir",
    "checkpoints_under",
    "read_best",
    "check_best",
    "rebuild_best",
    "read_small_json",
    "set_aside",
    "MAX_POINTER_BYTES",
    "MAX_MANIFEST_BYTES",
]

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
BEST_POINTER = "best.json"
TRASH_PREFIX = ".trash-"
#: Stages of a save, in order; the manager calls its save hooks (chaos, the tests' hold) at each one.
SAVE_PHASES = ("files_partial", "files_written", "before_rename", "after_rename")
#: The phase the uploader reports once a checkpoint's files are on the store and before its manifest
#: (``checkpoint.remote`` only; a kill there leaves an uncommitted upload).
UPLOAD_PHASE = "uploading"
#: Every phase a save hook is told: the save's own, then the upload's.
HOOK_PHASES = (*SAVE_PHASES, UPLOAD_PHASE)
_STEP_RE = re.compile(r"step_([0-9]{8})")
#: A ``best.json`` larger than this is damaged (a real one is under 100 bytes); it is never read.
MAX_POINTER_BYTES = 1 << 20
#: A ``manifest.json`` larger than this is refused without being read (a real one is a few KiB).
MAX_MANIFEST_BYTES = 16 << 20


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a committed checkpoint's folder name, ``None`` for any other name."""
    m = _STEP_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def committed(root: str | os.PathLike) -> list[Path]:
    """Committed checkpoint folders under ``root``, oldest first; temporaries and set-aside ones are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in root.iterdir() if p.is_dir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` names one checkpoint (rather than a run directory or a ``checkpoints`` folder); never a
    temporary or set-aside folder (``.tmp-*``, ``.trash-*``), even one that holds a manifest."""
    path = Path(path)
    if path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
        return False
    return (path / MANIFEST).exists() or path.name.startswith("step_")


def checkpoints_under(path: str | os.PathLike) -> list[Path]:
    """``[path]`` for a checkpoint; every committed checkpoint for a run directory or its ``checkpoints``.

    A temporary folder of an interrupted save (``.tmp-*``) or delete (``.trash-*``) is refused with ``ValueError``:
    no reader trusts it."""
    path = Path(path)
    if path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
        raise ValueError(
            f"{path}: an uncommitted temporary folder left by an interrupted save or delete, not a checkpoint; "
            f"pass the run directory ({path.parent.parent}) or a committed step_* folder"
        )
    if is_checkpoint_dir(path):
        return [path]
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    return committed(root)


def read_small_json(path: str | os.PathLike, max_bytes: int) -> Any:
    """The JSON value in a small regular file, read at most once and never past ``max_bytes``.

    Raises ``FileNotFoundError`` when ``path`` does not exist and ``ValueError`` (its message says why) for
    anything else: not a regular file (a folder, a FIFO that would block), larger than ``max_bytes`` (checked
    with ``os.stat`` before reading), unreadable, not UTF-8, not JSON, nested too deep for the parser.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise ValueError(f"cannot stat: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")
    if st.st_size > max_bytes:
        raise ValueError(f"{st.st_size} bytes, over the {max_bytes}-byte limit")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ValueError(f"cannot read: {exc}") from None
    if len(raw) > max_bytes:  # grew since the stat
        raise ValueError(f"over the {max_bytes}-byte limit")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ValueError("not JSON (nested too deep)") from None
    except ValueError as exc:
        raise ValueError(f"not JSON ({_short(str(exc))})") from None


def set_aside(path: str | os.PathLike, reason: str, event: str = "side_file.set_aside") -> Path:
    """Rename ``path`` (a checkpoint folder, a damaged side file, a folder where a file belongs) to
    ``NAME.REASON-TIME-PID[-N]``, durably, and log ``event``.

    Evidence is kept, never deleted; the caller can then write a fresh file under the name. Raises ``OSError``.
    """
    path = Path(path)
    base = f"{path.name}.{reason}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    target, n = path.with_name(base), 0
    while os.path.lexists(target):  # set aside twice within a second: never rename onto the first one
        n += 1
        target = path.with_name(f"{base}-{n}")
    os.rename(path, target)
    fsync_dir(path.parent)
    log.warning("%s path=%s to=%s reason=%s", event, path, target.name, reason)
    return target


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _step_ok(x: Any) -> bool:
    """A step as JSON stores it: a non-negative int (a bool is not)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        x = float(x)
    except OverflowError:  # an int too large for a float
        return None
    return x if math.isfinite(x) else None


def _pointer_shape_problem(best: Any) -> str | None:
    """What is wrong with a parsed best pointer's fields, or ``None``."""
    if not isinstance(best, dict):
        return f"not a JSON object (a JSON {type(best).__name__})"
    step = best.get("step")
    if not _step_ok(step):
        return f"step {_short(repr(step))} is not a non-negative integer"
    if best.get("path") != step_dir_name(step):
        return f"path {_short(repr(best.get('path')))} is not {step_dir_name(step)!r}"
    if _finite(best.get("val_loss")) is None:
        return f"val_loss {_short(repr(best.get('val_loss')))} is not a finite number"
    return None


def read_best(root: str | os.PathLike) -> dict[str, Any] | None:
    """The best pointer under a ``checkpoints`` folder; ``None`` when absent, unreadable or malformed (logged).

    A pointer is returned only when it is a JSON object whose ``step`` is a non-negative int, whose ``path`` is
    that step's folder name and whose ``val_loss`` is a finite number (whether the folder exists is not
    checked here: see :func:`check_best`).
    """
    path = Path(root) / BEST_POINTER
    try:
        best = read_small_json(path, MAX_POINTER_BYTES)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        log.warning("ckpt.best_pointer_unreadable path=%s error=%s", path, exc)
        return None
    problem = _pointer_shape_problem(best)
    if problem is not None:
        log.warning("ckpt.best_pointer_unreadable path=%s error=%s", path, problem)
        return None
    return best


def check_best(root: str | os.PathLike, *, expected: bool = False) -> str | None:
    """What is wrong with ``root/best.json``, or ``None`` when it is fine (or absent and not ``expected``).

    Damaged: unreadable (not a regular file, over :data:`MAX_POINTER_BYTES`, not UTF-8 JSON), not a JSON
    object, ``step`` not a non-negative int, ``path`` not ``step_dir_name(step)``, that folder not a committed
    checkpoint (a ``step_`` folder holding ``manifest.json``), ``val_loss`` not a finite number. With
    ``expected``, an absent ``best.json`` counts as damaged (``"missing"``).
    """
    root = Path(root)
    try:
        best = read_small_json(root / BEST_POINTER, MAX_POINTER_BYTES)
    except FileNotFoundError:
        return "missing" if expected else None
    except ValueError as exc:
        return f"unreadable: {exc}"
    problem = _pointer_shape_problem(best)
    if problem is not None:
        return problem
    try:
        is_committed = (root / best["path"] / MANIFEST).is_file()
    except OSError:
        is_committed = False
    if not is_committed:
        return f"{best['path']} is not a committed checkpoint"
    return None


def _manifest_val_loss(folder: Path, step: int) -> tuple[float | None, str | None]:
    """The finite ``val_loss`` a committed checkpoint's manifest records (``None`` if none, damage skipped), and
    the weights it is of (``val_weights``: ``ema`` or ``model``; ``None`` in manifests written before it)."""
    path = folder / MANIFEST
    try:
        manifest = read_small_json(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:  # never committed (a damaged or partial copy): not a candidate
        return None, None
    except ValueError as exc:
        log.warning("ckpt.best_rebuild_skip path=%s error=%s", path, exc)
        return None, None
    if not isinstance(manifest, dict) or manifest.get("step") != step or not _step_ok(manifest.get("step")):
        log.warning("ckpt.best_rebuild_skip path=%s error=manifest is not an object of step %d", path, step)
        return None, None
    weights = manifest.get("val_weights")
    return _finite(manifest.get("val_loss")), weights if weights in ("ema", "model") else None


def _best_from_manifests(root: Path) -> tuple[int, float, str | None] | None:
    """(step, val_loss, weights) of the committed checkpoint with the lowest finite val_loss, the earliest on a tie."""
    try:
        folders = committed(root)
    except OSError as exc:
        log.warning("ckpt.best_rebuild_skip path=%s error=%s", root, exc)
        return None
    best: tuple[float, int, str | None] | None = None
    for folder in folders:
        step = parse_step(folder.name)
        loss, weights = _manifest_val_loss(folder, step)
        if loss is not None and (best is None or (loss, step) < best[:2]):
            best = (loss, step, weights)
    return None if best is None else (best[1], best[0], best[2])


def _clear_pointer(path: Path) -> None:
    """Remove a damaged best.json: unlink a file (or link), set aside anything else (a folder)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            set_aside(path, "damaged")
        else:
            path.unlink()
            fsync_dir(path.parent)
    except FileNotFoundError:
        pass


def rebuild_best(root: str | os.PathLike, *, expected: bool = False) -> dict[str, Any] | None:
    """Make ``root/best.json`` (``root`` is a ``checkpoints`` folder) a valid pointer again; return the pointer.

    Nothing is written when :func:`check_best` finds nothing wrong: the pointer (or ``None`` when absent) is
    returned. Otherwise (pass ``expected=True`` when the run keeps a best pointer, so that an absent one is
    rebuilt too) the committed checkpoints' ``manifest.json`` files are read (each refused unread over
    :data:`MAX_MANIFEST_BYTES`; a damaged one, or one whose ``step`` is not its folder's, is skipped with a
    warning) and the one with the lowest finite ``val_loss`` wins, the earliest step on a tie (as the trainer
    counts an improvement only when strictly lower). ``best.json`` is replaced atomically with
    ``{"step", "path", "val_loss"[, "weights"]}``, as :meth:`CheckpointManager.set_best` writes it, and
    ``ckpt.best_rebuilt was=<what was wrong> step=N`` is logged. When no manifest records a finite val_loss
    the damaged ``best.json`` is removed (a folder under that name is set aside), logged, and ``None`` is
    returned. Never raises: a failed write or removal is logged as ``ckpt.best_rebuild_failed``.
    """
    root = Path(root)
    problem = check_best(root, expected=expected)
    if problem is None:
        return read_best(root)
    path = root / BEST_POINTER
    found = _best_from_manifests(root)
    try:
        if found is None:
            if problem != "missing":
                _clear_pointer(path)
                log.warning("ckpt.best_removed was=%r path=%s reason=no checkpoint records a val_loss", problem, path)
            return None
        step, val_loss, weights = found
        pointer = {"step": step, "path": step_dir_name(step), "val_loss": val_loss} | (
            {"weights": weights} if weights else {}
        )
        if os.path.isdir(path) and not os.path.islink(path):  # a file cannot replace a folder
            set_aside(path, "damaged")
        atomic_write(path, json.dumps(pointer).encode())
    except OSError as exc:
        log.error("ckpt.best_rebuild_failed path=%s was=%r error=%s", path, problem, exc)
        return None
    log.warning("ckpt.best_rebuilt was=%r step=%d path=%s val_loss=%.6g", problem, step, pointer["path"], val_loss)
    return pointer
