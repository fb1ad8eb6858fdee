"""Precision and compile: the training step in each ``trainer.precision``, compile off and on, against float32 eager.

  precision_<p>_<eager|compiled>_vs_32   median step time of Trainer.fit in float32 without compile / in this
                                         setting (above 1: faster), pooled over rounds that visit every
                                         setting in a rotating order, each round ``n`` steps of each
  beside each, ``kernel``: the same ratio for the model's heaviest kernel alone (a residual block's 3x3x3
  convolution at its magvit64 shape, forward and backward, under the same autocast,
  ``tokenizer.autocast.conv_speed``): what this processor's arithmetic gives the precision. On a CPU
  without bfloat16/float16 units it is below 1, and a mixed-precision step is slower: reported, not
  hidden. Compile does not change that kernel (it fuses the elementwise work around it), so its rows
  show the same figure. A precision whose kernel is more than 10x slower is not timed in steps
  (``precision_<p>_not_timed``: the kernel ratio and why).

Peak memory per precision (compile off): on a CPU the peak resident set (``VmHWM``) of a process that builds
the trainer and takes three steps; on a GPU the peak allocated
during a timed window above what was allocated before it (activations and gradients, not the weights).
The first steps of each setting (compilation) are timed apart, as ``warmup_s``.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.jobs import LOOP_OVERRIDES, TRAIN_CMD, train_env
from benchmarks.loop import fit_steps
from benchmarks.report import Result
from benchmarks.timing import durations, median, say, within_budget
from resilient_train.config import compose
from resilient_train.tokenizer.autocast import conv_speed

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
BASELINE = "32_eager"
#: A residual block's input in magvit64 (after the first spatial compression): the kernel the ratio times.
KERNEL_SHAPE = (1, 128, 8, 32, 32)
#: A precision whose kernel runs this much slower than float32 is not timed in steps (a float16 step on a CPU
#: without float16 kernels took 300 s here against 1.4 s in float32): its row says so, with the kernel ratio.
UNTIMED_BELOW = 0.1


def label(precision: str, compiled: bool) -> str:
    return f"{precision.replace('-mixed', '')}_{'compiled' if compiled else 'eager'}"


def peak_rss(work: Path, experiment: str, precision: str, overrides: tuple[str, ...]) -> int:
    """Peak resident set (bytes) of one trainer process taking three steps in ``precision``: its own ``VmHWM``
    (``/proc/PID/status``), read until it exits (a child's rusage would also count the processes it waited for)."""
    cmd = [
        *TRAIN_CMD,
        f"+experiment={experiment}",
        *LOOP_OVERRIDES,
        f"trainer.precision={precision}",
        "trainer.max_steps=3",
        f"hydra.run.dir={work / f'rss-{precision}'}",
        *overrides,
    ]
    peak = 0
    with open(work / f"rss-{precision}.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=train_env(), cwd=work)
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = max(peak, int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) * 1024)
            except (OSError, StopIteration, ValueError):
                pass
            time.sleep(0.1)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {work / f'rss-{precision}.log'}")
    return peak


def bench_precision(
    work: Path,
    experiment: str = "magvit64",
    *,
    device: str = "cpu",
    n: int = 4,
    rounds: int = 3,
    budget_s: float = 600,
    overrides: tuple[str, ...] = (),
    kernel_reps: int = 7,
    kernel_shape: tuple[int, ...] = KERNEL_SHAPE,
) -> dict[str, Result]:
    # Long on purpose: build and warm every setting, the interleaved rounds, the kernel ratios, the memory.
    from resilient_train.train.trainer import Trainer

    work.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if device.startswith("cuda") else device)
    kernels, shapes = {}, {}
    for p in PRECISIONS[1:]:  # the trainer's own small probe first: a kernel 100x slower takes minutes at full size
        small = conv_speed(p, dev, reps=kernel_reps)
        shapes[p] = kernel_shape if small >= UNTIMED_BELOW else (1, 32, 4, 16, 16)
        kernels[p] = conv_speed(p, dev, kernel_shape, kernel_reps) if small >= UNTIMED_BELOW else small
    timed = [p for p in PRECISIONS if kernels.get(p, 1.0) >= UNTIMED_BELOW]
    results: dict[str, Result] = {}
    for p in sorted(set(PRECISIONS) - set(timed)):
        why = f"its {shapes[p]} convolution runs {1 / kernels[p]:.0f}x slower than float32 on {dev}"
        say(f"  {p}: not timed: {why}")
        results[f"precision_{p.replace('-mixed', '')}_not_timed"] = Result({"kernel": kernels[p], "why": why})
    trainers: dict[str, Trainer] = {}
    warmup: dict[str, float] = {}
    for compiled in (False, True):
        for p in timed:
            name = label(p, compiled)
            cfg = compose(
                [f"+experiment={experiment}", *LOOP_OVERRIDES, f"trainer.precision={p}", f"trainer.device={device}"]
                + [f"trainer.compile={str(compiled).lower()}", *overrides]
            )
            trainers[name] = t = Trainer(cfg, work / name)
            t0 = time.perf_counter()
            fit_steps(t, 0, 2)  # compiles, when on
            warmup[name] = time.perf_counter() - t0
            say(f"  {name}: 2 warm-up steps {warmup[name]:.1f}s")
    secs: dict[str, list[float]] = {name: [] for name in trainers}
    extra: dict[str, int] = {}
    cuda = trainers[BASELINE].device.type == "cuda"
    for r in within_budget(rounds, budget_s, "precision"):
        names = list(trainers)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = trainers[name]
            if cuda:
                torch.cuda.synchronize(t.device)
                torch.cuda.reset_peak_memory_stats(t.device)
                before = torch.cuda.memory_allocated(t.device)
            secs[name] += durations(fit_steps(t, t.counters.step, n))
            if cuda:
                extra[name] = max(extra.get(name, 0), torch.cuda.max_memory_allocated(t.device) - before)
        say("  round " + str(r) + ": " + ", ".join(f"{k} {1 / median(v):.3f} st/s" for k, v in secs.items()))
    del trainers
    memory = {}
    if not cuda:
        for p in timed:
            memory[p] = peak_rss(work, experiment, p, (f"trainer.device={device}", *overrides))
            say(f"  peak RSS {p}: {memory[p] / 1e6:.0f} MB")
    base = median(secs[BASELINE])
    for name, s in secs.items():
        if name == BASELINE:
            continue
        precision = next(p for p in PRECISIONS if label(p, "compiled" in name) == name)
        entry: dict[str, Any] = {
            "ratio_is": "median float32-eager step time / median step time here (above 1: faster)",
            "ours_steps_per_s": 1 / median(s),
            "baseline_steps_per_s": 1 / base,
            "ours_step_s": s,
            "baseline_step_s": secs[BASELINE],
            "warmup_s": warmup[name],
            "baseline_warmup_s": warmup[BASELINE],
            "ours": f"Trainer.fit, {experiment}, trainer.precision={precision}, compile={'compiled' in name}",
            "baseline": f"Trainer.fit, {experiment}, trainer.precision=32, compile=False",
            "steps_per_round": n,
            "device": str(dev),
            "kernel": kernels.get(precision, 1.0),
            "kernel_shape": list(shapes.get(precision, kernel_shape)),
        }
        if precision in memory:
            entry |= {"peak_rss_bytes": memory[precision], "baseline_peak_rss_bytes": memory["32"]}
        if name in extra:
            entry |= {"peak_step_bytes": extra[name], "baseline_peak_step_bytes": extra[BASELINE]}
        results[f"precision_{name}_vs_32"] = Result(entry, ratio=base / median(s))
    return results


def print_rows(results: dict[str, Result]) -> None:
    """The rows as a table (the GPU bench's; ``make bench`` prints them in its own)."""
    print(f"{'setting':34} {'ratio':>7} {'steps/s':>8} {'f32 st/s':>8} {'kernel':>7} {'warm-up':>8}  peak memory")
    for name, r in results.items():
        e = r.entry
        if r.ratio is None:
            print(f"{name:34} {'':>7} {'':>8} {'':>8} {e['kernel']:>7.3f} {'':>8}  {e['why']}")
            continue
        mem = e.get("peak_step_bytes", e.get("peak_rss_bytes"))
        print(
            f"{name:34} {r.ratio:>7.3f} {e['ours_steps_per_s']:>8.3f} {e['baseline_steps_per_s']:>8.3f} "
            f"{e['kernel']:>7.3f} {e['warmup_s']:>7.0f}s  {'' if mem is None else f'{mem / 2**30:.2f} GiB'}"
        )
