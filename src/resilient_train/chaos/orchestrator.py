"""The chaos proof: an uninterrupted reference run against a run killed many times, bit for bit.

``python -m resilient_train.orchestrator`` (or ``python scripts/chaos_test.py``, ``make chaos-test``):

1. runs the experiment uninterrupted to N steps (the reference arm);
2. runs the same config with chaos on, restarting ``python -m resilient_train.cli ... resume_from=auto``
   after every death, until it reaches N or the restart budget runs out;
3. optionally SIGKILLs the chaos arm from outside at random moments (``--external-kill``);
4. compares the final checkpoints (every tensor and counter) and the per-step losses of both arms;
5. writes ``report.json``, ``report.md`` and ``loss.png`` and prints the report's path last.

With ``--nproc N`` both arms run under PyTorch's own launcher, ``torchrun --standalone
--nproc-per-node N`` (one thread per rank unless ``--set trainer.num_threads=...``): the chaos arm
is restarted by torchrun (``--max-restarts``) after every death, and relaunched by the
orchestrator (``resume_from=auto``) if torchrun gives up; each event strikes the rank the seeded
schedule picks (an external kill SIGKILLs one worker's pid, read from ``ranks/<r>/heartbeat.json``,
never torchrun). The comparison then covers every rank's files in the final checkpoints and every
rank's per-step losses.

With ``--remote`` a local S3 server (moto, :mod:`.local_s3`, its log under ``--out``) holds each
trial's checkpoints: the chaos arm runs with ``checkpoint.remote=s3://.../trial_<t>`` and the
server's environment, and the default schedule adds node losses (the trainer deletes its run
directory, then SIGKILLs itself) and, when the seed allows it, a kill during an upload. The same
command restarts it in the empty directory, and must resume from the store: the report gives the
step each node loss resumed from (the restarted process's ``resume.remote step=N``). The
reference arm needs no store (``checkpoint.*`` is not part of the config hash). The events are
kept outside the run directory (``chaos.events_dir``), so that a node loss does not take them.

The trainer is the installed package's (``python -m resilient_train.cli``), run in the caller's
working directory; everything is written under ``--out``, by default
``./outputs/chaos/<timestamp>`` relative to that working directory. Importing this module does
not import torch (the checkpoint comparison imports it when it runs).

This module owns a trial's schedule, :func:`run_trial` and the command line (:func:`main`); the
processes (both arms, the restarts, the external kills) are :mod:`.launch`; comparing the arms
and writing about them is :mod:`.report`.

Exit 0 only when every trial's arms are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..checkpoint.layout import CHECKPOINTS_DIR, UPLOAD_PHASE, committed, read_best
from ..fsio import atomic_write
from .costs import by_kind, event_costs, goodput
from .launch import TRAIN_CMD, ChaosArm, run_chaos_arm, run_command, torchrun_command
from .local_s3 import LocalS3
from .report import DIFFERENCES, checkpoint_every, compare_arms, group_restarts, markdown, node_loss_resumes, plot
from .schedule import EVENT_KINDS, read_events, save_phase

__all__ = ["main", "run_trial", "default_schedule", "TRAIN_CMD"]


def default_schedule(
    seed: int, steps: int, every: int, *, remote: bool = False, nproc: int = 1, avoid: tuple[int, ...] = ()
) -> dict[str, list[int]]:
    """Explicit event steps for one trial: two kills inside saves, a step kill, a SIGTERM, a corruption, then the
    faults beyond death (:func:`_fault_events`: a hang, a NaN, a failing save, and with ranks a bit flip);
    with ``remote`` (an object store) also two node losses, and one of the save kills during an upload.

    Save kills land on checkpoint steps (a save must be under way for them to strike). The other three
    strike after the first checkpoint; in a run too short for that (fewer than three such steps), only
    the corruption must (it damages a committed checkpoint, and does nothing before there is one), and
    the step kill and SIGTERM may come earlier. Without ``remote`` the schedule is what it always was.
    """
    rng = random.Random(seed)
    save_steps = [s for s in range(every, steps, every)]
    plain = [s for s in range(2, steps) if s % every]
    chosen_saves = sorted(rng.sample(save_steps, min(2, len(save_steps))))
    late = [s for s in plain if s > every]
    if len(late) >= 3:
        step_kill, sigterm, corrupt = ([s] for s in rng.sample(late, 3))
    else:
        corrupt = late[-1:]
        two = rng.sample([s for s in plain if s not in corrupt], min(2, len(plain) - len(corrupt)))
        step_kill, sigterm = two[:1], two[1:]
    schedule = {
        "save_kill_steps": chosen_saves,
        "step_kill_steps": step_kill,
        "sigterm_steps": sigterm,
        "corrupt_steps": corrupt,
    }
    if remote:
        schedule.update(_remote_events(seed, steps, every, schedule))
    schedule.update(_fault_events(seed, steps, every, schedule, nproc, avoid))
    return schedule


def _fault_events(
    seed: int, steps: int, every: int, schedule: dict[str, list[int]], nproc: int, avoid: tuple[int, ...]
) -> dict[str, list[int]]:
    """The faults beyond death, each at a step no other event uses (a draw of its own, so the kinds above
    stay where they always were): a hang and a NaN at steps between checkpoints, a failing save at a
    checkpoint step (not the last one, nor one in ``avoid``: the reference's best, whose checkpoint
    the chaos arm could not have; else the last step, whose save is retried at once), and with ranks a
    bit flip. A kind with no free step is left out."""
    rng = random.Random(seed * 1_000_033 + 29)
    used = {s for v in schedule.values() for s in v} | set(avoid)
    out: dict[str, list[int]] = {}
    saves = [s for s in range(every, steps, every) if s not in used]
    out["io_error_steps"] = [rng.choice(saves) if saves else steps]
    used |= set(out["io_error_steps"])
    kinds = ["hang", "nan"] + (["bitflip"] if nproc > 1 else [])
    for kind in kinds:
        free = [s for s in range(2, steps) if s % every and s not in used]
        if free:
            out[f"{kind}_steps"] = [rng.choice(free)]
            used |= set(out[f"{kind}_steps"])
    return out


def _remote_events(seed: int, steps: int, every: int, schedule: dict[str, list[int]]) -> dict[str, list[int]]:
    """With a store: a save kill moved onto a checkpoint whose seeded phase is the upload (if one is), and
    two node losses, each at least three steps after the first checkpoint so that its upload has landed."""
    rng = random.Random(seed * 1_000_003 + 17)
    saves = list(schedule["save_kill_steps"])
    uploads = [s for s in range(every, steps, every) if save_phase(seed, s, remote=True) == UPLOAD_PHASE]
    if uploads and not set(uploads) & set(saves):
        saves[rng.randrange(len(saves))] = rng.choice(uploads)
    used = {*saves, *(s for key, v in schedule.items() if key != "save_kill_steps" for s in v)}
    free = [s for s in range(every + 3, steps) if s not in used]
    return {"save_kill_steps": sorted(saves), "node_loss_steps": sorted(rng.sample(free, min(2, len(free))))}


def run_trial(args: argparse.Namespace, trial: int, out: Path, s3: LocalS3 | None = None) -> dict[str, Any]:
    """One trial under ``out/trial_<trial>``: the reference arm, the chaos arm restarted until it finishes
    (with ``s3``: uploading to it, node losses resumed from it), then both compared; the trial's entry in
    the report."""
    seed = args.seed + trial
    tdir = out / f"trial_{trial}"
    tdir.mkdir(parents=True, exist_ok=True)
    common = _common_overrides(args)
    ranked = args.nproc > 1
    ref_cmd = torchrun_command(args.nproc, 0) if ranked else list(TRAIN_CMD)
    chaos_cmd = torchrun_command(args.nproc, args.torchrun_restarts) if ranked else list(TRAIN_CMD)
    ref_dir, chaos_dir, events_dir = tdir / "reference", tdir / "chaos", tdir / "events"
    t0 = time.time()
    rc, _ = run_command([*ref_cmd, *common, f"hydra.run.dir={ref_dir}"], tdir / "reference.log")
    ref_secs = time.time() - t0
    if rc != 0:
        return _failed(trial, args.steps, 0, f"reference run failed with exit {rc}; see {tdir / 'reference.log'}")

    chaos_args = _chaos_overrides(args, seed, ref_dir, events_dir)
    if s3 is not None:
        chaos_args.append(f"checkpoint.remote={s3.url(f'trial_{trial}')}")
    cmd = [*chaos_cmd, *common, f"hydra.run.dir={chaos_dir}", "resume_from=auto", *chaos_args]
    t0 = time.time()
    env = s3.env() if s3 is not None else None
    arm = run_chaos_arm(args, seed, cmd, tdir / "chaos.log", chaos_dir, events_dir=events_dir, env=env)
    if arm.error is not None:
        return _failed(trial, args.steps, arm.restarts, arm.error)
    result = _compare(args, trial, arm, tdir, events_dir)
    result["seed"] = seed
    chaos_secs = time.time() - t0
    result["reference"]["secs"], result["chaos"]["secs"] = round(ref_secs, 1), round(chaos_secs, 1)
    result["goodput"] = goodput(args.steps, ref_secs, chaos_secs, result["events"])
    plot(tdir / "loss.png", ref_dir, chaos_dir, result["events"], trial)
    return result


def _compare(args: argparse.Namespace, trial: int, arm: ChaosArm, tdir: Path, events_dir: Path) -> dict[str, Any]:
    """The trial's entry in the report: both arms compared, the events, each node loss and where it resumed."""
    ref_dir, chaos_dir = tdir / "reference", tdir / "chaos"
    node_losses = node_loss_resumes(tdir / "chaos.log")
    ref_ckpt = committed(ref_dir / CHECKPOINTS_DIR)[-1]
    chaos_ckpt = committed(chaos_dir / CHECKPOINTS_DIR)[-1]
    diffs = compare_arms(
        ref_dir, chaos_dir, ref_ckpt, chaos_ckpt, nproc=args.nproc, steps=args.steps, node_losses=node_losses
    )
    ranked = args.nproc > 1
    return {
        "trial": trial,
        "identical": all(diffs[k] is None for k in DIFFERENCES),
        "steps": args.steps,
        "restarts": arm.restarts + (group_restarts(tdir / "chaos.log") if ranked else 0),
        "nproc": args.nproc,
        "exit_codes": arm.exits,
        "events": event_costs(_events(events_dir, arm.external, node_losses), tdir / "chaos.log"),
        "node_losses": node_losses,
        **diffs,
        "reference": {"run_dir": str(ref_dir), "final": str(ref_ckpt)},
        "chaos": {"run_dir": str(chaos_dir), "final": str(chaos_ckpt)},
    }


