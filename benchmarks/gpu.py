"""The measured rows of ``scripts/gpu_check.sh``: magvit64 on one GPU, in one process.

  throughput   magvit64 steps/s and clips/s at batch 1, 8 and 32 (``data.batch_size``), deterministic
               kernels on and off: ``Trainer.train_step`` with its data loader (2 workers, pinned
               memory), timed over steps after a warm-up; peak GPU memory; FLOPs of one step counted by
               ``torch.utils.flop_counter`` (generator and discriminator, forward and backward) and the
               share of the card's peak FLOP/s they reach (dense FP32 and TF32 figures of the card).
  loop         Trainer.fit against a bare loop over the same model and batches (``benchmarks.loop``'s
               bench_loop), at batch 32: what the loop's bookkeeping costs on the GPU
  save         Trainer.save_checkpoint sync and async on the GPU state (``benchmarks.async_stall``'s
               bench_async), with the floor: one copy of the state's tensors into page-locked host memory
  precision    (``--section precision``) ``benchmarks.precision`` at batch 8: steps/s in 32, bf16-mixed and
               16-mixed, compile off and on, against float32 eager; the kernel ratio; peak step memory

``python -m benchmarks.gpu --out DIR [--device cuda]``; ``--device cpu --quick`` rehearses the whole script on
a machine without a GPU (tiny sizes). Writes ``OUT/gpu_bench.json`` (``OUT/gpu_precision.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.async_stall import bench_async  # noqa: E402
from benchmarks.jobs import LOOP_OVERRIDES  # noqa: E402
from benchmarks.loop import bench_loop  # noqa: E402
from benchmarks.precision import KERNEL_SHAPE, bench_precision, print_rows  # noqa: E402
from benchmarks.timing import say  # noqa: E402
from resilient_train.config import compose  # noqa: E402
from resilient_train.train.trainer import Trainer  # noqa: E402

#: Dense peak FLOP/s by card (vendor data sheets, SXM parts): (FP32 on CUDA cores, TF32 on tensor cores).
#: cuDNN runs float32 convolutions in TF32 unless ``torch.backends.cudnn.allow_tf32`` is off (torch's
#: default leaves it on; matrix multiplies stay FP32 by default).
PEAK_FLOPS = {
    "H200": (67e12, 494.7e12),
    "H100": (67e12, 494.7e12),
    "A100": (19.5e12, 156e12),
}


def peak_flops(name: str) -> tuple[float, float] | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainer(work: Path, device: str, experiment: str, *overrides: str) -> Trainer:
    cfg = compose([f"+experiment={experiment}", *LOOP_OVERRIDES, f"trainer.device={device}", *overrides])
    return Trainer(cfg, work)


def step_flops(trainer: Trainer) -> float:
    """FLOPs of one optimizer step (both networks, forward and backward), as torch's flop counter counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step()
    return float(counter.get_total_flops())


