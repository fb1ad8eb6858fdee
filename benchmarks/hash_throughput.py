"""Hash throughput (``hash_throughput``, no ratio): GB/s of each manifest hash over the magvit64 state's files,
from memory and overlapped with reading the files the way ``load_checkpoint`` does, beside the plain-read floor."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import Result
from benchmarks.save_load import encoded_files, write_raw
from benchmarks.timing import interleaved, median, say
from resilient_train.checkpoint import hashing, safetensors_io
from resilient_train.checkpoint.files import IO_THREADS


def _hash_algorithms() -> dict[str, Any]:
    """name -> constructor: the manifest's algorithms (:mod:`resilient_train.checkpoint.hashing`), and BLAKE3
    (single-threaded and with its own threads) when the ``blake3`` package is installed, for comparison."""
    algos = {name: ctor for name, (ctor, _) in hashing.ALGORITHMS.items()}
    try:
        import blake3
    except ImportError:
        return algos
    algos["blake3"] = blake3.blake3
    algos["blake3_auto_threads"] = lambda: blake3.blake3(max_threads=blake3.blake3.AUTO)
    return algos


class _NoHash:
    def update(self, data: Any) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def _from_memory(files: dict[str, bytes], ctor: Any, chunk: int) -> None:
    for data in files.values():
        view, digest = memoryview(data), ctor()
        for o in range(0, len(view), chunk):
            digest.update(view[o : o + chunk])
        digest.hexdigest()


def _read_one(path: Path, ctor: Any) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = np.empty(os.fstat(f.fileno()).st_size, dtype=np.uint8)  # fresh, as the reader's buffers
        digest = ctor()
        safetensors_io._readinto_hashing(f, memoryview(buf), digest)
        digest.hexdigest()


def _read_all(paths: list[Path], ctor: Any) -> None:
    with ThreadPoolExecutor(min(len(paths), IO_THREADS)) as pool:
        for fut in [pool.submit(_read_one, p, ctor) for p in paths]:
            fut.result()


def _read_bytes(paths: list[Path]) -> None:
    for p in paths:
        p.read_bytes()


def bench_hash(trainer, work: Path, reps: int) -> dict[str, Result]:
    """GB/s of each hash over the magvit64 state's files: from memory on one thread (1 MiB updates), and
    overlapped with reading the files from the page cache the way ``load_checkpoint`` does (1 MiB
    ``readinto`` then hash, ``IO_THREADS`` files at a time, largest first); the floor is the same reader
    without hashing, and ``read_bytes()``."""
    files = encoded_files(trainer.state_dict())
    nbytes = sum(len(b) for b in files.values())
    write_raw(work, files)
    paths = sorted((work / n for n in files), key=lambda p: -len(files[p.name]))
    algos = _hash_algorithms()
    chunk = safetensors_io._CHUNK

    mem_fns = {name: (lambda c=ctor: _from_memory(files, c, chunk)) for name, ctor in algos.items()}
    read_fns = {
        name: (lambda c=ctor: _read_all(paths, c)) for name, ctor in algos.items() if name != "blake3_auto_threads"
    }
    floor_fns = {"readinto_no_hash": lambda: _read_all(paths, _NoHash), "read_bytes": lambda: _read_bytes(paths)}
    for fn in (*mem_fns.values(), *read_fns.values(), *floor_fns.values()):
        fn()  # warm-up: page cache, first-call costs
    n = reps * 2
    tm = interleaved(mem_fns, n)
    tr = interleaved({**read_fns, **floor_fns}, n)
    mem = {k: nbytes / median(v) / 1e9 for k, v in tm.items()}
    gbs = {k: nbytes / median(v) / 1e9 for k, v in tr.items()}
    shutil.rmtree(work)
    say(f"  {len(files)} files, {nbytes / 1e6:.1f} MB; GB/s from memory, 1 thread (blake3_auto_threads: its own):")
    say("    " + "  ".join(f"{k} {v:.2f}" for k, v in mem.items()))
    say(f"  GB/s read from page cache and hashed, {min(len(paths), IO_THREADS)} threads (as load_checkpoint):")
    say("    " + "  ".join(f"{k} {gbs[k]:.2f}" for k in read_fns))
    say(f"    floor: same reader without hashing {gbs['readinto_no_hash']:.2f}, read_bytes() {gbs['read_bytes']:.2f}")
    return {
        "hash_throughput": Result(
            {
                "format_algorithm": hashing.ALGORITHM,
                "bytes": nbytes,
                "files": {k: len(v) for k, v in files.items()},
                "chunk_bytes": chunk,
                "read_threads": min(len(paths), IO_THREADS),
                "memory_1thread_gb_s": mem,
                "read_and_hash_gb_s": {k: gbs[k] for k in read_fns},
                "read_floor_gb_s": {k: gbs[k] for k in floor_fns},
                "samples_s": {"memory": tm, "read": tr},
                "note": "page cache, no ratio target; blake3 rows only when the blake3 package is installed "
                "(not a dependency); blake3_auto_threads hashes with its own thread pool",
            }
        )
    }
