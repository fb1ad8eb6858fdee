"""The training loop against a bare loop, and checkpointing every step against never.

  loop_vs_bare_<model>              steps/s of Trainer.fit (no checkpoints, no eval inside the window) /
                                    steps/s of a bare loop over the same model, data and optimizers
  save_every_step_vs_never_<model>  wall time of Trainer.fit checkpointing every step (async) / never

``bare_step`` is the baseline's step; ``tests/test_bench.py`` checks it leaves the bits ``train_step`` does.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks.jobs import BIG
from benchmarks.report import Result
from benchmarks.timing import durations, median, say, within_budget
from resilient_train.data.loader import build_loader
from resilient_train.monitor import read_history


def train_batches(trainer):
    """The trainer's training batches on its device, epoch after epoch, as its own loader yields them."""
    cfg = trainer.cfg
    epoch = 0
    while True:
        for b in build_loader(trainer.train_ds, cfg.data, seed=int(cfg.seed), epoch=epoch):
            yield b.to(trainer.device)
        epoch += 1


def bare_step(trainer, videos: list, step: int) -> None:
    """One optimizer step written plainly: the work of ``Trainer.train_step`` without its bookkeeping
    (no counters, no ``.item()`` syncs, no metrics). ``tests/test_bench.py`` checks that it leaves the
    same bits as ``train_step``, so this baseline cannot drift from the loop it is compared with."""
    m, o = trainer.cfg.model, trainer.cfg.optimizer
    model, vcff = trainer.model, m.video_contains_first_frame
    model.train()
    trainer.opt_gen.zero_grad(set_to_none=True)
    for v in videos:
        loss, _ = model(v, return_loss=True, video_contains_first_frame=vcff)
        (loss / len(videos)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
    trainer.opt_gen.step()
    trainer.sched_gen.step()
    if m.use_gan:
        trainer.opt_discr.zero_grad(set_to_none=True)
        gp = step % m.grad_penalty_every == 0
        dloss, _ = model(videos[-1], return_discr_loss=True, apply_gradient_penalty=gp, video_contains_first_frame=vcff)
        dloss.backward()
        torch.nn.utils.clip_grad_norm_(model.discr_parameters(), o.max_grad_norm)
        trainer.opt_discr.step()
        trainer.sched_discr.step()
    if trainer.ema is not None:
        trainer.ema.update(step)


def bare_loop(trainer, batches, step0: int, n: int) -> list[float]:
    """``n`` bare steps from ``step0``: the time (perf_counter) after each."""
    accum = trainer.cfg.trainer.grad_accum_steps
    times = []
    cuda = trainer.device.type == "cuda"
    for step in range(step0, step0 + n):
        bare_step(trainer, [next(batches) for _ in range(accum)], step)
        if cuda:  # the step has run, not only been queued (train_step's .item() calls wait the same way)
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return times


def fit_steps(trainer, step0: int, n: int) -> list[float]:
    """Trainer.fit over steps step0..step0+n-1: wall times of its history records (written after each step)."""
    trainer.counters.step = step0
    trainer.cfg.trainer.max_steps = step0 + n
    before = len(read_history(trainer.run_dir))
    trainer.fit()
    recs = [r for r in read_history(trainer.run_dir)[before:] if r.get("kind") == "train"]
    assert [r["step"] for r in recs] == list(range(step0 + 1, step0 + n + 1)), [r["step"] for r in recs]
    return [r["time"] for r in recs]


def bench_loop(trainer, name: str, n: int, pairs: int, budget_s: float) -> dict[str, Result]:
    """Pairs of runs over the same step numbers (the same gradient-penalty and EMA steps), order alternating.

    A pair's ratio is median(bare step time) / median(fit step time) over its runs: per-step medians
    shrug off the bursts of load from other processes that throughput over a run does not; the
    verdict is the median over the pairs. The throughput ratio of each pair is reported beside it.
    Runs ``pairs`` pairs, or fewer (at least one) when the next would end past ``budget_s``: a busy
    machine must not stretch the bench.
    """
    batches = train_batches(trainer)
    fit_d: list[float] = []
    bare_d: list[float] = []
    pair_ratios, pair_throughput = [], []
    for p in within_budget(pairs, budget_s, name):
        s = trainer.counters.step
        if p % 2 == 0:
            b = durations(bare_loop(trainer, batches, s, n))
            f = durations(fit_steps(trainer, s, n))
        else:
            f = durations(fit_steps(trainer, s, n))
            b = durations(bare_loop(trainer, batches, s, n))
        trainer.counters.step = s + n
        fit_d += f
        bare_d += b
        pair_ratios.append(median(b) / median(f))
        pair_throughput.append(sum(b) / sum(f))
        say(f"  {name} pair {p}: fit {len(f) / sum(f):.3f} steps/s, bare {len(b) / sum(b):.3f} steps/s")
    entry: dict[str, Any] = {
        "ratio_is": "median over the pairs of (fit steps/s) / (bare steps/s), each from that pair's median step times",
        "ours_steps_per_s": 1 / median(fit_d),
        "baseline_steps_per_s": 1 / median(bare_d),
        "ours_s_per_step": median(fit_d),
        "baseline_s_per_step": median(bare_d),
        "ours_mean_s_per_step": statistics.mean(fit_d),
        "baseline_mean_s_per_step": statistics.mean(bare_d),
        "steps_per_run": n,
        "timed_steps_per_run": n - 1,
        "pairs": len(pair_ratios),
        "pair_ratios": pair_ratios,
        "pair_throughput_ratios": pair_throughput,
        "ours_samples_s_per_step": fit_d,
        "baseline_samples_s_per_step": bare_d,
        "ours": "Trainer.fit (history + heartbeat each step; no checkpoint/eval inside the window)",
        "baseline": "bare loop: same model, data loader, optimizers, schedulers, EMA, GAN + gradient penalty",
    }
    return {f"loop_vs_bare_{name}": Result(entry)}


def bench_save_often(trainer, name: str, n: int, pairs: int, budget_s: float) -> dict[str, Result]:
    """Wall time of the loop checkpointing every step (async) against never, over the same steps, order alternating.

    Each run is ``n`` steps of ``Trainer.fit``; the first step of a run is not timed (see ``durations``).
    """
    mgr = trainer.ckpt
    saved = (mgr.every_n_steps, mgr.async_save, mgr.keep_last)
    mgr.async_save, mgr.keep_last = True, 1
    secs: dict[str, list[float]] = {"every": [], "never": []}
    try:
        for p in within_budget(pairs, budget_s, name):
            for kind in ("every", "never") if p % 2 == 0 else ("never", "every"):
                mgr.every_n_steps = 1 if kind == "every" else BIG
                secs[kind].append(sum(durations(fit_steps(trainer, trainer.counters.step, n))))
    finally:
        mgr.every_n_steps, mgr.async_save, mgr.keep_last = saved
    pair_ratios = [a / b for a, b in zip(secs["every"], secs["never"])]
    say(f"  {name}: every step {sum(secs['every']):.2f}s, never {sum(secs['never']):.2f}s")
    entry = {
        "ours_s": sum(secs["every"]),
        "baseline_s": sum(secs["never"]),
        "ours": f"Trainer.fit, {name}, checkpoint.every_n_steps=1 with async_save (keep_last=1)",
        "baseline": f"Trainer.fit, {name}, no checkpoint inside the window",
        "ours_samples_s": secs["every"],
        "baseline_samples_s": secs["never"],
        "timed_steps_per_run": n - 1,
        "pair_ratios": pair_ratios,
        "ratio_is": "total wall time of the timed steps, saving every step / never saving",
    }
    return {f"save_every_step_vs_never_{name}": Result(entry)}
