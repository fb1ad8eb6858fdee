"""What a user watches during a run: heartbeat, loss history, loss plot and reconstruction samples.

Files in a run directory ``RUN``:

- ``RUN/heartbeat.json`` -- rewritten atomically by :class:`Heartbeat` every few seconds (and once at the
  start, so a damaged one is replaced as soon as a run starts), so a reader
  (``python -m resilient_train.status RUN``) can tell a live run from a dead one.
- ``RUN/history.jsonl`` -- one JSON object with a non-negative int ``step`` per line, appended by
  :class:`HistoryWriter`. A process killed mid-write can leave a truncated last line; :func:`read_history`
  skips it silently (and warns about a bad line anywhere else). A writer reopening such a file first
  terminates the partial line, so new records never get glued onto it. When a resume cuts the history back
  (:func:`truncate_history`), bad lines are moved to ``RUN/history.rejected.jsonl``.
- ``RUN/loss.png`` -- :func:`plot_loss`.

Nothing here imports torch, matplotlib or PIL at module import time: the status command stays fast.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .checkpoint.layout import set_aside
from .fsio import atomic_write, fsync_dir

__all__ = [
    "HEARTBEAT_FILE",
    "HISTORY_FILE",
    "REJECTED_HISTORY_FILE",
    "HEARTBEAT_STATUSES",
    "Heartbeat",
    "HistoryWriter",
    "write_side_file",
    "read_history",
    "truncate_history",
    "finite_float",
    "plot_loss",
    "save_sample_grid",
    "SAMPLE_GRID_GAP",
    "SAMPLE_GRID_MIN_FRAME_HEIGHT",
]

log = logging.getLogger(__name__)

HEARTBEAT_FILE = "heartbeat.json"
HISTORY_FILE = "history.jsonl"
#: Next to a history file: the lines :func:`truncate_history` moved out of it (raw bytes, one per line).
REJECTED_HISTORY_FILE = "history.rejected.jsonl"
HEARTBEAT_STATUSES = ("running", "finished", "stopped", "failed")

#: Pixels between neighbouring frames, horizontally and vertically, in :func:`save_sample_grid`.
SAMPLE_GRID_GAP = 2
#: Frames shorter than this are upscaled (nearest neighbour, integer factor) in :func:`save_sample_grid`.
SAMPLE_GRID_MIN_FRAME_HEIGHT = 64


# --------------------------------------------------------------------------------------------------------------------
# heartbeat


class Heartbeat:
    """Rewrites ``RUN/heartbeat.json`` at most every ``interval_secs`` (unless forced).

    ``beat`` is meant to be called every step: when it does not write it only reads the monotonic clock.
    """

    def __init__(self, run_dir: str | os.PathLike, *, interval_secs: float = 10.0, max_steps: int) -> None:
        if interval_secs < 0:
            raise ValueError(f"interval_secs must be >= 0, got {interval_secs}")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / HEARTBEAT_FILE
        self.interval_secs = float(interval_secs)
        self.max_steps = int(max_steps)
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self._last_write: float | None = None  # time.monotonic() of the last write
        self._state: dict[str, Any] = {"step": 0, "epoch": 0, "latest_checkpoint": None, "last_loss": None}
        self.closed = False
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def beat(
        self,
        *,
        step: int,
        epoch: int,
        latest_checkpoint: str | None,
        last_loss: float | None,
        force: bool = False,
    ) -> bool:
        """Record progress; write the file if forced or ``interval_secs`` passed since the last write."""
        now = time.monotonic()
        self._state = {"step": step, "epoch": epoch, "latest_checkpoint": latest_checkpoint, "last_loss": last_loss}
        if not force and self._last_write is not None and now - self._last_write < self.interval_secs:
            return False
        self._write("running")
        self._last_write = now
        return True

    def close(self, status: str) -> None:
        """Write the final heartbeat with ``status`` (``finished``, ``stopped`` or ``failed``)."""
        if status not in HEARTBEAT_STATUSES:
            raise ValueError(f"status must be one of {HEARTBEAT_STATUSES}, got {status!r}")
        self._write(status)
        self._last_write = time.monotonic()
        self.closed = True

    def _write(self, status: str) -> None:
        last_loss = self._state["last_loss"]
        if last_loss is not None:
            last_loss = float(last_loss)
            if not math.isfinite(last_loss):  # keep the file strict JSON
                last_loss = None
        record = {
            "pid": self.pid,
            "host": self.host,
            "step": int(self._state["step"]),
            "epoch": int(self._state["epoch"]),
            "max_steps": self.max_steps,
            "time": time.time(),
            "status": status,
            "latest_checkpoint": self._state["latest_checkpoint"],
            "last_loss": last_loss,
        }
        write_side_file(self.path, json.dumps(record) + "\n")


def write_side_file(path: str | os.PathLike, data: bytes | str) -> None:
    """Atomically replace a run's side file (a heartbeat) whatever is there: damaged content is simply replaced,
    and a folder under the name (which a file cannot replace) is first set aside, with a warning."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        set_aside(path, "damaged")
    atomic_write(path, data)


