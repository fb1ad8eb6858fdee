"""``make bench-quality``: what our loop trains, against what magvit2-pytorch's own trainer trains, on the same setup.

Every other proof compares this code with itself; a bug that makes training worse would be reproduced in both
arms. This benchmark is the outside reference. Per seed:

1. **The clips** (:mod:`benchmarks.quality_data`): synthetic videos written as lossless RGB MP4 files, ``train/``
   and held-out ``val/``; both readers must decode every file to the same tensors, bit for bit (checked).
2. **Our loop**: ``python -m resilient_train.cli`` on ``data=folder``, a checkpoint every ``--eval-every`` steps.
3. **magvit2-pytorch's** ``VideoTokenizerTrainer``, as it is (:mod:`benchmarks.quality_upstream`), snapshots of
   its generator and EMA at the same steps.
4. **One metric code** for both (``resilient_train.tokenizer.evaluate.evaluate_model``: PSNR, SSIM, FSQ codebook
   usage) on the held-out clips, for the trained weights and the EMA of each side at every snapshot; step 0 is
   the shared initial weights. What each side hands out is also evaluated: ours through ``export`` and
   ``load_tokenizer`` (the run's newest checkpoint, the weights ``checkpoint.best_of`` names: the EMA), upstream's
   its final EMA (what its ``tokenize`` and ``save`` hand out).

Same for both: the initial weights (our trainer's seed and builder), the clips, the batch, the base learning rate
(ours with its warm-up and cosine schedule, upstream's constant), AdamW's betas and weight decay, gradient
clipping at ``optimizer.max_grad_norm``, the steps, the EMA decay (0.999, the default). The verdicts: our
held-out PSNR (mean over the second half of the run, over seeds) at or above upstream's, for the trained weights
and for what each hands out; our EMA never more than 0.5 dB below our trained weights from step 100 on.

Writes ``quality.json`` (every evaluation, the step times, the verdicts), ``quality.png`` and prints a table.
``--experiment magvit64`` (17-frame clips: upstream's loop always assumes a first frame) and ``--device cuda``
for a GPU; ``--quick`` for a short smoke run (no verdicts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.jobs import BIG, TRAIN_CMD, train_env
from benchmarks.quality_data import check_readers, write_clips
from benchmarks.quality_report import report, verdicts

#: Per experiment: steps, evaluation interval, clips (train, held out), batch, base LR, extra overrides.
SETUPS: dict[str, dict[str, Any]] = {
    "tiny": dict(steps=2000, eval_every=100, train=256, val=32, batch=2, lr=1e-3, overrides=[]),
    "magvit64": dict(
        steps=2000,
        eval_every=250,
        train=256,
        val=32,
        batch=1,
        lr=1e-4,
        overrides=["data.num_frames=17", "model.video_contains_first_frame=true"],
    ),
}
EMA_DECAY = 0.999
REPO = Path(__file__).resolve().parents[1]  # where ``-m benchmarks.quality_upstream`` is found


def common_overrides(setup: dict[str, Any], experiment: str, clips: Path, seed: int, device: str) -> list[str]:
    """The config both sides are built from."""
    steps = setup["steps"]
    return [
        f"+experiment={experiment}",
        f"seed={seed}",
        "data=folder",
        f"data.path={clips}",
        f"data.batch_size={setup['batch']}",
        "trainer.grad_accum_steps=1",
        f"trainer.max_steps={steps}",
        f"optimizer.lr={setup['lr']}",
        f"optimizer.discr_lr={setup['lr']}",
        f"optimizer.warmup_steps={max(1, steps // 100)}",
        f"optimizer.schedule_steps={steps}",
        "trainer.ema.enabled=true",
        f"trainer.ema.decay={EMA_DECAY}",
        f"trainer.device={device}",
        *setup["overrides"],
    ]


def run_ours(work: Path, overrides: list[str], every: int) -> Path:
    run = work / "ours"
    cmd = [
        *TRAIN_CMD,
        *overrides,
        f"checkpoint.every_n_steps={every}",
        "checkpoint.keep_last=0",
        "checkpoint.save_on_best=false",
        f"trainer.eval_every_n_steps={BIG}",
        "trainer.num_samples=0",
        "trainer.progress_bar=false",
        f"hydra.run.dir={run}",
    ]
    with open(work / "ours.log", "wb") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=train_env(), cwd=work).returncode
    if rc != 0:
        raise RuntimeError(f"our loop exited {rc}; see {work / 'ours.log'}")
    return run


def run_upstream(work: Path, overrides: list[str], setup: dict[str, Any], clips: Path, device: str) -> dict[str, Any]:
    out = work / "upstream"
    spec = {
        "overrides": overrides,
        "train_dir": str(clips / "train"),
        "steps": setup["steps"],
        "eval_every": setup["eval_every"],
        "device": device,
        "out": str(out),
    }
    (work / "upstream.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "benchmarks.quality_upstream", str(work / "upstream.json")]
    with open(work / "upstream.log", "wb") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=train_env(), cwd=REPO).returncode
    if rc != 0:
        raise RuntimeError(f"magvit2-pytorch's trainer exited {rc}; see {work / 'upstream.log'}")
    return json.loads((out / "result.json").read_text())


def our_step_secs(run: Path) -> list[float]:
    """Seconds between consecutive training steps of our run (``history.jsonl``'s train records)."""
    from resilient_train.monitor.history import read_history

    times = [r["time"] for r in read_history(run) if r.get("kind") == "train"]
    return [b - a for a, b in zip(times, times[1:])]


class Judge:
    """Evaluates generator weights (dicts of tensors) on the held-out clips with one code for both sides."""

    def __init__(self, overrides: list[str], val_dir: Path, device: str) -> None:
        from resilient_train.config import compose, typed
        from resilient_train.data.clips import Preprocessing
        from resilient_train.data.folder import clips_of
        from resilient_train.tokenizer.model import build_model, eval_copy

        self.cfg = typed(compose(overrides))
        m = self.cfg.model
        n = int(self.cfg.data.num_frames)
        clips, _ = clips_of([val_dir], Preprocessing(n, 1, n, int(m.image_size), int(m.channels)))
        self.clips = [clips[k] for k in range(len(clips))]
        self.device = device
        with torch.random.fork_rng(devices=[]):  # the generator every snapshot is loaded into, built once
            self.generator = eval_copy(build_model(self.cfg.model)).to(device)

    def initial(self) -> dict[str, torch.Tensor]:
        from benchmarks.quality_upstream import generator_state
        from resilient_train.tokenizer.model import build_model
        from resilient_train.train.rng import seed_everything

        seed_everything(self.cfg.seed)  # as our trainer and the upstream worker do right before building it
        return generator_state(build_model(self.cfg.model))

    def __call__(self, tensors: dict[str, torch.Tensor] | torch.nn.Module) -> dict[str, float]:
        from resilient_train.tokenizer.evaluate import evaluate_model

        if isinstance(tensors, torch.nn.Module):
            model = tensors
        else:
            model = self.generator
            model.load_state_dict(tensors, strict=True)
        m = self.cfg.model
        r = evaluate_model(model.to(self.device), self.clips, list(m.fsq_levels), bool(m.video_contains_first_frame))
        return {k: r[k] for k in ("psnr", "ssim", "codebook_usage")}


def evaluate_seed(work: Path, setup: dict[str, Any], experiment: str, clips: Path, seed: int, device: str) -> dict:
    from safetensors.torch import load_file

    from resilient_train.checkpoint import load_checkpoint
    from resilient_train.checkpoint.layout import checkpoints_under
    from resilient_train.tokenizer.export import export_tokenizer, load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    overrides = common_overrides(setup, experiment, clips, seed, device)
    judge = Judge(overrides, clips / "val", device)
    start = judge(judge.initial())
    curves: dict[str, list[dict[str, Any]]] = {f"{s}_{w}": [] for s in ("ours", "upstream") for w in ("model", "ema")}
    for name in curves:
        curves[name].append({"step": 0, **start})

    t0 = time.perf_counter()
    run = run_ours(work, overrides, setup["eval_every"])
    ours_wall = time.perf_counter() - t0
    for ckpt in checkpoints_under(run):
        loaded = load_checkpoint(ckpt)
        keys = set(loaded.state["ema"])
        curves["ours_model"].append({"step": loaded.step, **judge({k: loaded.state["model"][k] for k in keys})})
        curves["ours_ema"].append({"step": loaded.step, **judge(loaded.state["ema"])})
    export_tokenizer(run, work / "ours-export")
    ours_export = judge(load_tokenizer(work / "ours-export", device))

    t0 = time.perf_counter()
    up = run_upstream(work, overrides, setup, clips, device)
    up_wall = time.perf_counter() - t0
    for snap in up["snapshots"]:
        for which in ("model", "ema"):
            curves[f"upstream_{which}"].append({"step": snap["step"], **judge(load_file(snap[which]))})
    last = up["snapshots"][-1]
    ours_secs = our_step_secs(run)
    return {
        "seed": seed,
        "curves": curves,
        "exported": {"ours": ours_export, "upstream": curves["upstream_ema"][-1]},
        "step_secs": {"ours": statistics.median(ours_secs), "upstream": statistics.median(up["step_secs"])},
        "wall_secs": {"ours": ours_wall, "upstream": up_wall},
        "upstream_lr": last["lr"],
        "upstream_discr_optimizer_steps": last["discr_optimizer_steps"],
        "upstream_steps": last["step"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", choices=sorted(SETUPS), default="tiny")
    p.add_argument("--steps", type=int, help="training steps per side (default: the experiment's)")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: the experiment's)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds (initial weights and data order)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="40 steps, 16 + 8 clips: a smoke run, no verdicts")
    p.add_argument("--out", type=Path, default=Path("outputs/bench-quality"), help="work folder and report")
    args = p.parse_args(argv)
    setup = dict(SETUPS[args.experiment])
    if args.quick:
        setup.update(steps=40, eval_every=20, train=16, val=8)
    setup.update({k: v for k, v in (("steps", args.steps), ("eval_every", args.eval_every)) if v})
    from resilient_train.config import compose, typed

    cfg = typed(compose([f"+experiment={args.experiment}", *setup["overrides"]]))
    n, size = int(cfg.data.num_frames), int(cfg.model.image_size)
    clips = write_clips(
        args.out.resolve() / "clips", train=setup["train"], val=setup["val"], num_frames=n, image_size=size
    )
    readers = {split: check_readers(clips / split, n, size) for split in ("train", "val")}
    print(
        f"clips: {setup['train']} train + {setup['val']} held out, {n} frames of {size}x{size}, lossless MP4; "
        f"both readers decode them identically (upstream's reads {readers['val']['frames_upstream_reads']} of "
        f"{readers['val']['frames_in_file']} frames per file)",
        flush=True,
    )
    seeds = []
    for seed in range(args.seeds):
        print(f"seed {seed}: {setup['steps']} steps per side ...", flush=True)
        seeds.append(
            evaluate_seed(args.out.resolve() / f"seed{seed}", setup, args.experiment, clips, seed, args.device)
        )
    result = {
        "experiment": args.experiment,
        "setup": setup,
        "device": args.device,
        "readers": readers,
        "seeds": seeds,
        "verdicts": {} if args.quick else verdicts(seeds, setup["steps"]),
    }
    (args.out / "quality.json").write_text(json.dumps(result, indent=1))
    ok = report(result, args.out / "quality.png")
    print(f"wrote {args.out / 'quality.json'} and {args.out / 'quality.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
