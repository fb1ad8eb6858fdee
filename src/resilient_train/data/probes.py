"""The probe cache: what :func:`.video.probe` found in each video file, kept beside the run so a restart need not
demux every file again.

Owns :class:`ProbeCache` and its file, ``RUN/data_probes.json`` (:data:`PROBES_FILE`)::

    {"format": 1, "pyav": "18.1.0",
     "entries": {"/abs/real/path.mp4": {"size": 1234, "mtime_ns": 1700000000000000000, "digest": "<32 hex>",
                                        "frames": 40, "fps": 10.0, "width": 32, "height": 24, "pts": [0, 1, ...]}}}

Invariants:

* **An entry is trusted only when the file is provably the one probed.** Its ``size``, ``mtime_ns`` and content
  hash (:func:`.video.content_hash`, computed at every start anyway) must all equal what was recorded; otherwise
  the file is probed again and the entry replaced. Entries are keyed by the file's absolute real path (symlinks
  resolved). An edit that keeps the size, the mtime and both hashed ends is not detected (as for the fingerprint).
* **A probe from the cache equals a fresh one**: the same frame count, rate, size and presentation times, so the
  clips and the data fingerprint do not depend on where the probe came from.
* **A damaged cache is never trusted and never breaks a start.** The file is read once, at most
  :data:`MAX_PROBES_BYTES`, and every field is checked strictly (types, signs, ``pts`` a strictly increasing list
  of ``frames`` ints). Anything wrong, one entry included, ignores the *whole* file: one warning
  ``data.probe_cache_bad path=... reason=...``, every file is probed, and the file is rewritten. A file written
  under another :data:`FORMAT` or another PyAV version is ignored the same way (PyAV decides what a probe finds).
* **Only successful probes are cached**: an unreadable file is probed again at every start (and refused, or
  skipped with ``data.skip_bad_files=true``, as before).
* **Reading never writes.** The file is read on first use, on every rank; :meth:`ProbeCache.save` writes it
  (atomically, not fsynced: it is cheap to rebuild) only when it changed, and only the caller decides when: a
  start writes it on rank 0 once every rank has accepted (:mod:`..cli.start`). It then holds the entries this
  process used: files no longer indexed are dropped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ..checkpoint.layout import read_small_json
from ..fsio import atomic_write

__all__ = ["FORMAT", "MAX_PROBES_BYTES", "PROBES_FILE", "Probe", "ProbeCache"]

log = logging.getLogger(__name__)

#: The cache's name in a run directory.
PROBES_FILE = "data_probes.json"
#: The layout of the file; another one is ignored whole.
FORMAT = 1
#: A larger file is not read (damaged): about a million frames' presentation times per 8 MiB.
MAX_PROBES_BYTES = 1 << 30

#: ``(frames, fps, width, height, pts)``, as :func:`.video.probe` returns it.
Probe = tuple[int, float, int, int, tuple[int, ...]]

_I64 = 1 << 63
_KEYS = ("size", "mtime_ns", "digest", "frames", "fps", "width", "height", "pts")


def _pyav_version() -> str:
    import av

    return str(av.__version__)


def _int(x: Any) -> bool:
    """A 64-bit int as JSON stores it (a bool is not one)."""
    return type(x) is int and -_I64 <= x < _I64


def _entry_problem(key: Any, e: Any) -> str | None:
    """What is wrong with one entry, or ``None``."""
    if not isinstance(key, str) or not os.path.isabs(key):
        return f"key {key!r:.80} is not an absolute path"
    if not isinstance(e, dict) or sorted(e) != sorted(_KEYS):
        return f"{key}: not an object with the fields {list(_KEYS)}"
    for name in ("size", "frames", "width", "height"):
        if not _int(e[name]) or e[name] < (1 if name == "frames" else 0):
            return f"{key}: {name} {e[name]!r:.80} is not a {'positive' if name == 'frames' else 'non-negative'} int"
    if not _int(e["mtime_ns"]):
        return f"{key}: mtime_ns {e['mtime_ns']!r:.80} is not an int"
    digest = e["digest"]
    if not isinstance(digest, str) or len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
        return f"{key}: digest {digest!r:.80} is not 32 lowercase hex digits"
    fps = e["fps"]
    if type(fps) is not float or not math.isfinite(fps) or fps < 0:
        return f"{key}: fps {fps!r:.80} is not a finite non-negative float"
    pts = e["pts"]
    if not isinstance(pts, list) or len(pts) != e["frames"]:
        return f"{key}: pts is not a list of frames={e['frames']} presentation times"
    if not all(type(t) is int for t in pts) or any(a >= b for a, b in zip(pts, pts[1:])):
        return f"{key}: pts is not a strictly increasing list of ints"
    if not (_int(pts[0]) and _int(pts[-1])):  # increasing: the ends bound the rest
        return f"{key}: pts outside 64 bits"
    return None


def _problem(doc: Any, pyav: str) -> str | None:
    """Why the parsed file cannot be trusted, or ``None``."""
    if not isinstance(doc, dict):
        return f"not a JSON object (a JSON {type(doc).__name__})"
    if sorted(doc) != ["entries", "format", "pyav"]:
        return f"fields {sorted(doc)!r:.120}, expected ['entries', 'format', 'pyav']"
    if not _int(doc["format"]) or doc["format"] != FORMAT:
        return f"format {doc['format']!r:.40}, this version reads format {FORMAT}"
    if doc["pyav"] != pyav:
        return f"written with PyAV {doc['pyav']!r:.40}, this is PyAV {pyav}"
    if not isinstance(doc["entries"], dict):
        return "entries is not a JSON object"
    for key, e in doc["entries"].items():
        problem = _entry_problem(key, e)
        if problem:
            return problem
    return None


class ProbeCache:
    """The probes recorded in ``path`` (``RUN/data_probes.json``), read on first use; see the module.

    ``get`` returns a recorded probe when the file's identity matches, ``put`` records a fresh one; ``cached`` and
    ``probed`` count the files served each way since this object was made (the ``data.probes`` log line).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.cached = 0
        self.probed = 0
        self._read: dict[str, dict[str, Any]] | None = None  # the file's entries, once read
        self._trusted = True  # False: the file was there but ignored (it is rewritten)
        self._used: dict[str, dict[str, Any]] = {}  # what save writes: the entries served or recorded
        self._pyav = ""

    @classmethod
    def in_run(cls, run_dir: str | os.PathLike) -> ProbeCache:
        return cls(Path(run_dir) / PROBES_FILE)

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._read is not None:
            return self._read
        self._pyav = _pyav_version()
        self._read = {}
        try:
            doc = read_small_json(self.path, MAX_PROBES_BYTES)
        except FileNotFoundError:
            return self._read
        except ValueError as exc:  # read_small_json says why: not JSON, too large, not a regular file, ...
            doc, problem = None, str(exc)
        else:
            problem = _problem(doc, self._pyav)
        if problem:
            self._trusted = False
            log.warning("data.probe_cache_bad path=%s reason=%s", self.path, problem)
            return self._read
        self._read = doc["entries"]
        return self._read

    def get(self, path: str, size: int, mtime_ns: int, digest: str) -> Probe | None:
        """The recorded probe of ``path`` when its size, mtime and content hash all match the record, else ``None``
        (counted as probed: the caller probes it and :meth:`put` s the result)."""
        key = os.path.realpath(path)
        e = self._load().get(key)
        if e is None or (e["size"], e["mtime_ns"], e["digest"]) != (size, mtime_ns, digest):
            self.probed += 1
            return None
        self.cached += 1
        self._used[key] = e
        return e["frames"], e["fps"], e["width"], e["height"], tuple(e["pts"])

    def put(self, path: str, size: int, mtime_ns: int, digest: str, probe: Probe) -> None:
        """Record a successful probe of ``path`` (its identity taken *before* probing, so a file changed meanwhile
        does not match next time)."""
        self._load()
        frames, fps, width, height, pts = probe
        self._used[os.path.realpath(path)] = {
            "size": int(size),
            "mtime_ns": int(mtime_ns),
            "digest": str(digest),
            "frames": int(frames),
            "fps": float(fps),
            "width": int(width),
            "height": int(height),
            "pts": [int(t) for t in pts],
        }

    @property
    def changed(self) -> bool:
        """Whether :meth:`save` would write: the file was ignored, or its entries differ from those used."""
        return self._read is not None and (not self._trusted or self._used != self._read)

    def save(self) -> bool:
        """Write the entries used (atomically, not fsynced) when they changed; never raises for the disk (a cache
        that cannot be written is logged and probed again next time). Returns whether it wrote."""
        if not self.changed:
            return False
        doc = {"format": FORMAT, "pyav": self._pyav, "entries": dict(sorted(self._used.items()))}
        try:
            atomic_write(self.path, json.dumps(doc, separators=(",", ":")), durable=False)
        except OSError as exc:
            log.warning("data.probe_cache_unwritten path=%s error=%s", self.path, exc)
            return False
        self._read, self._trusted = dict(self._used), True
        return True
