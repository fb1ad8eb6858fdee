"""The runner of ``python -m benchmarks`` (``make bench``): the command line (``--quick``, ``--out``,
``--only``), the sections in their order with their repetitions, the load average beside each result,
and the report. What each ratio compares: the package's docstring."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|accelerate)")

import benchmarks  # noqa: E402
from benchmarks.async_stall import bench_async  # noqa: E402
from benchmarks.folder import bench_folder  # noqa: E402
from benchmarks.hash_throughput import bench_hash  # noqa: E402
from benchmarks.jobs import LOOP_OVERRIDES  # noqa: E402
from benchmarks.loop import bench_loop, bench_save_often  # noqa: E402
from benchmarks.precision import bench_precision  # noqa: E402
from benchmarks.ranks import bench_ranks  # noqa: E402
from benchmarks.recovery import bench_goodput  # noqa: E402
from benchmarks.remote import bench_remote  # noqa: E402
from benchmarks.report import Result, build_report, machine_info, write_report  # noqa: E402
from benchmarks.resume import bench_resume  # noqa: E402
from benchmarks.save_load import bench_save_load  # noqa: E402
from benchmarks.timing import say  # noqa: E402
from resilient_train.config import compose  # noqa: E402


class Sections:
    """The section runner: runs the sections ``--only`` names (all when it is empty) into ``results``."""

    def __init__(self, results: dict[str, Result], only: set[str]) -> None:
        self.results, self.only = results, only

    def want(self, name: str) -> bool:
        return not self.only or name in self.only

    def run(self, name: str, title: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Run one part if wanted; note beside each of its results the 1-minute load average before and after."""
        if not self.want(name):
            return
        say(title)
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        new = fn(*args, **kwargs)
        for r in new.values():
            r.entry.update(loadavg_1min=[load0, os.getloadavg()[0]], section_s=time.perf_counter() - t0)
        self.results.update(new)


def run_sections(s: Sections, work: Path, q: bool, reps: int) -> None:
    """Every section, in the order of ``--only``'s help; ``q``: ``--quick``."""
    from resilient_train.train.trainer import Trainer

    say("magvit64: building the trainer and taking one step (optimizer state must exist)")
    trainer = Trainer(compose(["+experiment=magvit64", *LOOP_OVERRIDES]), work / "magvit64")
    if any(s.want(name) for name in ("save", "hash", "async", "loop64", "often64")):
        trainer.train_step()
    s.run("save", "save / load", bench_save_load, trainer, work / "saveload", reps)
    s.run("hash", "hash throughput", bench_hash, trainer, work / "hash", reps)
    s.run("async", "async stall", bench_async, trainer, work / "async", reps)
    loop = dict(n=2 if q else 3, pairs=1 if q else 5, budget_s=200)
    s.run("loop64", "loop: magvit64", bench_loop, trainer, "magvit64", **loop)
    often = dict(n=2 if q else 4, pairs=1 if q else 5, budget_s=200)
    s.run("often64", "checkpoint every step vs never: magvit64", bench_save_often, trainer, "magvit64", **often)
    title = "object store (moto's S3 server on 127.0.0.1) vs plain obstore and the local disk"
    s.run("remote", title, bench_remote, trainer, work / "remote", reps, q)
    del trainer
    if s.want("tiny") or s.want("often"):
        tiny = Trainer(compose(["+experiment=tiny", *LOOP_OVERRIDES]), work / "tiny")
        loop = dict(n=10 if q else 20, pairs=2 if q else 6, budget_s=90)
        s.run("tiny", "loop: tiny", bench_loop, tiny, "tiny", **loop)
        often = dict(n=10 if q else 20, pairs=2 if q else 5, budget_s=90)
        s.run("often", "checkpoint every step vs never: tiny", bench_save_often, tiny, "tiny", **often)
        del tiny
    for name in ("tiny", "magvit64"):
        n = (6 if q else 12) if name == "tiny" else (3 if q else 4)
        title = f"real-video folder vs synthetic: {name}"
        s.run("folder", title, bench_folder, work / f"folder-{name}", name, n=n, pairs=2 if q else 5, budget_s=150)
    title = "resume vs fresh start, the floors and an in-process rollback (subprocesses)"
    s.run("resume", title, bench_resume, work / "resume", 1 if q else 5, budget_s=300)
    s.run("goodput", "goodput: one chaos trial against its reference (subprocesses)", bench_goodput, work, q)
    title = "2 ranks under torchrun vs 1 process, same global batch (subprocesses)"
    s.run("ranks", title, bench_ranks, work / "ranks", pairs=1 if q else 5, steps=12 if q else 40)
    # Last: once torch.compile has run in this process, every later in-process loop ran slower (tiny: 18 steps/s
    # against 23 alone, the fit side more than the bare one), so nothing in-process may follow it.
    title = "precision x compile: magvit64 steps/s against float32 eager, the kernel ratio, peak memory"
    rounds = dict(n=2 if q else 4, rounds=1 if q else 3, budget_s=400, kernel_reps=3 if q else 7)
    s.run("precision", title, bench_precision, work / "precision", "magvit64", **rounds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=benchmarks.__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and steps (a smoke test)")
    ap.add_argument("--out", type=Path, default=Path.cwd() / "outputs" / "bench" / "bench.json")
    ap.add_argument(
        "--only",
        default="",
        help="sections: save,hash,async,loop64,often64,remote,tiny,often,folder,resume,goodput,ranks,precision "
        "(dev aid)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    only = set(filter(None, args.only.split(",")))
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".bench-", dir=out.parent))  # same file system as the report
    reps = 3 if args.quick else 7
    t_start = time.perf_counter()
    results: dict[str, Result] = {}
    machine = machine_info(out.parent)
    try:
        run_sections(Sections(results, only), work, args.quick, reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()
    return write_report(out, build_report(results, machine, args.quick, reps, t_start))