def _common_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides both arms run with."""
    common = [
        f"+experiment={args.experiment}",
        f"trainer.max_steps={args.steps}",
        "trainer.progress_bar=false",
        *args.set,
    ]
    if args.nproc > 1 and not any(s.startswith("trainer.num_threads=") for s in args.set):
        common.append("trainer.num_threads=1")  # ranks sharing a few cores: one thread each
    if not any(s.startswith("trainer.hang_timeout_secs=") for s in args.set):
        common.append(f"trainer.hang_timeout_secs={args.hang_timeout}")  # each hang costs this long
    return common


def _chaos_overrides(args: argparse.Namespace, seed: int, ref_dir: Path, events_dir: Path) -> list[str]:
    """The chaos arm's own overrides: chaos on, with the rates or the default schedule, its events kept
    outside the run directory, and the negative control."""
    chaos_args = ["chaos.enabled=true", f"chaos.seed={seed}", f"chaos.events_dir={events_dir}"]
    if args.rates:
        chaos_args += ["chaos=default"]
    else:
        every = checkpoint_every(ref_dir)
        best = read_best(ref_dir / CHECKPOINTS_DIR) or {}
        avoid = (best["step"],) if isinstance(best.get("step"), int) else ()
        schedule = default_schedule(seed, args.steps, every, remote=args.remote, nproc=args.nproc, avoid=avoid)
        for key, steps in schedule.items():
            if args.kinds and key.removesuffix("_steps") not in args.kinds:
                continue
            chaos_args.append(f"chaos.{key}=[{','.join(map(str, steps))}]")
    if args.skip_restore:
        chaos_args.append(f"chaos.skip_restore={args.skip_restore}")
    return chaos_args


def _events(
    events_dir: Path, external: list[dict[str, Any]], node_losses: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The chaos arm's events, as its trainer recorded them and as the external kills struck, by step; a
    node loss with the step its restart resumed from and where (``resumed_from``, ``source``)."""
    keys = ("kind", "step", "phase", "how", "rank", "time", "errno", "tensor")
    resumed = {loss["step"]: {k: loss[k] for k in ("resumed_from", "source")} for loss in node_losses}
    events = [
        {k: v for k, v in e.items() if k in keys}
        | (resumed.get(e.get("step"), {}) if e.get("kind") == "node_loss" else {})
        for e in read_events(events_dir)
    ] + [{k: v for k, v in e.items() if k in keys and v is not None} for e in external]
    # An external kill may strike before the first step (no step recorded): it sorts first.
    return sorted(events, key=lambda e: e["step"] if e.get("step") is not None else -1)


