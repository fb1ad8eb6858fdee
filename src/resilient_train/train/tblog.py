"""``logger=tensorboard``: every scalar of ``history.jsonl``, the sample grids and the hyperparameters, for TensorBoard.

Written by rank 0 to ``RUN/tensorboard`` with the standard ``torch.utils.tensorboard.SummaryWriter``
(the ``tensorboard`` package: ``pip install 'resilient-train[tensorboard]'``). A resumed run opens
the writer with ``purge_step`` = the checkpoint's step + 1: TensorBoard (and its reader) then
discards what the interrupted timeline logged after the checkpoint, as ``history.jsonl`` is cut, so
every step appears once and in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import flatten, to_plain
from .observers import HistoryObserver, Observer

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["TensorBoardObserver", "require_tensorboard"]

DIR = "tensorboard"


def require_tensorboard() -> None:
    """Refuse ``logger=tensorboard`` at start-up when the package is missing (nothing is installed at run time)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError(
            "logger=tensorboard needs the tensorboard package: pip install 'resilient-train[tensorboard]' "
            "(or tensorboard), or set logger=none"
        ) from None


class TensorBoardObserver(Observer):
    def __init__(self) -> None:
        self.writer: Any = None
        self.rollbacks = 0

    def on_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        step = trainer.counters.step
        self.writer = SummaryWriter(log_dir=str(trainer.run_dir / DIR), purge_step=step + 1)
        if step == 0:
            self._hparams(trainer)

    def _hparams(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = flatten(to_plain(trainer.cfg))
        values = {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}
        values.update({k: str(v) for k, v in flat.items() if k not in values and v is not None})
        for summary in hparams(values, {"val/val_loss": float("nan")}):
            self.writer.file_writer.add_summary(summary)

    def on_step(self, trainer: Trainer, record: dict[str, Any]) -> None:
        step, w = record["step"], self.writer
        for key in HistoryObserver.TRAIN_KEYS:
            if record.get(key) is not None:
                w.add_scalar(f"train/{key}", record[key], step)
        if record.get("val_loss") is not None:
            for key, value in {"val_loss": record["val_loss"], **trainer.last_eval}.items():
                if isinstance(value, (int, float)):
                    w.add_scalar(f"val/{key}", value, step)
            grid = trainer.run_dir / "samples" / f"step_{step:08d}.png"
            if grid.is_file():
                import numpy as np
                from PIL import Image

                w.add_image("samples", np.asarray(Image.open(grid).convert("RGB")), step, dataformats="HWC")
        w.flush()

    def on_rollback(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """As at a resume: reopened with ``purge_step`` after the restored step, so replayed steps appear once."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        self.writer = SummaryWriter(log_dir=str(trainer.run_dir / DIR), purge_step=record["step"] + 1)
        self.rollbacks += 1
        self.writer.add_scalar("faults/rollbacks", self.rollbacks, record["fault_step"])
        self.writer.flush()

    def on_end(self, trainer: Trainer, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
