"""The chaos proof's comparison and report: both arms' results compared bit for bit, and what is written about it.

Owns: the comparison of the two arms of a trial (:func:`compare_arms`: final checkpoints with
:func:`resilient_train.checkpoint.compare_checkpoints`, every rank's per-step losses with
:func:`compare_histories`, the best pointers, and whether every node loss was recovered from the
object store); ``report.md`` (:func:`markdown`); a trial's ``loss.png`` (:func:`plot`); and the
small readers of a run's files the orchestrator needs (:func:`last_step`,
:func:`checkpoint_every`, :func:`group_restarts`, :func:`node_loss_resumes`).

A node loss takes the run directory with it, ``history.jsonl`` included: the per-step losses are
then compared from the step after the one the last node loss resumed from (each of those steps
exactly once); the final checkpoints are compared in full, as always.

Importing this module does not import torch (the checkpoint comparison imports it when it runs)
nor matplotlib (the plot imports it when it draws).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoint.layout import CHECKPOINTS_DIR, read_best
from ..monitor import read_history

__all__ = [
    "DIFFERENCES",
    "compare_arms",
    "compare_histories",
    "markdown",
    "plot",
    "last_step",
    "checkpoint_every",
    "group_restarts",
    "node_loss_resumes",
]

#: The keys of :func:`compare_arms`'s answer that name a difference; a trial is identical when all are None.
DIFFERENCES = ("checkpoint_difference", "history_difference", "best_difference", "node_loss_difference")


def compare_histories(ref: list[dict[str, Any]], other: list[dict[str, Any]], steps: int, first: int = 1) -> str | None:
    """The first step (from ``first`` on) whose train loss differs, or at which a step is missing or repeated."""
    ref, other = ([r for r in rs if int(r.get("step", 0)) >= first] for rs in (ref, other))

    def by_step(records: list[dict[str, Any]], kind: str) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        for r in records:
            if r.get("kind") == kind:
                out.setdefault(int(r["step"]), []).append(r)
        return out

    for kind, keys in (("train", ("loss", "recon_loss", "discr_loss", "lr")), ("eval", ("val_loss",))):
        a, b = by_step(ref, kind), by_step(other, kind)
        for step in sorted(set(a) | set(b)):
            ra, rb = a.get(step, []), b.get(step, [])
            if len(rb) != len(ra):
                return f"step {step}: {kind} record appears {len(ra)}x in the reference, {len(rb)}x after chaos"
            for x, y in zip(ra, rb):
                for k in keys:
                    if x.get(k) != y.get(k):
                        return f"step {step}: {kind} {k} {x.get(k)!r} (reference) vs {y.get(k)!r} (chaos)"
    train_steps = sorted(int(r["step"]) for r in other if r.get("kind") == "train")
    if train_steps != list(range(first, steps + 1)):
        return f"chaos arm logged train steps {train_steps[:5]}... not exactly {first}..{steps}"
    return None


def compare_arms(
    ref_dir: Path,
    chaos_dir: Path,
    ref_ckpt: Path,
    chaos_ckpt: Path,
    *,
    nproc: int,
    steps: int,
    node_losses: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The first difference (None where there is none) between the arms' final checkpoints ``ref_ckpt`` and
    ``chaos_ckpt``, their per-step losses (rank 0's history, then every other rank's; after a node loss
    from the step after the one it resumed from) and their best pointers; the first node loss that was
    not resumed from the store (``node_losses``: :func:`node_loss_resumes`); the step at which the
    losses first differ and the first step compared (``history_from``)."""
    # torch: only once the arms are run and compared, so that importing this module stays light.
    from ..checkpoint import compare_checkpoints

    ckpt_diff = compare_checkpoints(ref_ckpt, chaos_ckpt)
    hist_diff = None
    first = (node_losses[-1]["resumed_from"] or 0) + 1 if node_losses else 1
    for rank in range(nproc):  # rank 0's history.jsonl, then every other rank's own losses
        where = (lambda d: d) if rank == 0 else (lambda d, r=rank: d / "ranks" / str(r))
        diff = compare_histories(read_history(where(ref_dir)), read_history(where(chaos_dir)), steps, first)
        if diff is not None:
            hist_diff = diff if rank == 0 else f"rank {rank}: {diff}"
            break
    best = [_best(d) for d in (ref_dir, chaos_dir)]
    best_diff = None if best[0] == best[1] else f"best pointer {best[0]} (reference) vs {best[1]} (chaos)"
    return {
        "checkpoint_difference": ckpt_diff,
        "history_difference": hist_diff,
        "best_difference": best_diff,
        "node_loss_difference": _unrecovered(node_losses),
        "first_diverging_step": _first_step(hist_diff),
        "history_from": first,
    }


