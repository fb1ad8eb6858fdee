"""``python -m benchmarks.quality_upstream SPEC.json``: magvit2-pytorch's own ``VideoTokenizerTrainer``, as it is,
for ``make bench-quality`` (:mod:`benchmarks.quality`), in a process of its own.

The model is built as our trainer builds it (``seed_everything(cfg.seed)``, then ``build_model(cfg.model)``), so
both sides start from the same weights. The trainer gets the same clip folder, batch, base learning rate,
optimizer settings (betas, weight decay), gradient clipping, number of steps and EMA decay; the loop is its
``train_step``, called as its ``train()`` calls it (``valid_step`` and ``save`` left out: the bench evaluates).

Its quirks, handled without touching its code:

* ``warmup_steps=1``: its ``LinearWarmup`` is built before its scheduler and keeps the generator's learning rate
  at ``lr / warmup_steps`` for the whole run; with 1 it is the base rate, constant (the rate seen is recorded).
* Its discriminator optimizer steps twice per step on a fresh batch: left as it is, and counted
  (``discr_optimizer_steps`` beside each snapshot).

Every ``eval_every`` steps the generator's weights and the EMA's are written as safetensors for the bench to
evaluate; ``result.json`` holds the snapshots and the seconds of every ``train_step``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def generator_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The generator's tensors (what an export holds): the training-only parts' keys left out."""
    from resilient_train.tokenizer.model import TRAINING_ONLY

    return {
        k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k.split(".")[0] not in TRAINING_ONLY
    }


def discr_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many times the optimizer stepped (Adam's per-parameter ``step`` of its first parameter)."""
    state = optimizer.state_dict()["state"]
    return int(next(iter(state.values()))["step"]) if state else 0


def main(argv: list[str]) -> int:
    from magvit2_pytorch.trainer import VideoTokenizerTrainer, cycle
    from safetensors.torch import save_file

    from resilient_train.config import compose, typed
    from resilient_train.tokenizer.model import build_model, quiet_library_warnings
    from resilient_train.train.rng import seed_everything

    quiet_library_warnings()
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    cfg = typed(compose(spec["overrides"]))
    torch.set_num_threads(int(cfg.trainer.num_threads))
    seed_everything(cfg.seed)
    model = build_model(cfg.model)
    opt = cfg.optimizer
    trainer = VideoTokenizerTrainer(
        model,
        batch_size=int(cfg.data.batch_size),
        num_train_steps=int(spec["steps"]),
        learning_rate=float(opt.lr),
        grad_accum_every=int(cfg.trainer.grad_accum_steps),
        max_grad_norm=float(opt.max_grad_norm),
        dataset_folder=str(spec["train_dir"]),
        valid_frac=0.0,
        num_frames=int(cfg.data.num_frames),
        warmup_steps=1,
        checkpoints_folder=str(out / "checkpoints"),
        results_folder=str(out / "results"),
        ema_kwargs=dict(beta=float(cfg.trainer.ema.decay)),
        optimizer_kwargs=dict(wd=float(opt.weight_decay), betas=tuple(float(b) for b in opt.betas)),
        accelerate_kwargs=dict(cpu=spec["device"] == "cpu"),
    )
    dl_iter = cycle(trainer.dataloader)
    secs: list[float] = []
    snapshots = []
    every, steps = int(spec["eval_every"]), int(spec["steps"])
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        trainer.train_step(dl_iter)
        if spec["device"] != "cpu":
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
        if step % every == 0 or step == steps:
            files = {}
            for which, module in (("model", trainer.unwrapped_model), ("ema", trainer.ema_model.ema_model)):
                files[which] = str(out / f"step{step:07d}-{which}.safetensors")
                save_file(generator_state(module), files[which])
            snapshots.append(
                {
                    "step": step,
                    **files,
                    "lr": float(trainer.optimizer.param_groups[0]["lr"]),
                    "discr_optimizer_steps": discr_steps(trainer.discr_optimizer),
                }
            )
    (out / "result.json").write_text(json.dumps({"step_secs": secs, "snapshots": snapshots}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
