"""A folder of real videos against synthetic data (``folder_vs_synthetic_<model>``): steps/s of Trainer.fit on
a folder of h264 videos (data.cache=disk, warm) / on synthetic clips of the same shape; beside it, the cold
first pass over the folder (decode, resize, cache write) and a warm pass, per clip."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.jobs import LOOP_OVERRIDES
from benchmarks.loop import fit_steps
from benchmarks.report import Result
from benchmarks.timing import durations, median, say, within_budget
from resilient_train.config import compose


def _make_videos(folder: Path, files: int, frames: int, height: int, width: int) -> None:
    from resilient_train.data.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        # Moving colour blocks: content an encoder has to work for, unlike flat frames.
        base = rng.integers(0, 256, (height * 2, width * 2, 3), dtype=np.uint8)
        video = np.stack([base[t % height : t % height + height, t % width : t % width + width] for t in range(frames)])
        write_video(folder / f"video{i}.mp4", video, codec="libx264", fps=25)


def _pass_s(ds) -> float:
    """Seconds to read every clip of ``ds`` once."""
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return time.perf_counter() - t0


def bench_folder(work: Path, name: str, n: int, pairs: int, budget_s: float) -> dict[str, Result]:
    """The same job on a folder of real videos (disk cache) and on synthetic data: fit steps/s, interleaved."""
    from resilient_train.train.trainer import Trainer

    size = {"tiny": (24, 32, 60), "magvit64": (96, 128, 96)}[name]
    _make_videos(work / "videos", 6, size[2], size[0], size[1])
    _make_videos(work / "val", 1, size[2], size[0], size[1])
    folder_args = [
        "data=folder",
        f"data.path={work / 'videos'}",
        f"data.val_path={work / 'val'}",
        "data.cache=disk",
        f"data.cache_dir={work / 'cache'}",
    ]
    folder = Trainer(compose([f"+experiment={name}", *folder_args, *LOOP_OVERRIDES]), work / "folder")
    synth = Trainer(compose([f"+experiment={name}", *LOOP_OVERRIDES]), work / "synthetic")
    ds = folder.train_ds
    cold = _pass_s(ds)
    warm = _pass_s(ds)
    folder_d: list[float] = []
    synth_d: list[float] = []
    pair_ratios = []
    for p in within_budget(pairs, budget_s, f"folder {name}"):
        order = (folder, synth) if p % 2 == 0 else (synth, folder)
        d = {}
        for trainer in order:
            d[trainer is folder] = durations(fit_steps(trainer, trainer.counters.step, n))
        folder_d += d[True]
        synth_d += d[False]
        pair_ratios.append(median(d[False]) / median(d[True]))
    say(f"  folder {name}: {1 / median(folder_d):.3f} steps/s, synthetic {1 / median(synth_d):.3f} steps/s")
    entry = {
        "ratio_is": "median over the pairs of (folder steps/s) / (synthetic steps/s), "
        "from each pair's median step times",
        "pair_ratios": pair_ratios,
        "ours_steps_per_s": 1 / median(folder_d),
        "baseline_steps_per_s": 1 / median(synth_d),
        "ours": f"Trainer.fit, {name}, data=folder: 6 h264 mp4 of {size[2]} frames {size[1]}x{size[0]}, "
        "data.cache=disk (warm)",
        "baseline": f"Trainer.fit, {name}, synthetic clips of the same shape",
        "clips": len(ds),
        "cold_first_pass_s": cold,
        "cold_s_per_clip": cold / len(ds),
        "warm_pass_s": warm,
        "warm_s_per_clip": warm / len(ds),
    }
    out = {f"folder_vs_synthetic_{name}": Result(entry)}
    if name == "magvit64":
        out["folder_resume_cached_vs_probed"] = folder_resume(work, folder_args, pairs)
    return out


def folder_resume(work: Path, folder_args: list[str], reps: int) -> Result:
    """A magvit64 resume on the folder: its ``resume.timing`` phases with the probes kept beside the run
    (``data_probes.json``) and with that file removed (every video probed again), interleaved."""
    from benchmarks.resume import phases_of, run_base, time_to_step, train_args

    base = work / "resume-base"
    run_base(base, 1, *folder_args)
    secs: dict[str, list[float]] = {"cached": [], "probed": []}
    phases: dict[str, list[dict[str, float]]] = {"cached": [], "probed": []}
    for r in range(reps):
        for kind in ("cached", "probed") if r % 2 == 0 else ("probed", "cached"):
            run, log = work / f"resume-{kind}-{r}", work / f"resume-{kind}-{r}.log"
            shutil.copytree(base, run)
            if kind == "probed":
                (run / "data_probes.json").unlink()
            args = train_args(run, "resume_from=auto", "trainer.max_steps=20", *folder_args)
            secs[kind].append(time_to_step(run, args, 2, log))
            phases[kind].append(phases_of(log))
            shutil.rmtree(run, ignore_errors=True)
    data = {k: median([p["data"] for p in v]) for k, v in phases.items()}
    say(f"  folder resume: data phase {data['cached']:.3f}s with the probes kept, {data['probed']:.3f}s probing")
    entry = {
        "ours_s": median(secs["cached"]),
        "baseline_s": median(secs["probed"]),
        "ours_samples_s": secs["cached"],
        "baseline_samples_s": secs["probed"],
        "ours": "magvit64 resume on the folder, data_probes.json kept: Popen -> first new step",
        "baseline": "the same with data_probes.json removed (every video probed again)",
        "data_phase_median_s": data,
        "phases_median_s": {k: {n: median([p[n] for p in v]) for n in v[0]} for k, v in phases.items()},
        "phases_samples_s": phases,
    }
    return Result(entry)