# --------------------------------------------------------------------------------------------------------------------
# history


class HistoryWriter:
    """Appends one JSON object per line to ``RUN/history.jsonl`` (line-buffered, flushed after every record)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / HISTORY_FILE
        if self.path.is_dir() and not self.path.is_symlink():  # a file cannot be appended there: keep it, aside
            set_aside(self.path, "unreadable")
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        # A previous process killed mid-write may have left a partial line: end it, so that our first record
        # starts on a line of its own (the partial line is then skipped, with a warning, by read_history).
        if self._file.tell() > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    log.warning("%s ends with a partial line (killed mid-write?); terminating it", self.path)
                    self._file.write("\n")
                    self._file.flush()

    def write(self, record: dict[str, Any]) -> None:
        if self._file.closed:
            raise ValueError(f"HistoryWriter for {self.path} is closed")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _history_path(run_dir: str | os.PathLike) -> Path:
    p = Path(run_dir)
    return p if p.is_file() else p / HISTORY_FILE


def _step_ok(x: Any) -> bool:
    """A history record's step: a non-negative int (a bool is not one)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_line(line: bytes) -> tuple[dict[str, Any] | None, str | None, bool]:
    """``(record, None, _)`` for a good history line, else ``(None, why, cut)``.

    A good line is a UTF-8 JSON object whose ``step`` is a non-negative int. ``cut`` is true when the line is
    not JSON at all, as a write cut short leaves it (a prefix of an object is never valid JSON).
    """
    try:
        rec = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not UTF-8: {e.reason} at byte {e.start}", True
    except RecursionError:
        return None, "not JSON: nested too deep", True
    except ValueError as e:
        return None, f"not JSON: {_short(str(e))}", True
    if not isinstance(rec, dict):
        return None, f"a JSON {type(rec).__name__}, not an object", False
    if not _step_ok(rec.get("step")):
        return None, f"step {_short(repr(rec.get('step')))} is not a non-negative integer", False
    return rec, None, False


def _history_lines(raw: bytes) -> Iterator[tuple[int, bytes, bool]]:
    """``(line number, line, at_eof_without_newline)`` for each non-blank line of a history file."""
    parts = raw.split(b"\n")
    last = len(parts) - 1  # parts[last] is b"" when the file ends with a newline
    for i, line in enumerate(parts):
        if line.strip():
            yield i + 1, line, i == last


