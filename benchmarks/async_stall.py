"""The async save's stall (``async_stall_vs_sync``): how long ``Trainer.save_checkpoint`` blocks the loop with
``async_save`` / without; beside it the manager's share alone and the floor, one plain copy of the same bytes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.jobs import TENSOR_GROUPS
from benchmarks.report import Result
from benchmarks.timing import interleaved, median, say
from resilient_train.checkpoint import CheckpointManager


def _time_trainer_saves(trainer, reps: int) -> tuple[dict[str, list[float]], list[float], float]:
    """Blocked seconds of Trainer.save_checkpoint, async and sync; the background time left after each
    async save; the blocked seconds of the first async save (which allocates the snapshot buffers)."""
    mgr = trainer.ckpt
    waits: list[float] = []

    def run(async_save: bool):
        def fn():
            mgr.async_save = async_save
            trainer.counters.step += 1  # a new checkpoint name each time
            trainer.save_checkpoint(val_loss=None, is_best=False)

        return fn

    def after(name: str) -> None:
        t0 = time.perf_counter()
        mgr.wait()
        if name == "async":
            waits.append(time.perf_counter() - t0)

    run(False)()
    t0 = time.perf_counter()
    run(True)()  # the first async save allocates the snapshot buffers (reused by every later one)
    first_async = time.perf_counter() - t0
    mgr.wait()
    t = interleaved({"async": run(True), "sync": run(False)}, reps, after=after)
    mgr.async_save = False
    return t, waits, first_async


def _time_manager_saves(state: dict[str, Any], work: Path, reps: int) -> dict[str, list[float]]:
    """The same with the manager alone (state_dict() and the metadata are the trainer's share)."""
    own = {False: CheckpointManager(work / "sync", keep_last=1), True: CheckpointManager(work / "async", keep_last=1)}
    steps = iter(range(1, 10**6))

    def msave(async_save: bool):
        def fn():
            own[async_save].async_save = async_save
            own[async_save].save(next(steps), state, tensor_groups=TENSOR_GROUPS)

        return fn

    msave(True)()
    own[True].wait()
    return interleaved({"async": msave(True), "sync": msave(False)}, reps, after=lambda n: own[True].wait())


def bench_async(trainer, work: Path, reps: int) -> dict[str, Result]:
    """Blocked time of Trainer.save_checkpoint, async vs sync; plus the manager's share, on a prepared state."""
    mgr = trainer.ckpt
    t, waits, first_async = _time_trainer_saves(trainer, reps)
    say(f"  async done: blocked async {median(t['async']):.3f}s sync {median(t['sync']):.3f}s")
    nbytes = sum(p.stat().st_size for p in mgr.last_saved.iterdir())
    state = trainer.state_dict()
    tm = _time_manager_saves(state, work, reps)
    tsd = interleaved({"state_dict": trainer.state_dict}, reps)["state_dict"]
    floor = _copy_floor(state, reps)
    say(f"  floor: a bare copy of the same {floor['bytes'] / 1e6:.1f} MB into reused buffers {floor['secs']:.3f}s")
    return {
        "async_stall_vs_sync": Result(
            {
                "floor_s": floor["secs"],
                "floor": "ctypes.memmove of every tensor of the state into buffers allocated beforehand "
                "(one memory copy)",
                "floor_ratio": floor["secs"] / median(t["sync"]),
                "snapshot_bytes": floor["bytes"],
                "async_extra_bytes_held": mgr.snapshot_bytes,
                "ours_s": median(t["async"]),
                "baseline_s": median(t["sync"]),
                "ours_bytes": nbytes,
                "baseline_bytes": nbytes,
                "ours": "Trainer.save_checkpoint with checkpoint.async_save=true: time until it returns",
                "baseline": "Trainer.save_checkpoint, synchronous",
                "ours_samples_s": t["async"],
                "baseline_samples_s": t["sync"],
                "async_background_remaining_s": median(waits),
                "first_async_blocked_s": first_async,
                "manager_only_async_s": median(tm["async"]),
                "manager_only_sync_s": median(tm["sync"]),
                "manager_only_ratio": median(tm["async"]) / median(tm["sync"]),
                "trainer_state_dict_s": median(tsd),
            }
        )
    }


def _copy_floor(state: dict[str, Any], reps: int) -> dict[str, Any]:
    """The physical limit of an async save's stall: one plain copy of the state's tensor bytes."""
    import ctypes

    tensors: list[torch.Tensor] = []

    def collect(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            tensors.append(obj.detach().contiguous())
        elif isinstance(obj, dict):
            for v in obj.values():
                collect(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                collect(v)

    collect(state)
    # Tensors on a GPU: one copy into page-locked host memory, waited for once (what the snapshot does).
    bufs = [torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda) for t in tensors]
    cuda = any(t.is_cuda for t in tensors)

    def copy() -> None:
        for b, t in zip(bufs, tensors):
            if t.is_cuda:
                b.copy_(t, non_blocking=True)
            else:
                ctypes.memmove(b.data_ptr(), t.data_ptr(), t.numel() * t.element_size())
        if cuda:
            torch.cuda.synchronize()

    copy()  # fault the pages in once: the async path reuses its buffers too
    secs = median(interleaved({"copy": copy}, reps)["copy"])
    return {"secs": secs, "bytes": sum(t.numel() * t.element_size() for t in tensors)}
