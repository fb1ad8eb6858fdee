"""What to evaluate, and when: the validation loss and metrics of the EMA weights (else the model's).

Every ``trainer.eval_every_n_steps`` and at the last step; with ranks, rank 0 evaluates and the
others receive its result, so every rank takes the same "improved" decision.
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

    def due(self, step: int) -> bool:
        t = self.cfg.trainer
        return step % t.eval_every_n_steps == 0 or step == t.max_steps

    def run(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Rank 0 evaluates ``model`` (sample grids under ``RUN/samples``); every rank gets the metrics."""
        return self.group.broadcast(self.evaluate(model, step) if self.group.is_main else None)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        t, m = self.cfg.trainer, self.cfg.model
        was_training = model.training
        model.eval()
        vcff = m.video_contains_first_frame
        loader = build_loader(self.val_ds, self.cfg.data, seed=self.cfg.seed, epoch=0, shuffle=False)
        losses, samples, metrics = [], None, Reconstruction(m.fsq_levels)
        for i, video in enumerate(loader):
            if i >= t.eval_batches:
                break
            video = video.to(self.device)
            loss, recon = model(video, return_recon_loss_only=True, video_contains_first_frame=vcff)
            losses.append(loss.item())
            _, codes = model.encode(video, quantize=True, video_contains_first_frame=vcff)
            metrics.add(video, recon, codes)
            if samples is None:
                samples = (video[: t.num_samples].cpu(), recon[: t.num_samples].cpu())
        model.train(was_training)
        if samples is not None and t.num_samples > 0:
            save_sample_grid(samples[0], samples[1], self.run_dir / "samples" / f"step_{step:08d}.png")
        return {"val_loss": sum(losses) / len(losses), **metrics.result()}