def _unrecovered(node_losses: Sequence[dict[str, Any]]) -> str | None:
    """The first node loss whose restart did not resume from the object store, said in words."""
    for loss in node_losses:
        if loss["source"] != "store":
            how = {
                "local": f"from a local checkpoint (step {loss['resumed_from']}) that should have gone with the node",
                "fresh": "from nothing (a fresh start at step 0)",
                None: "never (no start followed it)",
            }[loss["source"]]
            return f"node loss at step {loss['step']}: the restart resumed {how}, not from the object store"
    return None


# -- a run directory's files -------------------------------------------------------------------


def group_restarts(log_path: Path) -> int:
    """Times torchrun restarted the group within its launches (rank 0 joined a group with restart > 0)."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return sum(1 for line in text.splitlines() if "dist.init rank=0 " in line and " restart=0 " not in line)


_NODE_LOSS_LINE = re.compile(r"chaos\.node_loss step=(\d+) rank=(\d+)")
#: What a start logs about its checkpoint: downloaded from the store, resumed (any checkpoint), or none.
_RESUME_LINE = re.compile(r"resume\.remote step=(\d+)|\bresume step=(\d+)|\bresume\.none\b")


def node_loss_resumes(log_path: Path) -> list[dict[str, Any]]:
    """Each node loss in the chaos arm's log (``chaos.node_loss step=S rank=R``), in order, with where the
    next start resumed: ``resumed_from`` (its step; 0 for a fresh start, None if no start followed)
    and ``source``: ``store`` (``resume.remote step=N``), ``local`` (``resume step=N`` alone) or ``fresh``."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    losses: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    for line in text.splitlines():
        if m := _NODE_LOSS_LINE.search(line):
            pending.append({"step": int(m[1]), "rank": int(m[2]), "resumed_from": None, "source": None})
            losses.append(pending[-1])
        elif (r := _RESUME_LINE.search(line)) and pending:
            for loss in pending:
                loss["resumed_from"] = int(r[1] or r[2] or 0)
                loss["source"] = "store" if r[1] else "local" if r[2] else "fresh"
            pending = []
    return losses