def _read_history_bytes(path: Path) -> bytes | None:
    """The file's bytes; ``None`` when absent, or (with a warning) not a regular file or unreadable."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            log.warning("history.unreadable path=%s error=not a regular file", path)
            return None
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("history.unreadable path=%s error=%s", path, e)
        return None


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All good records of ``RUN/history.jsonl`` in file order (``[]`` if the file does not exist).

    A good record is a JSON object whose ``step`` is a non-negative int; any other line is skipped. A last line
    without a newline that is not JSON (a write cut short by a kill) is skipped quietly; any other bad line with a
    warning. Never raises on the file's content (an unreadable file or a folder under the name reads as ``[]``,
    with a warning). ``run_dir`` may also be the path of the jsonl file itself.
    """
    path = _history_path(run_dir)
    raw = _read_history_bytes(path)
    if raw is None:
        return []
    records: list[dict[str, Any]] = []
    for lineno, line, at_eof in _history_lines(raw):
        rec, why, cut = _parse_line(line)
        if rec is not None:
            records.append(rec)
        elif at_eof and cut:
            log.debug("%s:%d: skipping truncated last line (%s)", path, lineno, why)
        else:
            log.warning("%s:%d: skipping bad line (%s)", path, lineno, why)
    return records


def _append_rejected(side: Path, lines: list[bytes]) -> None:
    """Append ``lines`` (raw bytes, one per line) to ``side`` and fsync it; raises ``OSError``."""
    if side.is_symlink() or (side.exists() and not side.is_file()):
        raise OSError(f"{side} is not a regular file")
    with open(side, "ab") as f:
        sep = b""
        if f.tell() > 0:  # an append cut short must not glue our first line onto its last
            with open(side, "rb") as g:
                g.seek(-1, os.SEEK_END)
                sep = b"" if g.read(1) == b"\n" else b"\n"
        f.write(sep + b"".join(line + b"\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(side.parent)


def truncate_history(run_dir: str | os.PathLike, step: int) -> int:
    """Drop history records after ``step`` (they belong to a timeline that a resume discards); return how many.

    Never raises on the file's content, so that a resume never fails on it:

    - a bad line (not UTF-8, not JSON, not a JSON object, or a ``step`` that is not a non-negative int) is
      moved: appended, as its raw bytes, to ``history.rejected.jsonl`` next to the file (fsync'd before the
      history is rewritten, so a crash can duplicate a line there but never lose one), with one warning
      ``history.rejected path=... lines=N first=LINENO moved_to=...``. If that side file cannot be written the
      bad lines stay where they are (and :func:`read_history` keeps skipping them);
    - a last line without a newline that is not JSON is a record cut short by a kill: it is dropped quietly
      (debug log), not moved. It can only be a record of a step after the checkpoint being resumed (a step's
      records are written before its checkpoint), so truncation would drop it anyway;
    - something under the name that cannot be read as a file (a folder, a FIFO, no permission) is set aside
      as ``history.jsonl.unreadable-TIME-PID`` (warned), so that the resumed run writes a fresh file.

    The file is rewritten atomically (the kept lines byte for byte, each ending in a newline) when anything is
    dropped or moved, or when it does not end with a newline; otherwise it is left as it is.
    """
    path = _history_path(run_dir)
    raw = _read_history_bytes(path)
    if raw is None:
        if os.path.lexists(path):
            try:
                set_aside(path, "unreadable")
            except OSError as e:
                log.warning("history.unreadable path=%s error=cannot set it aside: %s", path, e)
        return 0
    out: list[tuple[bytes, bool]] = []  # (line, bad) in file order, the lines to keep and the bad ones
    bad: list[tuple[int, bytes]] = []
    dropped, cut = 0, False
    for lineno, line, at_eof in _history_lines(raw):
        rec, why, is_cut = _parse_line(line)
        if rec is None:
            if at_eof and is_cut:
                log.debug("%s:%d: dropping truncated last line (%s)", path, lineno, why)
                cut = True
            else:
                log.debug("%s:%d: bad line (%s)", path, lineno, why)
                bad.append((lineno, line))
                out.append((line, True))
        elif rec["step"] > step:
            dropped += 1
        else:
            out.append((line, False))
    if not (dropped or bad or cut or raw[-1:] not in (b"\n", b"")):
        return 0
    keep_bad = False
    if bad:
        side = path.with_name(REJECTED_HISTORY_FILE)
        try:
            _append_rejected(side, [line for _, line in bad])
        except OSError as e:
            keep_bad = True
            log.warning(
                "history.rejected_kept path=%s lines=%d first=%d error=cannot write %s: %s",
                path,
                len(bad),
                bad[0][0],
                side,
                e,
            )
        else:
            log.warning("history.rejected path=%s lines=%d first=%d moved_to=%s", path, len(bad), bad[0][0], side)
    atomic_write(path, b"".join(line + b"\n" for line, is_bad in out if keep_bad or not is_bad))
    return dropped


def finite_float(x: Any) -> float | None:
    """``x`` as a float when it is a finite int or float (not a bool), else ``None``: a JSON field read back."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        x = float(x)
    except OverflowError:  # an int beyond the float range (JSON allows any number of digits)
        return None
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------------------------------
# loss plot


#: Values (losses, metrics) beyond this magnitude, and steps beyond 2**53, are left out of the plot: a float axis
#: cannot span them (matplotlib overflows), and such a value only says that the run diverged.
PLOT_VALUE_LIMIT = 1e100
_PLOT_STEP_LIMIT = 2**53


def _series(records: Iterable[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) sorted by step; a step logged twice (re-done after a resume) keeps its latest value.

    Only records with a non-negative int step (below 2**53) and a finite value of magnitude at most
    :data:`PLOT_VALUE_LIMIT` count; anything else in a record is ignored, whatever its type.
    """
    by_step: dict[int, float] = {}
    for rec in records:
        if not isinstance(rec, dict):
            continue
        rec_kind = rec.get("kind", "train" if "loss" in rec else None)
        step = rec.get("step")
        if not isinstance(rec_kind, str) or rec_kind != kind or not _step_ok(step) or step >= _PLOT_STEP_LIMIT:
            continue
        value = finite_float(rec.get(key))
        if value is not None and abs(value) <= PLOT_VALUE_LIMIT:
            by_step[step] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_loss(
    run_dir: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    marks: Sequence[tuple[int, str]] | None = None,
) -> Path:
    """Plot train loss (thin line) and validation loss (markers) against step; write ``RUN/loss.png`` by default.

    ``marks`` are ``(step, label)`` pairs drawn as dashed vertical lines, one legend entry per distinct label.
    The y axis is logarithmic when every plotted value is positive. Raises ``ValueError`` when the history has no
    records (or no finite loss to plot), and for nothing else that the history holds.
    """
    run_dir = Path(run_dir)
    hist_path = _history_path(run_dir)
    records = read_history(run_dir)
    if not records:
        raise ValueError(f"no history records in {hist_path}")
    train_steps, train_loss = _series(records, "train", "loss")
    val_steps, val_loss = _series(records, "eval", "val_loss")
    if not train_steps and not val_steps:
        raise ValueError(f"no finite train loss or val_loss in {hist_path}")

    out = Path(out_path) if out_path is not None else run_dir / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        png = _draw_loss(records, hist_path, train_steps, train_loss, val_steps, val_loss, marks)
    except (ArithmeticError, ValueError) as exc:  # a last guard: no history content may crash the caller
        raise ValueError(f"cannot plot {hist_path}: {type(exc).__name__}: {exc}") from None
    atomic_write(out, png, durable=False)
    return out


def _draw_loss(
    records: list[dict[str, Any]],
    hist_path: Path,
    train_steps: list[int],
    train_loss: list[float],
    val_steps: list[int],
    val_loss: list[float],
    marks: Sequence[tuple[int, str]] | None,
) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    psnr_steps, psnr_vals = _series(records, "eval", "psnr")
    usage_steps, usage_vals = _series(records, "eval", "codebook_usage")
    fig = Figure(figsize=(8, 7 if psnr_steps else 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if psnr_steps else 1, 1, 1)
    if psnr_steps:  # the tokenizer's validation metrics, below the losses
        ax2 = fig.add_subplot(2, 1, 2)
        ax2.plot(psnr_steps, psnr_vals, marker="o", markersize=4, color="tab:green", label="val PSNR (dB)")
        ax2.set_xlabel("step")
        ax2.set_ylabel("PSNR (dB)")
        ax2.grid(True, alpha=0.3)
        if usage_steps:
            ax3 = ax2.twinx()
            ax3.plot(usage_steps, [100 * u for u in usage_vals], marker="s", markersize=4, color="tab:purple")
            ax3.set_ylabel("codebook used (%)", color="tab:purple")
        ax2.legend(loc="best", fontsize="small")
    if train_steps:
        ax.plot(train_steps, train_loss, linewidth=0.8, color="tab:blue", label="train loss")
    if val_steps:
        ax.plot(val_steps, val_loss, linestyle="none", marker="o", markersize=5, color="tab:orange", label="val loss")
    if all(v > 0 for v in train_loss + val_loss):
        ax.set_yscale("log")

    colors = ["tab:red", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
    label_color: dict[str, str] = {}
    for step, label in marks or ():
        label = str(label)
        first = label not in label_color
        if first:
            label_color[label] = colors[len(label_color) % len(colors)]
        ax.axvline(
            step, linestyle="--", linewidth=1.0, color=label_color[label], label=label if first else "_nolegend_"
        )

    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(hist_path.parent.resolve().name)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# reconstruction samples


def _to_uint8_video(x: Any, name: str):  # -> np.ndarray (B, T, H, W, 3)
    import numpy as np

    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        arr = x.detach().float().cpu().numpy()
    else:
        arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 5:
        raise ValueError(f"{name} must be (B, C, T, H, W), got shape {tuple(arr.shape)}")
    channels = arr.shape[1]
    if channels == 1:
        arr = np.repeat(arr, 3, axis=1)
    elif channels != 3:
        raise ValueError(f"{name} must have 1 or 3 channels, got {channels}")
    arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    arr = np.clip(arr, 0.0, 1.0)
    arr = (arr * 255.0 + 0.5).astype(np.uint8)
    return arr.transpose(0, 2, 3, 4, 1)  # B, T, H, W, C


def save_sample_grid(inputs: Any, recons: Any, out_path: str | os.PathLike) -> Path:
    """Write a PNG comparing input clips with their reconstructions.

    ``inputs`` and ``recons`` are (B, C, T, H, W) tensors with values in about [0, 1] (clamped; C is 1 or 3).
    Layout: 2*B rows of T frames. Row 2*b holds the T input frames of clip b, row 2*b+1 its T reconstructed
    frames. Frames are upscaled by the integer factor ``s = ceil(64 / H)`` (nearest neighbour; ``s = 1`` when
    H >= 64) and separated by :data:`SAMPLE_GRID_GAP` (2) white pixels, with no outer border, so the image is
    ``T*W*s + (T-1)*2`` pixels wide and ``2*B*H*s + (2*B-1)*2`` pixels tall.
    """
    import numpy as np
    from PIL import Image

    x = _to_uint8_video(inputs, "inputs")
    y = _to_uint8_video(recons, "recons")
    if x.shape != y.shape:
        raise ValueError(f"inputs and recons differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    b, t, h, w, _ = x.shape
    if min(b, t, h, w) == 0:
        raise ValueError(f"empty video batch of shape {tuple(x.shape)}")
    scale = max(1, math.ceil(SAMPLE_GRID_MIN_FRAME_HEIGHT / h))
    fh, fw, gap = h * scale, w * scale, SAMPLE_GRID_GAP
    rows = 2 * b
    canvas = np.full((rows * fh + (rows - 1) * gap, t * fw + (t - 1) * gap, 3), 255, dtype=np.uint8)
    for clip in range(b):
        for r, video in enumerate((x, y)):
            top = (2 * clip + r) * (fh + gap)
            for f in range(t):
                frame = video[clip, f]
                if scale > 1:
                    frame = frame.repeat(scale, axis=0).repeat(scale, axis=1)
                left = f * (fw + gap)
                canvas[top : top + fh, left : left + fw] = frame

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    atomic_write(out, buf.getvalue(), durable=False)
    return out
