"""The object store (``checkpoint.remote``) against plain obstore and the local disk, on moto's S3 server
(:class:`resilient_train.chaos.local_s3.LocalS3`, real HTTP on 127.0.0.1) started in the same run.

  upload_vs_raw_put           checkpoint.remote.upload of a magvit64 checkpoint (every file, sizes confirmed
                              by one listing, manifest last) / obstore.put of the same files, one after another
                              (no listing, no ordering); the raw put is the floor through this client
  download_verify_vs_raw_get  remote_checkpoints (one listing, the manifest fetched) + remote.download (fsync per
                              file, directory fsync, rename) + load_checkpoint (sizes, hashes, decode) into a
                              fresh folder / obstore.get of the same objects streamed into files, fsync per file;
                              the raw get is the floor through this client; beside it, the download alone
  stall_remote_vs_local       wall time of the timed steps of Trainer.fit (magvit64, async_save, keep_last=1)
                              checkpointing every 3 steps with the manager's uploader on / off; beside it, the
                              seconds one upload costs the loop
  recovery_remote_vs_local    a node loss: process start -> first new step of ``python -m resilient_train.cli
                              resume_from=auto checkpoint.remote=URL`` in an EMPTY run directory / the same
                              resume from a copy of the run directory on the local disk (reported, no target)

The checkpoint is a real one: a one-step magvit64 run of the command line (65.5 MB; see :mod:`.resume`).
The server shares the machine's cores with the trainer and the client (on a real deployment it is another
machine), so every number here pays for the server's CPU too; the stall row prints its CPU seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.loop import fit_steps
from benchmarks.report import Result
from benchmarks.resume import run_base, time_to_step, train_args
from benchmarks.save_load import _entry
from benchmarks.timing import durations, interleaved, median, say, within_budget
from resilient_train.chaos.local_s3 import LocalS3
from resilient_train.checkpoint import load_checkpoint, parse_step
from resilient_train.checkpoint.remote import download, remote_checkpoints, upload
from resilient_train.checkpoint.store import Store
from resilient_train.checkpoint.uploader import Uploader

CLIENT = "obstore (the client checkpoint.remote uses), moto's S3 server on 127.0.0.1"


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` in ``os.environ`` (for this process's clients and the trainers it starts), then the old values."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plain_store(url: str):
    """obstore's own store at ``url``, as a user of the library makes it (credentials and endpoint from
    the environment); no timeouts or retries of ours."""
    from obstore.store import from_url

    return from_url(url.rstrip("/") + "/", client_options={"allow_http": True})


def empty(raw, prefix: str) -> None:
    """Delete every object under ``prefix`` of the obstore store ``raw`` (moto keeps them in memory)."""
    import obstore

    keys = [str(m["path"]) for chunk in obstore.list(raw, prefix=prefix or None) for m in chunk]
    if keys:
        obstore.delete(raw, keys)


def server_cpu_s(s3: LocalS3) -> float:
    """CPU seconds (user + system) the server process has used so far."""
    fields = Path(f"/proc/{s3.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def files_of(ckpt: Path) -> list[str]:
    """Every file of the checkpoint folder ``ckpt`` (``ranks/0/state.json`` too), relative to it."""
    return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())


def bench_upload(s3: LocalS3, ckpt: Path, reps: int) -> dict[str, Result]:
    """Our upload of ``ckpt`` and a plain put of its files, interleaved; every object removed after each."""
    import obstore

    root = plain_store(s3.url(""))
    ours, raw = Store(s3.url("up-ours")), plain_store(s3.url("up-raw"))
    files = files_of(ckpt)
    nbytes = sum((ckpt / rel).stat().st_size for rel in files)

    def put_raw() -> None:
        for rel in files:
            obstore.put(raw, f"{ckpt.name}/{rel}", ckpt / rel)

    fns = {"ours": lambda: upload(ours, ckpt), "raw": put_raw}
    for fn in fns.values():  # warm-up: connections, first-call costs
        fn()
    t = interleaved(fns, reps, after=lambda name: empty(root, f"up-{name}/"))
    say(f"  upload {nbytes / 1e6:.1f} MB: ours {median(t['ours']):.3f}s, raw put {median(t['raw']):.3f}s")
    entry = _transfer(
        "checkpoint.remote.upload: every file (obstore.put of the path), one listing confirming the sizes, "
        "then manifest.json",
        "obstore.put of the same files (paths), one after another: no listing, no manifest ordering",
        t,
        len(files),
        nbytes,
        "the raw put: the same bytes through the same client",
    )
    return {"upload_vs_raw_put": entry}


def bench_download(s3: LocalS3, ckpt: Path, work: Path, reps: int) -> dict[str, Result]:
    """Download and verify ``ckpt`` from the store, and a plain get of the same objects, interleaved."""
    import obstore

    store, raw = Store(s3.url("down")), plain_store(s3.url("down"))
    upload(store, ckpt)
    names = files_of(ckpt)
    nbytes = sum((ckpt / n).stat().st_size for n in names)
    dest = {name: work / f"down-{name}" for name in ("ours", "raw", "fetch")}

    def fetch(name: str = "fetch") -> Path:
        found = [c for c in remote_checkpoints(store) if c.committed]
        return download(store, found[-1], dest[name])

    def ours() -> None:
        load_checkpoint(fetch("ours"))

    def get_raw() -> None:
        for n in names:
            (dest["raw"] / n).parent.mkdir(parents=True, exist_ok=True)
            with open(dest["raw"] / n, "xb") as f:
                for chunk in obstore.get(raw, f"{ckpt.name}/{n}").stream():
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())

    fns = {"ours": ours, "raw": get_raw, "fetch": fetch}

    def clear(name: str) -> None:
        shutil.rmtree(dest[name])

    for name, fn in fns.items():  # warm-up
        fn()
        clear(name)
    t = interleaved(fns, reps, after=clear)
    empty(raw, "")
    say(
        f"  download {nbytes / 1e6:.1f} MB: ours (+ verify) {median(t['ours']):.3f}s, raw get {median(t['raw']):.3f}s, "
        f"download alone {median(t['fetch']):.3f}s"
    )
    entry = _transfer(
        "remote_checkpoints (one listing, manifest fetched) + remote.download (fsync per file and directory, "
        "rename) + load_checkpoint (sizes, xxh3 hashes, safe decode) into a fresh folder",
        "obstore.get of the same objects streamed into files, fsync per file (no listing, no hashing, no decode)",
        t,
        len(names),
        nbytes,
        "the raw get: the same bytes through the same client into files",
        download_only_s=median(t["fetch"]),
        download_only_samples_s=t["fetch"],
        download_only_is="remote_checkpoints + remote.download without load_checkpoint, interleaved with the two sides",
    )
    return {"download_verify_vs_raw_get": entry}


def _transfer(
    ours: str, baseline: str, t: dict[str, list[float]], files: int, nbytes: int, floor: str, **extra
) -> Result:
    """A transfer row: ``t["ours"]`` against ``t["raw"]``, which is also the floor through this client."""
    extra.update(files=files, client=CLIENT, floor_s=median(t["raw"]), floor_ratio=1.0)
    return _entry(
        ours, baseline, t["ours"], t["raw"], nbytes, nbytes, floor=f"{floor} (the baseline is the floor)", **extra
    )


def bench_stall(s3: LocalS3, trainer, every: int, saves: int, pairs: int, budget_s: float) -> dict[str, Result]:
    """Runs of ``(saves + 1) * every`` fit steps from a multiple of ``every``, checkpointing every ``every``
    steps: ``saves`` saves inside the timed window, the last one at the end (after the last record); order
    alternating. The uploader is the one the manager builds for ``checkpoint.remote`` (its retention too)."""
    mgr = trainer.ckpt
    saved = (mgr.every_n_steps, mgr.async_save, mgr.keep_last, mgr.uploader)
    uploader = Uploader(Store(s3.url("stall")), mgr.root, keep_last=1)
    n = (saves + 1) * every
    secs: dict[str, list[float]] = {"remote": [], "local": []}
    calls: dict[str, list[float]] = {"remote": [], "local": []}
    server: list[float] = []
    mgr.every_n_steps, mgr.async_save, mgr.keep_last = every, True, 1
    try:
        for p in within_budget(pairs, budget_s, "stall"):
            for kind in ("remote", "local") if p % 2 == 0 else ("local", "remote"):
                mgr.uploader = uploader if kind == "remote" else None
                step0 = -(-trainer.counters.step // every) * every
                c0, t0 = server_cpu_s(s3), time.perf_counter()
                secs[kind].append(sum(durations(fit_steps(trainer, step0, n))))
                calls[kind].append(time.perf_counter() - t0)
                if kind == "remote":
                    server.append(server_cpu_s(s3) - c0)
    finally:
        mgr.every_n_steps, mgr.async_save, mgr.keep_last, mgr.uploader = saved
        uploader.close()
    say(f"  stall: store on {median(secs['remote']):.2f}s, off {median(secs['local']):.2f}s ({n - 1} timed steps)")
    entry = {
        "ours_s": median(secs["remote"]),
        "baseline_s": median(secs["local"]),
        "ours": f"Trainer.fit, magvit64, checkpoint every {every} steps (async_save, keep_last=1), uploader on "
        "(retention on the store too)",
        "baseline": "the same with no store",
        "ours_samples_s": secs["remote"],
        "baseline_samples_s": secs["local"],
        "pair_ratios": [a / b for a, b in zip(secs["remote"], secs["local"])],
        "ratio_is": "median over (on, off) pairs of the wall time of the timed steps, store on / off",
        "stall_s_per_save": median([(a - b) / saves for a, b in zip(secs["remote"], secs["local"])]),
        "stall_s_per_save_is": "median over the pairs of (on - off) seconds / saves in the window: what one "
        "upload costs the loop here",
        "timed_steps_per_run": n - 1,
        "saves_in_window": saves,
        "fit_call_s": calls,
        "fit_call_is": "the whole fit call: first step, final eval, final save and (store on) the wait for its upload",
        "server_cpu_s_per_run": server,
        "server_cpu_is": "CPU seconds of moto's server during each store-on run: on these cores, not on a real store's",
    }
    return {"stall_remote_vs_local": Result(entry)}


def _secs_in_log(log: Path, event: str) -> float | None:
    """The ``secs=`` of the log line of ``event`` (``ckpt.download``, ``ckpt.read``), if there is one."""
    for line in log.read_text().splitlines():
        if f"{event} " in line and "secs=" in line:
            return float(line.rsplit("secs=", 1)[1].split()[0])
    return None


def bench_recovery(s3: LocalS3, ckpt: Path, work: Path, reps: int, budget_s: float) -> dict[str, Result]:
    """A resume in an empty run directory from the store, beside one from a copy of the run directory
    (``ckpt``'s), interleaved."""
    base, step, url = ckpt.parent.parent, parse_step(ckpt.name), s3.url("recovery")
    upload(Store(url), ckpt)
    secs: dict[str, list[float]] = {"remote": [], "local": []}
    logged: dict[str, list[float | None]] = {"download": [], "remote_read": [], "local_read": []}
    for r in within_budget(reps, budget_s, "recovery"):
        for kind in ("remote", "local") if r % 2 == 0 else ("local", "remote"):
            run, log = work / f"{kind}-{r}", work / f"{kind}-{r}.log"
            extra = [f"checkpoint.remote={url}"] if kind == "remote" else []
            if kind == "local":
                shutil.copytree(base, run)
            args = train_args(run, "resume_from=auto", "trainer.max_steps=20", *extra)
            secs[kind].append(time_to_step(run, args, step + 1, log))
            logged[f"{kind}_read"].append(_secs_in_log(log, "ckpt.read"))
            if kind == "remote":
                logged["download"].append(_secs_in_log(log, "ckpt.download"))
            shutil.rmtree(run, ignore_errors=True)
    say(f"  recovery: from the store {median(secs['remote']):.2f}s, local disk {median(secs['local']):.2f}s")
    pair_ratios = [a / b for a, b in zip(secs["remote"], secs["local"])]
    entry = {
        "ours_s": median(secs["remote"]),
        "baseline_s": median(secs["local"]),
        "ours_bytes": sum((ckpt / rel).stat().st_size for rel in files_of(ckpt)),
        "ours": f"resilient_train.cli +experiment=magvit64 resume_from=auto checkpoint.remote={url} in an empty run "
        f"directory (a lost node): Popen -> step {step + 1} recorded",
        "baseline": f"the same resume from a copy of the run directory (checkpoint on the local disk, no store): "
        f"Popen -> step {step + 1} recorded",
        "ours_samples_s": secs["remote"],
        "baseline_samples_s": secs["local"],
        "pair_ratios": pair_ratios,
        "ratio_is": "median over adjacent (store, local) pairs of store seconds / local seconds",
        "download_s_in_log": logged["download"],
        "remote_read_s_in_log": logged["remote_read"],
        "local_read_s_in_log": logged["local_read"],
    }
    return {"recovery_remote_vs_local": Result(entry)}


def bench_remote(trainer, work: Path, reps: int, quick: bool) -> dict[str, Result]:
    """Every row above, against one server: upload, download, recovery (processes), then the loop's stall."""
    out: dict[str, Result] = {}
    with LocalS3(work / "s3") as s3, environment(s3.env()):
        say(f"  moto's S3 server at {s3.endpoint}; a one-step magvit64 run for the checkpoint")
        ckpt = run_base(work / "base", 1)
        out.update(bench_upload(s3, ckpt, reps))
        out.update(bench_download(s3, ckpt, work, reps))
        out.update(bench_recovery(s3, ckpt, work, 1 if quick else 5, budget_s=150))
        stall = dict(every=3, saves=1, pairs=1 if quick else 5)
        out.update(bench_stall(s3, trainer, **stall, budget_s=150))
    return out