def checkpoint_every(run_dir: Path) -> int:
    """The run's ``checkpoint.every_n_steps``, from the ``config.yaml`` it wrote."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return int(cfg["checkpoint"]["every_n_steps"])


def _best(run_dir: Path) -> Any:
    best = read_best(run_dir / CHECKPOINTS_DIR)
    return best.get("step") if best else None


def _first_step(diff: str | None) -> int | None:
    if diff and diff.startswith("step "):
        return int(diff.split(":")[0].split()[1])
    return None


def last_step(run_dir: Path) -> int | None:
    """The last train step the run logged (None before its first)."""
    hist = [r for r in read_history(run_dir) if r.get("kind") == "train"]
    return int(hist[-1]["step"]) if hist else None


# -- what is written -----------------------------------------------------------------------------


def plot(path: Path, ref_dir: Path, chaos_dir: Path, events: list[dict[str, Any]], trial: int) -> None:
    """A trial's ``loss.png``: both arms' reconstruction losses (the total goes below zero once the GAN's term
    grows), on a linear axis where every value is visible, each event a dotted line at its step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for run_dir, label, style in ((ref_dir, "reference (uninterrupted)", "-"), (chaos_dir, "chaos (killed)", "--")):
        recs = [r for r in read_history(run_dir) if r.get("kind") == "train"]
        key = "recon_loss" if all(r.get("recon_loss") is not None for r in recs) else "loss"
        ax.plot([r["step"] for r in recs], [r[key] for r in recs], style, label=label, linewidth=1.2)
    colors = {
        "step_kill": "red",
        "save_kill": "purple",
        "sigterm": "orange",
        "corrupt": "brown",
        "node_loss": "green",
        "external_kill": "black",
        "external_stop": "gray",
        "hang": "blue",
        "nan": "magenta",
        "bitflip": "cyan",
        "io_error": "olive",
    }
    seen = set()
    for e in events:
        if e.get("step") is None:
            continue
        kind = e["kind"]
        ax.axvline(
            e["step"],
            color=colors.get(kind, "gray"),
            linestyle=":",
            linewidth=1,
            label=kind if kind not in seen else None,
        )
        seen.add(kind)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train reconstruction loss")
    ax.set_title(f"chaos trial {trial}: both arms, faults marked")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def markdown(report: dict[str, Any]) -> str:
    """``report.md``: the verdict, then each trial's events and differences."""
    lines = [
        f"# Chaos test: {'IDENTICAL' if report['identical'] else 'DIFFERENT'}",
        "",
        f"- experiment: `{report['experiment']}`, steps: {report['steps']}, trials: {len(report['trials'])}, "
        f"ranks: {report.get('nproc', 1)}",
        f"- restarts: {report['restarts']}, events: {len(report['events'])}",
        "",
        *(_by_kind_lines(report["by_kind"]) if report.get("by_kind") else []),
    ]
    for t in report["trials"]:
        lines += [f"## Trial {t['trial']}: {'identical' if t['identical'] else 'DIFFERENT'}", ""]
        if t.get("error"):
            lines += [f"error: {t['error']}", ""]
            continue
        lines += [
            "| step | event | rank | detail | detected by | detected after s | recovery | back to step | steps redone "
            "| fault to first new step s |",
            "| ---: | --- | ---: | --- | --- | ---: | --- | ---: | ---: | ---: |",
        ]
        for e in t["events"]:
            step = e.get("step", "-")  # an external kill before the restarted trainer's first step has none
            lines.append(
                f"| {step} | {e['kind']} | {e.get('rank', 0)} | {_detail(e)} | {e.get('detected_by', '-')} | "
                f"{_num(e.get('detect_secs'))} | {e.get('recovery') or '-'} | {_num(e.get('resumed_from'))} | "
                f"{_num(e.get('redone'))} | {_num(e.get('to_new_step_secs'))} |"
            )
        first = t.get("history_from", 1)
        every = "identical at every step" + (
            f" from {first} (steps 1-{first - 1} were lost with the node)" if first > 1 else ""
        )
        lines += [
            "",
            f"- restarts: {t['restarts']}, exit codes: {t['exit_codes']}",
            f"- final checkpoints: {t['checkpoint_difference'] or 'identical, bit for bit'}",
            f"- per-step losses: {t['history_difference'] or every}",
            f"- best pointer: {t['best_difference'] or 'same step'}",
        ]
        if t.get("node_losses"):
            lines.append(f"- node losses: {t['node_loss_difference'] or 'every restart resumed from the store'}")
        lines += [
            f"- time: reference {t['reference']['secs']} s, chaos arm {t['chaos']['secs']} s",
            _goodput_line(t.get("goodput")),
            f"- plot: `trial_{t['trial']}/loss.png`",
            "",
        ]
    return "\n".join(lines)


def _num(x: Any) -> str:
    return "-" if x is None else str(x)


def _goodput_line(g: dict[str, Any] | None) -> str:
    if not g:
        return "- goodput: -"
    return (
        f"- goodput: time {g['time']} (reference wall time / chaos wall time), steps {g['steps']} "
        f"({g['steps_computed'] - g['steps_redone']} useful of {g['steps_computed']} computed, "
        f"{g['steps_redone']} redone)"
    )


def _by_kind_lines(by_kind: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| event kind | count | mean detected after s | mean fault to first new step s | steps redone |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, k in by_kind.items():
        lines.append(
            f"| {kind} | {k['count']} | {_num(k['detect_secs'])} | {_num(k['to_new_step_secs'])} | {k['redone']} |"
        )
    return [*lines, ""]


def _detail(event: dict[str, Any]) -> str:
    if event["kind"] == "node_loss":
        source = event.get("source") or "no restart"
        return f"resumed from step {event.get('resumed_from')} ({source})"
    if event["kind"] == "io_error":
        return f"{event.get('errno', '')} at {event.get('phase', '')}"
    if event["kind"] == "bitflip":
        return f"{event.get('tensor', '')}"
    return event.get("phase") or event.get("how") or ""
