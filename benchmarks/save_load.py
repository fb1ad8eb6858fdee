"""Checkpoint save and load against their baselines, on the magvit64 trainer's state.

save_vs_raw_fsync        CheckpointManager.save (sync) / the same encoded bytes written with plain
                         os.write + fsync per file (no directory fsync, no hashing)
save_vs_torch_save       ... / torch.save(state, one_file) (no fsync: not durable)
save_vs_magvit2_trainer  ... / magvit2_pytorch VideoTokenizerTrainer.save() on the same model
load_vs_raw_read         load_checkpoint (manifest, sizes, hashes, safe parse) / reading the same
load_vs_raw_read_cold    files into memory: from the page cache, and each file evicted from it first;
                         beside the first, its floor: the same reads, each file also hashed (XXH3-128),
                         and the format's own library (safetensors.torch.load_file, no hash)
load_vs_torch_load       load_checkpoint / torch.load of the same state saved by torch.save
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import xxhash

from benchmarks.jobs import TENSOR_GROUPS
from benchmarks.report import Result
from benchmarks.timing import interleaved, median, say
from resilient_train.checkpoint import CheckpointManager, load_checkpoint
from resilient_train.checkpoint.files import iter_files


def encoded_files(state: dict[str, Any]) -> dict[str, bytes]:
    """file name -> the bytes a checkpoint of ``state`` holds in that file."""
    return {p.name: b"".join(p.pieces) for p in iter_files(state, TENSOR_GROUPS)}


def read_into_new_buffer(path: Path) -> np.ndarray:
    """The baseline read: the whole file into a new buffer allocated the way ``load_checkpoint``'s are (numpy).

    ``read_bytes()`` was 5 ms or 29 ms for the same 65.5 MB in the same process, depending on whether the
    allocator handed it pages already faulted in: the baseline must allocate as ours does, or the ratio
    measures the allocator's state, not the reading.
    """
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = np.empty(size, dtype=np.uint8)
        view, pos = memoryview(buf), 0
        while pos < size:
            n = f.readinto(view[pos:])
            if not n:
                raise OSError(f"{path}: shorter than {size} bytes")
            pos += n
    return buf


def write_raw(dir_: Path, files: dict[str, bytes]) -> None:
    """The baseline: the same bytes, plain writes, one fsync per file."""
    dir_.mkdir()
    for name, data in files.items():
        fd = os.open(dir_ / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def build_magvit2_trainer(trainer, work: Path):
    """magvit2-pytorch's own trainer around the *same* model object, its optimizer state made equal to ours.

    ``VideoTokenizerTrainer`` accepts a ``dataset`` directly, so our synthetic train split serves;
    nothing is downloaded. With ``wd=0`` its optimizers are single-group ``Adam``s over the same
    parameter lists as ours, so our optimizer states load into them unchanged: the saved moments
    are the same tensors without running its (accelerate/autocast) train step.
    """
    from magvit2_pytorch.trainer import VideoTokenizerTrainer

    vt = VideoTokenizerTrainer(
        trainer.model,
        batch_size=1,
        num_train_steps=1,
        dataset=trainer.train_ds,
        valid_frac=0.0,
        checkpoints_folder=str(work / "m2_ckpts"),
        results_folder=str(work / "m2_results"),
        optimizer_kwargs=dict(wd=0.0),
        accelerate_kwargs=dict(cpu=True),
    )
    vt.optimizer.load_state_dict(trainer.opt_gen.state_dict())
    vt.discr_optimizer.load_state_dict(trainer.opt_discr.state_dict())
    return vt


def _time_saves(trainer, state: dict[str, Any], mgr: CheckpointManager, work: Path, reps: int):
    """Seconds of each save, interleaved (ours, raw, torch, m2), and the bytes each wrote."""
    files = encoded_files(state)
    nbytes = sum(len(b) for b in files.values())
    say(f"  state: {len(files)} files, {nbytes / 1e6:.1f} MB")
    vt = build_magvit2_trainer(trainer, work)
    seq = iter(range(1, 10**6))
    last: dict[str, Path] = {}

    def ours():
        step = next(seq)
        mgr.save(step, state, tensor_groups=TENSOR_GROUPS)
        last["ours"] = mgr.last_saved

    def raw():
        last["raw"] = work / f"raw-{next(seq)}"
        write_raw(last["raw"], files)

    def tsave():
        last["torch"] = work / f"torch-{next(seq)}.pt"
        torch.save(state, last["torch"])

    def m2save():
        last["m2"] = work / f"m2-{next(seq)}.pt"
        vt.save(str(last["m2"]))

    sizes: dict[str, int] = {}

    def cleanup(name: str) -> None:
        p = last[name]
        sizes[name] = sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else p.stat().st_size
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    ours()
    cleanup("ours")  # warm-up: first-call costs (imports, allocator) on neither side
    t = interleaved({"ours": ours, "raw": raw, "torch": tsave, "m2": m2save}, reps, after=cleanup)
    say(
        f"  save done: ours {median(t['ours']):.3f}s raw {median(t['raw']):.3f}s torch {median(t['torch']):.3f}s "
        f"magvit2 {median(t['m2']):.3f}s"
    )
    return t, sizes


def _time_loads(state: dict[str, Any], mgr: CheckpointManager, reps: int):
    """One committed checkpoint, read back with full verification vs plain reads of its files: seconds
    from the page cache, seconds with each file evicted first, and the checkpoint's bytes."""
    mgr.save(0, state, tensor_groups=TENSOR_GROUPS)
    ckpt = mgr.last_saved
    names = sorted(p.name for p in ckpt.iterdir())
    load_bytes = sum((ckpt / n).stat().st_size for n in names)

    def load():
        load_checkpoint(ckpt)

    def read():
        for n in names:
            read_into_new_buffer(ckpt / n)

    def read_hash():  # the floor of a verified load: every byte read and hashed once (XXH3 holds the GIL)
        for n in names:
            xxhash.xxh3_128(read_into_new_buffer(ckpt / n)).hexdigest()

    def st_load():  # the format's own library: no manifest, no hash, the nested state left as JSON text
        for n in names:
            safetensors.torch.load_file(ckpt / n) if n.endswith(".safetensors") else (ckpt / n).read_bytes()

    pt = ckpt.parent / "state.pt"  # what magvit2-pytorch's trainer and most scripts load: one torch.save file
    torch.save(state, pt)

    def tload():
        torch.load(pt, weights_only=False)  # our own file, written just above (the bench's only pickle)

    for fn in (load, read, st_load, tload):
        fn()
    arms = {"load": load, "read": read, "read_hash": read_hash, "safetensors": st_load, "torch": tload}
    tl = interleaved(arms, reps * 2)
    pt.unlink()
    say(
        f"  load done: ours {median(tl['load']):.3f}s raw {median(tl['read']):.3f}s read and hash "
        f"{median(tl['read_hash']):.3f}s safetensors.torch.load_file {median(tl['safetensors']):.3f}s "
        f"torch.load {median(tl['torch']):.3f}s (page cache)"
    )

    def evict(name: str) -> None:  # the next reader must go to the disk
        for n in names:
            fd = os.open(ckpt / n, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    evict("")
    tc = interleaved({"load": load, "read": read}, reps, after=evict)
    say(f"  cold load: ours {median(tc['load']):.3f}s raw {median(tc['read']):.3f}s (after POSIX_FADV_DONTNEED)")
    shutil.rmtree(ckpt)
    return tl, tc, load_bytes


def _entry(a: str, b: str, ta: list[float], tb: list[float], ba: int, bb: int, **extra) -> Result:
    return Result(
        {
            "ours_s": median(ta),
            "baseline_s": median(tb),
            "ours_bytes": ba,
            "baseline_bytes": bb,
            "ours": a,
            "baseline": b,
            "ours_samples_s": ta,
            "baseline_samples_s": tb,
            **extra,
        }
    )


def bench_save_load(trainer, work: Path, reps: int) -> dict[str, Result]:
    state = trainer.state_dict()
    mgr = CheckpointManager(work / "ours", keep_last=0)
    t, sizes = _time_saves(trainer, state, mgr, work, reps)
    tl, tc, load_bytes = _time_loads(state, mgr, reps)
    ours = "CheckpointManager.save (sync, durable, hashed)"
    return {
        "save_vs_raw_fsync": _entry(
            ours, "os.write + fsync of the same encoded files", t["ours"], t["raw"], sizes["ours"], sizes["raw"]
        ),
        "save_vs_torch_save": _entry(
            ours, "torch.save(state, file), no fsync", t["ours"], t["torch"], sizes["ours"], sizes["torch"]
        ),
        "save_vs_magvit2_trainer": _entry(
            ours,
            "magvit2_pytorch VideoTokenizerTrainer.save() (torch.save of model, EMA, optimizers; no fsync)",
            t["ours"],
            t["m2"],
            sizes["ours"],
            sizes["m2"],
            note="same model object; its optimizer state loaded from ours (wd=0 -> same parameter lists); "
            "its EMA copies the whole VideoTokenizer (discriminator included), ours only the generator",
            ours_s_per_gb=median(t["ours"]) / sizes["ours"] * 1e9,
            baseline_s_per_gb=median(t["m2"]) / sizes["m2"] * 1e9,
        ),
        "load_vs_raw_read": _entry(
            "load_checkpoint (manifest, size, hash, safe decode), files in the page cache",
            "each file read whole into a new buffer (numpy, as ours), in the page cache",
            tl["load"],
            tl["read"],
            load_bytes,
            load_bytes,
            floor_s=median(tl["read_hash"]),
            floor="the same reads, each file also hashed (XXH3-128) one after the other: the least verifying costs",
            floor_ratio=median([h / r for h, r in zip(tl["read_hash"], tl["read"])]),
            floor_samples_s=tl["read_hash"],
            safetensors_load_file_s=median(tl["safetensors"]),
            safetensors_load_file_samples_s=tl["safetensors"],
            vs_safetensors_load_file=median([a / b for a, b in zip(tl["load"], tl["safetensors"])]),
        ),
        "load_vs_torch_load": _entry(
            "load_checkpoint (manifest, size, hash, safe decode), files in the page cache",
            "torch.load of the same state saved with torch.save (one file, no verification), in the page cache",
            tl["load"],
            tl["torch"],
            load_bytes,
            load_bytes,
        ),
        "load_vs_raw_read_cold": _entry(
            "load_checkpoint, each file evicted from the page cache first (posix_fadvise DONTNEED)",
            "each file read whole into a new buffer, evicted the same way",
            tc["load"],
            tc["read"],
            load_bytes,
            load_bytes,
            note="a virtual disk may cache below the guest, so 'cold' is as cold as the guest can make it",
        ),
    }