def throughput(work: Path, device: str, experiment: str, batch: int, deterministic: bool, steps: int) -> dict:
    trainer = make_trainer(
        work,
        device,
        experiment,
        f"data.batch_size={batch}",
        f"data.val_size={max(batch, 8)}",
        "data.num_workers=2",
        f"trainer.deterministic={str(deterministic).lower()}",
    )
    dev = trainer.device
    for _ in range(2):  # warm-up: kernel selection, allocator, the loader's workers
        trainer.train_step()
    flops = step_flops(trainer)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()  # its .item() calls wait for the GPU: each time is a whole step
        times.append(time.perf_counter() - t0)
    sync(dev)
    s = statistics.median(times)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_flops(name)
    row = {
        "batch": batch,
        "deterministic": deterministic,
        "s_per_step": s,
        "steps_per_s": 1 / s,
        "clips_per_s": batch / s,
        "step_spread_s": [min(times), max(times)],
        "flops_per_step": flops,
        "gflop_per_clip": flops / batch / 1e9,
        "achieved_tflops": flops / s / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "share_of_fp32_peak": flops / s / peak[0] if peak else None,
        "share_of_tf32_peak": flops / s / peak[1] if peak else None,
        "device_name": name,
    }
    say(
        f"  batch {batch:3d} deterministic={deterministic!s:5}: {row['steps_per_s']:.2f} steps/s, "
        f"{row['clips_per_s']:.1f} clips/s, {row['gflop_per_clip']:.0f} GFLOP/clip"
    )
    del trainer
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def print_table(report: dict[str, Any]) -> None:
    rows = report["throughput"]
    base = next((r for r in rows if r["batch"] == min(x["batch"] for x in rows) and r["deterministic"]), None)
    print(f"\n{report['experiment']} on {report['device_name']} (torch {report['torch']}, CUDA {report['cuda']})")
    print(
        f"{'batch':>5} {'determ.':>7} {'steps/s':>8} {'clips/s':>8} {'x b1':>6} {'GiB':>6} {'TFLOP/s':>8} "
        f"{'%FP32':>6} {'%TF32':>6} {'GFLOP/clip':>10}"
    )
    for r in rows:
        gib = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        f32 = f"{100 * r['share_of_fp32_peak']:.1f}" if r["share_of_fp32_peak"] is not None else "-"
        t32 = f"{100 * r['share_of_tf32_peak']:.1f}" if r["share_of_tf32_peak"] is not None else "-"
        x = f"{r['clips_per_s'] / base['clips_per_s']:.1f}" if base else "-"
        print(
            f"{r['batch']:>5} {'on' if r['deterministic'] else 'off':>7} {r['steps_per_s']:>8.2f} "
            f"{r['clips_per_s']:>8.1f} {x:>6} {gib:>6} {r['achieved_tflops']:>8.2f} {f32:>6} {t32:>6} "
            f"{r['gflop_per_clip']:>10.1f}"
        )
    loop = report.get("loop")
    if loop:
        print(
            f"loop vs bare step (batch {report['loop_batch']}): {loop['_ratio_value']:.3f} "
            f"(fit {loop['ours_s_per_step']:.3f} s/step, bare {loop['baseline_s_per_step']:.3f} s/step, "
            f"pairs {', '.join(f'{x:.2f}' for x in loop['pair_throughput_ratios'])})"
        )
    save = report.get("save")
    if save:
        print(
            f"checkpoint save on the GPU state: sync {save['baseline_s']:.3f} s, async stall {save['ours_s']:.3f} s "
            f"(ratio {save['ours_s'] / save['baseline_s']:.3f}; floor {save['floor_s']:.3f} s = "
            f"{save['floor_ratio']:.3f}), {save['ours_bytes'] / 1e6:.1f} MB"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few steps: rehearse the script")
    ap.add_argument("--section", choices=["main", "precision"], default="main", help="main: throughput, loop, save")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    experiment = "tiny" if args.quick else "magvit64"
    if args.section == "precision":
        return precision_section(out, args.device, experiment, args.quick)
    batches = (1, 2) if args.quick else (1, 8, 32)
    steps = 3 if args.quick else 8
    report: dict[str, Any] = {"experiment": experiment, "torch": torch.__version__, "cuda": torch.version.cuda}
    work = Path(tempfile.mkdtemp(prefix=".gpu-bench-", dir=out))
    rows = []
    for det in (True, False):
        for b in batches:
            rows.append(throughput(work / f"tp-{b}-{det}", args.device, experiment, b, det, steps))
            report["throughput"] = rows
    report["device_name"] = rows[0]["device_name"]
    big = batches[-1]
    say(f"loop vs bare step, batch {big}")
    trainer = make_trainer(
        work / "loop", args.device, experiment, f"data.batch_size={big}", f"data.val_size={max(big, 8)}"
    )
    trainer.train_step()
    loop = bench_loop(trainer, experiment, n=3 if args.quick else 6, pairs=1 if args.quick else 3, budget_s=120)
    result = next(iter(loop.values()))
    entry = result.entry
    entry["_ratio_value"] = result.ratio
    report["loop"], report["loop_batch"] = entry, big
    say("checkpoint save and async stall")
    report["save"] = next(iter(bench_async(trainer, work / "async", 2 if args.quick else 5).values())).entry
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    return 0


def precision_section(out: Path, device: str, experiment: str, quick: bool) -> int:
    """``benchmarks.precision`` on ``device`` at batch 8 (2 with ``--quick``): ``OUT/gpu_precision.json``, a table."""
    batch = 2 if quick else 8
    work = Path(tempfile.mkdtemp(prefix=".gpu-precision-", dir=out))
    over = (f"data.batch_size={batch}", f"data.val_size={max(batch, 8)}")
    rows = bench_precision(
        work,
        experiment,
        device=device,
        n=3 if quick else 6,
        rounds=1 if quick else 2,
        budget_s=120,
        overrides=over,
        kernel_reps=3 if quick else 7,
        kernel_shape=(1, 32, 4, 16, 16) if quick else KERNEL_SHAPE,
    )
    report = {name: {**r.entry, "ratio": r.ratio} for name, r in rows.items()}
    (out / "gpu_precision.json").write_text(json.dumps({"batch": batch, "rows": report}, indent=1) + "\n")
    print(f"\n{experiment} on {device}, batch {batch}: precision x compile against float32 eager")
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