def _failed(trial: int, steps: int, restarts: int, error: str) -> dict[str, Any]:
    """A trial that could not reach the comparison."""
    return {"trial": trial, "identical": False, "restarts": restarts, "steps": steps, "events": [], "error": error}


def _parser() -> argparse.ArgumentParser:
    # Long on purpose: one argument per option.
    p = argparse.ArgumentParser(
        prog="python -m resilient_train.orchestrator", description="Kill, resume, compare bit for bit."
    )
    p.add_argument("--experiment", default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=None, help="default: outputs/chaos/<timestamp> under the working directory"
    )
    p.add_argument("--max-restarts", type=int, default=30)
    p.add_argument("--rates", action="store_true", help="use chaos=default rates instead of an explicit schedule")
    p.add_argument("--external-kill", action="store_true", help="also SIGKILL the trainer from outside at random")
    p.add_argument("--external-kills", type=int, default=3, help="external kills per trial (default 3)")
    p.add_argument(
        "--external-stops",
        type=int,
        default=None,
        help="with ranks: SIGSTOP one worker this many times per trial (default 1 with --nproc > 1, else 0); its "
        "peers' watchdogs must see it, then the frozen worker is SIGKILLed and torchrun restarts the group",
    )
    p.add_argument(
        "--hang-timeout",
        type=float,
        default=10.0,
        help="trainer.hang_timeout_secs for both arms (default 10): how long each hang costs",
    )
    p.add_argument(
        "--external-max",
        type=float,
        default=3.0,
        help="an external kill strikes uniformly within this many seconds after the restarted trainer's first new step",
    )
    p.add_argument(
        "--kinds",
        default="",
        help="comma-separated event kinds the default schedule keeps (default: every kind; e.g. "
        "step_kill,save_kill,sigterm,corrupt for the kills alone; external_stop names the outside SIGSTOP)",
    )
    p.add_argument(
        "--skip-restore",
        choices=["rng", "data", "scaler"],
        default="",
        help="negative control: do not restore this state on resume; the proof must then fail",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for both arms")
    p.add_argument("--nproc", type=int, default=1, help="ranks per arm, under torchrun when > 1 (default 1)")
    p.add_argument(
        "--torchrun-restarts", type=int, default=10, help="torchrun --max-restarts for the chaos arm (default 10)"
    )
    p.add_argument(
        "--remote",
        action="store_true",
        help="upload the chaos arm's checkpoints to a local S3 server (moto) and add node losses, which must "
        "resume from it",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error("--nproc must be >= 1")
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - {*EVENT_KINDS, "external_stop"})
    if unknown:
        p.error(f"--kinds: unknown kind(s) {unknown}; choose from {[*EVENT_KINDS, 'external_stop']}")
    args.kinds = kinds
    if args.external_stops is None:
        args.external_stops = 1 if args.nproc > 1 and (not kinds or "external_stop" in kinds) else 0
    elif args.external_stops > 0 and args.nproc < 2:
        p.error("--external-stops needs --nproc >= 2: the peers of a frozen rank detect it")
    out = args.out or Path.cwd() / "outputs" / "chaos" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    trials = []
    with LocalS3(out / "s3") if args.remote else contextlib.nullcontext() as s3:
        for trial in range(args.trials):
            r = run_trial(args, trial, out, s3)
            trials.append(r)
            problems = [r.get(k) for k in ("error", *DIFFERENCES)]
            print(
                f"trial {trial}: {'identical' if r['identical'] else 'DIFFERENT'} restarts={r['restarts']} "
                f"events={len(r['events'])}",
                *[f"\n  {p}" for p in problems if p],
                flush=True,
            )
    report = _report(args, trials)
    atomic_write(out / "report.json", json.dumps(report, indent=1))
    atomic_write(out / "report.md", markdown(report))
    if (out / "trial_0" / "loss.png").exists():
        shutil.copyfile(out / "trial_0" / "loss.png", out / "loss.png")
    print(out / "report.json")
    return 0 if report["identical"] else 1


def _report(args: argparse.Namespace, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """``report.json``: the verdict over every trial, then the trials."""
    return {
        "identical": all(t["identical"] for t in trials),
        "experiment": args.experiment,
        "nproc": args.nproc,
        "remote": args.remote,
        "steps": args.steps,
        "restarts": sum(t["restarts"] for t in trials),
        "events": [dict(e, trial=t["trial"]) for t in trials for e in t["events"]],
        "by_kind": by_kind([e for t in trials for e in t["events"]]),
        "first_diverging_step": next((t.get("first_diverging_step") for t in trials if not t["identical"]), None),
        "trials": trials,
    }


if __name__ == "__main__":
    sys.exit(main())
