"""What ``resume_from=PATH`` names: a checkpoint, a run directory, or (refused with a sentence) something else.

Called before Hydra writes anything (``cli.prepare_argv``) and again when the plan is made.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..checkpoint import MANIFEST, committed, parse_step
from ..checkpoint.layout import CHECKPOINTS_DIR, TMP_PREFIX, TRASH_PREFIX

__all__ = ["StartupError", "resume_target"]


#: ``step_N.<reason>-<time>-<pid>``: a checkpoint folder set aside by ``move_aside``.
_SET_ASIDE = re.compile(r"^(step_\d{8})\.([a-z]+)-")


class StartupError(ValueError):
    """A start refused for a reason the user can fix (the CLI exits 2); the message says how."""


def resume_target(rf: str) -> tuple[Path | None, Path | None]:
    """``(run directory, checkpoint or None)`` that ``resume_from=rf`` names, or a :class:`StartupError`
    saying what ``rf`` is instead and what to pass. The run directory is ``None`` for a checkpoint
    copied out of its run (``hydra.run.dir`` must then say where the resumed run goes).

    Accepted: a committed checkpoint folder (``RUN/checkpoints/step_N``), a run directory, or its
    ``checkpoints`` folder. Refused, each with its own sentence: a file, an uncommitted temporary
    folder, a folder set aside as corrupt or superseded, and anything that is not this program's.
    """
    path = Path(rf).expanduser().resolve()
    where = f"resume_from={rf}"
    if not path.exists():
        raise StartupError(f"{where}: no such checkpoint or run directory: {path}")
    if not path.is_dir():
        holder = path.parent
        if (holder / MANIFEST).is_file():
            raise StartupError(
                f"{where} is a file inside the checkpoint {holder}; pass the folder: resume_from={holder}"
            )
        raise StartupError(
            f"{where} is a file, not a checkpoint: pass a checkpoint folder (RUN/checkpoints/step_N) or a run directory"
        )
    name = path.name
    if name.startswith(TMP_PREFIX) or name.startswith(TRASH_PREFIX):
        run = path.parent.parent
        raise StartupError(
            f"{where} is an uncommitted temporary folder left by an interrupted save or delete: no reader trusts it. "
            f"Pass the run directory (resume_from={run}) to resume from its newest committed checkpoint"
        )
    aside = _SET_ASIDE.match(name)
    if aside:
        step_name, reason = aside.group(1), aside.group(2)
        run = path.parent.parent
        if reason == "corrupt":
            raise StartupError(
                f"{where} was set aside as corrupt by an earlier start (train.log says why; "
                f"`python -m resilient_train.verify {path}` shows it). Pass the run directory (resume_from={run}) "
                "to resume from the newest valid checkpoint"
            )
        raise StartupError(
            f"{where} was set aside ({reason}) when a resume from an earlier step forked this run, so that "
            f"resume_from=auto cannot pick it. To go back to that timeline, copy it into a new run "
            f"(mkdir -p NEW/checkpoints && cp -r {path} NEW/checkpoints/{step_name}) and pass resume_from=NEW"
        )
    if parse_step(name) is not None and path.parent.name == CHECKPOINTS_DIR:
        return path.parent.parent, path
    if (path / MANIFEST).is_file():  # a committed checkpoint copied out of its run: no run directory to continue
        return None, path
    if name == CHECKPOINTS_DIR and committed(path):
        return path.parent, None
    if (path / CHECKPOINTS_DIR).is_dir():
        return path, None
    foreign = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ckpt", ".bin"))[:3]
    raise StartupError(
        f"{where} is neither a checkpoint (no {MANIFEST}) nor a run directory (no {CHECKPOINTS_DIR}/ folder)"
        + (f"; it holds {', '.join(foreign)}, which resilient-train never reads (pickles)" if foreign else "")
        + ": pass RUN or RUN/checkpoints/step_N of a resilient-train run"
    )
