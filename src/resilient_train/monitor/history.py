"""The loss history ``RUN/history.jsonl``: appended during a run, read back, cut back on a resume.

One JSON object with a non-negative int ``step`` per line, appended by :class:`HistoryWriter`. A process killed
mid-write can leave a truncated last line; :func:`read_history` skips it silently (and warns about a bad line
anywhere else). A writer reopening such a file first terminates the partial line, so new records never get glued
onto it. When a resume cuts the history back (:func:`truncate_history`), bad lines are moved to
``RUN/history.rejected.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..checkpoint.layout import set_aside
from ..fsio import atomic_write, fsync_dir

__all__ = ["HISTORY_FILE", "REJECTED_HISTORY_FILE", "HistoryWriter", "read_history", "truncate_history"]

# The package's name, not this module's: the warnings keep the logger they always had.
log = logging.getLogger("resilient_train.monitor")

HISTORY_FILE = "history.jsonl"
#: Next to a history file: the lines :func:`truncate_history` moved out of it (raw bytes, one per line).
REJECTED_HISTORY_FILE = "history.rejected.jsonl"


class HistoryWriter:
    """Appends one JSON object per line to ``RUN/history.jsonl`` (line-buffered, flushed after every record)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / HISTORY_FILE
        if self.path.is_dir() and not self.path.is_symlink():  # a file cannot be appended there: keep it, aside
            set_aside(self.path, "unreadable")
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        # A previous process killed mid-write may have left a partial line: end it, so that our first record
        # starts on a line of its own (the partial line is then skipped, with a warning, by read_history).
        if self._file.tell() > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    log.warning("%s ends with a partial line (killed mid-write?); terminating it", self.path)
                    self._file.write("\n")
                    self._file.flush()

    def write(self, record: dict[str, Any]) -> None:
        if self._file.closed:
            raise ValueError(f"HistoryWriter for {self.path} is closed")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _history_path(run_dir: str | os.PathLike) -> Path:
    p = Path(run_dir)
    return p if p.is_file() else p / HISTORY_FILE


