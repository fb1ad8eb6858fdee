"""What to evaluate, and when: the validation loss and metrics of the trained weights and of their EMA.

Every ``trainer.eval_every_n_steps`` and at the last step; with ranks, rank 0 evaluates and the
others receive its result, so every rank takes the same "improved" decision. The weights
``checkpoint.best_of`` names (:attr:`Evaluator.weights`: ``ema``, or ``model`` when EMA is off) give
the plain names (``val_loss``, ``psnr``, ...): what "best" is chosen on and ``export`` writes by
default; the other weights' metrics carry their name as a prefix (``model_val_loss``, ``model_psnr``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..config import TrainConfig
from ..data.loader import build_loader
from ..dist import Group
from ..monitor import save_sample_grid
from ..tokenizer.metrics import Reconstruction

__all__ = ["Evaluator"]


class Evaluator:
    """``val_loss`` and the reconstruction and codebook metrics on the first ``trainer.eval_batches`` batches."""

    def __init__(self, cfg: TrainConfig, val_ds: Dataset, device: torch.device, run_dir: Path, group: Group) -> None:
        self.cfg, self.val_ds, self.device, self.run_dir, self.group = cfg, val_ds, device, Path(run_dir), group
        ema = cfg.trainer.ema.enabled
        #: The weights the plain metric names (and "best") are about.
        self.weights = cfg.checkpoint.best_of if ema else "model"

    def due(self, step: int) -> bool:
        t = self.cfg.trainer
        return step % t.eval_every_n_steps == 0 or step == t.max_steps

    def run(self, model: torch.nn.Module, ema: torch.nn.Module | None, step: int) -> dict[str, float]:
        """Rank 0 evaluates the trained weights and their EMA (sample grids of :attr:`weights` under
        ``RUN/samples``); every rank gets the metrics (the other weights' with their name as a prefix)."""
        return self.group.broadcast(self._both(model, ema, step) if self.group.is_main else None)

    def _both(self, model: torch.nn.Module, ema: torch.nn.Module | None, step: int) -> dict[str, float]:
        nets = {"model": model, "ema": ema}
        out = self.evaluate(nets[self.weights], step)
        other = "model" if self.weights == "ema" else "ema"
        if nets[other] is not None:
            out |= {f"{other}_{k}": v for k, v in self.evaluate(nets[other], step, samples=False).items()}
        return out

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int, samples: bool = True) -> dict[str, Any]:
        t, m = self.cfg.trainer, self.cfg.model
        was_training = model.training
        model.eval()
        vcff = m.video_contains_first_frame
        loader = build_loader(self.val_ds, self.cfg.data, seed=self.cfg.seed, epoch=0, shuffle=False)
        losses, grid, metrics = [], None, Reconstruction(m.fsq_levels)
        for i, video in enumerate(loader):
            if i >= t.eval_batches:
                break
            video = video.to(self.device)
            loss, recon = model(video, return_recon_loss_only=True, video_contains_first_frame=vcff)
            losses.append(loss.item())
            _, codes = model.encode(video, quantize=True, video_contains_first_frame=vcff)
            metrics.add(video, recon, codes)
            if grid is None:
                grid = (video[: t.num_samples].cpu(), recon[: t.num_samples].cpu())
        model.train(was_training)
        if grid is not None and t.num_samples > 0 and samples:
            save_sample_grid(grid[0], grid[1], self.run_dir / "samples" / f"step_{step:08d}.png")
        return {"val_loss": sum(losses) / len(losses), **metrics.result()}
