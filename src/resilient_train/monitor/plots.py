"""Pictures of a run: the loss plot ``RUN/loss.png`` (:func:`plot_loss`) and reconstruction sample grids
(:func:`save_sample_grid`), plus :func:`finite_float`, the reading of a JSON number they and ``status`` share.

matplotlib, numpy and PIL are imported inside the functions that draw, never at module import time.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..fsio import atomic_write
from .history import _history_path, _step_ok, read_history

__all__ = [
    "finite_float",
    "plot_loss",
    "save_sample_grid",
    "PLOT_VALUE_LIMIT",
    "SAMPLE_GRID_GAP",
    "SAMPLE_GRID_MIN_FRAME_HEIGHT",
]

#: Pixels between neighbouring frames, horizontally and vertically, in :func:`save_sample_grid`.
SAMPLE_GRID_GAP = 2
#: Frames shorter than this are upscaled (nearest neighbour, integer factor) in :func:`save_sample_grid`.
SAMPLE_GRID_MIN_FRAME_HEIGHT = 64


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
        for other in ("model", "ema"):  # the weights besides the ones "best" is about (checkpoint.best_of)
            o_steps, o_vals = _series(records, "eval", f"{other}_psnr")
            if o_steps:
                ax2.plot(o_steps, o_vals, linestyle="--", marker=".", color="tab:olive", label=f"{other} weights PSNR")
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