def _step_ok(x: Any) -> bool:
    """A history record's step: a non-negative int (a bool is not one)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_line(line: bytes) -> tuple[dict[str, Any] | None, str | None, bool]:
    """``(record, None, _)`` for a good history line, else ``(None, why, cut)``.

    A good line is a UTF-8 JSON object whose ``step`` is a non-negative int. ``cut`` is true when the line is
    not JSON at all, as a write cut short leaves it (a prefix of an object is never valid JSON).
    """
    try:
        rec = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not UTF-8: {e.reason} at byte {e.start}", True
    except RecursionError:
        return None, "not JSON: nested too deep", True
    except ValueError as e:
        return None, f"not JSON: {_short(str(e))}", True
    if not isinstance(rec, dict):
        return None, f"a JSON {type(rec).__name__}, not an object", False
    if not _step_ok(rec.get("step")):
        return None, f"step {_short(repr(rec.get('step')))} is not a non-negative integer", False
    return rec, None, False


def _history_lines(raw: bytes) -> Iterator[tuple[int, bytes, bool]]:
    """``(line number, line, at_eof_without_newline)`` for each non-blank line of a history file."""
    parts = raw.split(b"\n")
    last = len(parts) - 1  # parts[last] is b"" when the file ends with a newline
    for i, line in enumerate(parts):
        if line.strip():
            yield i + 1, line, i == last


def _read_history_bytes(path: Path) -> bytes | None:
    """The file's bytes; ``None`` when absent, or (with a warning) not a regular file or unreadable."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            log.warning("history.unreadable path=%s error=not a regular file", path)
            return None
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("history.unreadable path=%s error=%s", path, e)
        return None


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All good records of ``RUN/history.jsonl`` in file order (``[]`` if the file does not exist).

    A good record is a JSON object whose ``step`` is a non-negative int; any other line is skipped. A last line
    without a newline that is not JSON (a write cut short by a kill) is skipped quietly; any other bad line with a
    warning. Never raises on the file's content (an unreadable file or a folder under the name reads as ``[]``,
    with a warning). ``run_dir`` may also be the path of the jsonl file itself.
    """
    path = _history_path(run_dir)
    raw = _read_history_bytes(path)
    if raw is None:
        return []
    records: list[dict[str, Any]] = []
    for lineno, line, at_eof in _history_lines(raw):
        rec, why, cut = _parse_line(line)
        if rec is not None:
            records.append(rec)
        elif at_eof and cut:
            log.debug("%s:%d: skipping truncated last line (%s)", path, lineno, why)
        else:
            log.warning("%s:%d: skipping bad line (%s)", path, lineno, why)
    return records


def _append_rejected(side: Path, lines: list[bytes]) -> None:
    """Append ``lines`` (raw bytes, one per line) to ``side`` and fsync it; raises ``OSError``."""
    if side.is_symlink() or (side.exists() and not side.is_file()):
        raise OSError(f"{side} is not a regular file")
    with open(side, "ab") as f:
        sep = b""
        if f.tell() > 0:  # an append cut short must not glue our first line onto its last
            with open(side, "rb") as g:
                g.seek(-1, os.SEEK_END)
                sep = b"" if g.read(1) == b"\n" else b"\n"
        f.write(sep + b"".join(line + b"\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(side.parent)


def truncate_history(run_dir: str | os.PathLike, step: int) -> int:
    """Drop history records after ``step`` (they belong to a timeline that a resume discards); return how many.

    Never raises on the file's content, so that a resume never fails on it:

    - a bad line (not UTF-8, not JSON, not a JSON object, or a ``step`` that is not a non-negative int) is
      moved: appended, as its raw bytes, to ``history.rejected.jsonl`` next to the file (fsync'd before the
      history is rewritten, so a crash can duplicate a line there but never lose one), with one warning
      ``history.rejected path=... lines=N first=LINENO moved_to=...``. If that side file cannot be written the
      bad lines stay where they are (and :func:`read_history` keeps skipping them);
    - a last line without a newline that is not JSON is a record cut short by a kill: it is dropped quietly
      (debug log), not moved. It can only be a record of a step after the checkpoint being resumed (a step's
      records are written before its checkpoint), so truncation would drop it anyway;
    - something under the name that cannot be read as a file (a folder, a FIFO, no permission) is set aside
      as ``history.jsonl.unreadable-TIME-PID`` (warned), so that the resumed run writes a fresh file.

    The file is rewritten atomically (the kept lines byte for byte, each ending in a newline) when anything is
    dropped or moved, or when it does not end with a newline; otherwise it is left as it is.
    """
    # Long on purpose: one pass over the file that keeps, rejects or drops each line, then one atomic replace.
    path = _history_path(run_dir)
    raw = _read_history_bytes(path)
    if raw is None:
        if os.path.lexists(path):
            try:
                set_aside(path, "unreadable")
            except OSError as e:
                log.warning("history.unreadable path=%s error=cannot set it aside: %s", path, e)
        return 0
    out: list[tuple[bytes, bool]] = []  # (line, bad) in file order, the lines to keep and the bad ones
    bad: list[tuple[int, bytes]] = []
    dropped, cut = 0, False
    for lineno, line, at_eof in _history_lines(raw):
        rec, why, is_cut = _parse_line(line)
        if rec is None:
            if at_eof and is_cut:
                log.debug("%s:%d: dropping truncated last line (%s)", path, lineno, why)
                cut = True
            else:
                log.debug("%s:%d: bad line (%s)", path, lineno, why)
                bad.append((lineno, line))
                out.append((line, True))
        elif rec["step"] > step:
            dropped += 1
        else:
            out.append((line, False))
    if not (dropped or bad or cut or raw[-1:] not in (b"\n", b"")):
        return 0
    keep_bad = False
    if bad:
        side = path.with_name(REJECTED_HISTORY_FILE)
        try:
            _append_rejected(side, [line for _, line in bad])
        except OSError as e:
            keep_bad = True
            log.warning(
                "history.rejected_kept path=%s lines=%d first=%d error=cannot write %s: %s",
                path,
                len(bad),
                bad[0][0],
                side,
                e,
            )
        else:
            log.warning("history.rejected path=%s lines=%d first=%d moved_to=%s", path, len(bad), bad[0][0], side)
    atomic_write(path, b"".join(line + b"\n" for line, is_bad in out if keep_bad or not is_bad))
    return dropped
