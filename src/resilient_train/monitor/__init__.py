"""What a user watches during a run: heartbeat, loss history, loss plot and reconstruction samples.

Owns the files a run writes for people and tools to watch, in a run directory ``RUN``:

- ``RUN/heartbeat.json`` -- :mod:`.heartbeat`: :class:`Heartbeat` rewrites it atomically every few seconds, so
  that ``python -m resilient_train.status RUN`` can tell a live run from a dead one; also
  :func:`write_side_file` and :func:`rank_dir` (``RUN/ranks/<rank>``, the per-rank side files).
- ``RUN/history.jsonl`` and its side file ``RUN/history.rejected.jsonl`` -- :mod:`.history`:
  :class:`HistoryWriter`, :func:`read_history`, :func:`truncate_history`.
- ``RUN/loss.png`` and reconstruction sample grids -- :mod:`.plots`: :func:`plot_loss`,
  :func:`save_sample_grid`, and :func:`finite_float` (a JSON number read back).

Nothing here imports torch, matplotlib or PIL at module import time: the status command stays fast.

May import: the standard library; numpy, matplotlib and PIL only lazily, inside the functions that draw;
``resilient_train.fsio`` and ``resilient_train.checkpoint.layout``. Never torch at import time, never the
trainer. All warnings are logged under the logger ``resilient_train.monitor``.
"""

from .heartbeat import HEARTBEAT_FILE, HEARTBEAT_STATUSES, Heartbeat, rank_dir, write_side_file
from .history import HISTORY_FILE, REJECTED_HISTORY_FILE, HistoryWriter, read_history, truncate_history
from .plots import PLOT_VALUE_LIMIT as PLOT_VALUE_LIMIT  # public, though never in __all__
from .plots import (
    SAMPLE_GRID_GAP,
    SAMPLE_GRID_MIN_FRAME_HEIGHT,
    finite_float,
    plot_loss,
    save_sample_grid,
)

__all__ = [
    "HEARTBEAT_FILE",
    "HISTORY_FILE",
    "REJECTED_HISTORY_FILE",
    "HEARTBEAT_STATUSES",
    "Heartbeat",
    "HistoryWriter",
    "write_side_file",
    "rank_dir",
    "read_history",
    "truncate_history",
    "finite_float",
    "plot_loss",
    "save_sample_grid",
    "SAMPLE_GRID_GAP",
    "SAMPLE_GRID_MIN_FRAME_HEIGHT",
]
