"""What a user watches during a run: heartbeat, loss history, loss plot and reconstruction samples.

Files in a run directory ``RUN``:

- ``RUN/heartbeat.json`` -- rewritten atomically by :class:`Heartbeat` every few seconds, so a reader
  (``python -m resilient_train.status RUN``) can tell a live run from a dead one.
- ``RUN/history.jsonl`` -- one JSON object per line, appended by :class:`HistoryWriter`. A process killed
  mid-write can leave a truncated last line; :func:`read_history` skips it silently (and warns about a bad
  line anywhere else). A writer reopening such a file first terminates the partial line, so new records
  never get glued onto it.
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
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .fsio import atomic_write

__all__ = [
    "HEARTBEAT_FILE",
    "HISTORY_FILE",
    "HEARTBEAT_STATUSES",
    "Heartbeat",
    "HistoryWriter",
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
        atomic_write(self.path, json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# history


class HistoryWriter:
    """Appends one JSON object per line to ``RUN/history.jsonl`` (line-buffered, flushed after every record)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / HISTORY_FILE
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


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of ``RUN/history.jsonl`` in file order (``[]`` if the file does not exist).

    An unparsable last line (a write cut short by a kill) is skipped quietly; an unparsable line elsewhere is
    skipped with a warning. ``run_dir`` may also be the path of the jsonl file itself.
    """
    path = _history_path(run_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = [(i + 1, line) for i, line in enumerate(raw.split(b"\n")) if line.strip()]
    records: list[dict[str, Any]] = []
    for idx, (lineno, line) in enumerate(lines):
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except (ValueError, UnicodeDecodeError) as e:
            if idx == len(lines) - 1:
                log.debug("%s:%d: skipping truncated last line (%s)", path, lineno, e)
            else:
                log.warning("%s:%d: skipping unparsable line (%s)", path, lineno, e)
            continue
        records.append(rec)
    return records


def truncate_history(run_dir: str | os.PathLike, step: int) -> int:
    """Drop history records after ``step`` (they belong to a timeline that a resume discards); return how many.

    The file is rewritten atomically, also when only a partial last line (a write cut short) must go.
    """
    path = _history_path(run_dir)
    if not path.exists():
        return 0
    records = read_history(path)
    kept = [r for r in records if int(r.get("step", 0)) <= step]
    if len(kept) != len(records) or path.read_bytes()[-1:] not in (b"\n", b""):
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


def finite_float(x: Any) -> float | None:
    """``x`` as a float when it is a finite int or float (not a bool), else ``None``: a JSON field read back."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------------------------------
# loss plot


def _series(records: Iterable[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) sorted by step; a step logged twice (re-done after a resume) keeps its latest value."""
    by_step: dict[int, float] = {}
    for rec in records:
        rec_kind = rec.get("kind", "train" if "loss" in rec else None)
        if rec_kind != kind or not isinstance(rec.get("step"), int):
            continue
        value = finite_float(rec.get(key))
        if value is not None:
            by_step[rec["step"]] = value
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
    records (or no finite loss to plot).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    atomic_write(out, buf.getvalue(), durable=False)
    return out


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
