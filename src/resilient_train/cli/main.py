"""``python train.py [overrides]``: the Hydra entry point and the one exit-code boundary (see :mod:`.`)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .. import startup
from ..checkpoint.manager import SaveError
from ..config import CONFIG_DIR, register_configs
from ..data.video import VideoReadError
from ..dist import from_env
from ..resume.lock import PendingLog, RunLock
from ..tokenizer.model import import_library, quiet_library_warnings
from ..train.device import DeviceError, resolve_device, shares_gpu
from ..train.faults import EXIT_DIVERGED, DivergedError
from ..train.watchdog import collective_timeout
from .argv import EXIT_CONFIG_ERROR, prepare_argv
from .start import REFUSALS, start

startup.mark("imports")

__all__ = ["main", "run", "EXIT_CONFIG_ERROR", "EXIT_FAILED"]

log = logging.getLogger(__name__)

EXIT_FAILED = 1

_task_started = False


def _check_threads(cfg: DictConfig) -> None:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = os.cpu_count() or 1
    if local * cfg.trainer.num_threads > cores:
        log.warning(
            "threads.oversubscribed ranks_here=%d x trainer.num_threads=%d > %d cores: every rank will run several "
            "times slower; pass trainer.num_threads=%d",
            local,
            cfg.trainer.num_threads,
            cores,
            max(1, cores // local),
        )


def run(cfg: DictConfig, run_dir: Path, overrides: list[str], log_name: str = "train") -> int:
    """Start (refusals exit 2), then train (failures exit 1); the run lock is held throughout.

    ``log_name``: the log file, ``RUN/<log_name>.log``, opened once the start is accepted.
    """
    startup.mark("config")
    import_library()  # needed before any step; here, its seconds are a phase of their own
    startup.mark("model_imports")
    try:  # a device the machine lacks is refused before the data, the run lock and the model
        device = resolve_device(cfg.trainer.device)
    except DeviceError as exc:
        log.error("train.refused %s: %s", type(exc).__name__, exc)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    lock = RunLock(run_dir)
    log_file = PendingLog(f"{log_name}.log")
    logging.getLogger().addHandler(log_file)
    try:
        t = cfg.trainer
        timeout = collective_timeout(t.hang_timeout_secs, t.dist_timeout_secs)
        group = from_env(device, timeout, shared_gpu=shares_gpu(device, t.device))
    except (ValueError, RuntimeError) as exc:
        log.error("train.refused %s: %s", type(exc).__name__, exc)
        print(f"error: cannot join the process group: {exc}", file=sys.stderr)
        logging.getLogger().removeHandler(log_file)
        return EXIT_CONFIG_ERROR
    _check_threads(cfg)
    try:
        try:
            trainer = start(cfg, run_dir, overrides, lock, group, log_file)
        except REFUSALS as exc:
            log.error("train.refused %s: %s", type(exc).__name__, exc)
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        try:
            return trainer.fit()
        except DivergedError as exc:
            log.error("train.diverged exit=%d: %s", EXIT_DIVERGED, exc)
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_DIVERGED
        except VideoReadError as exc:  # a data file went bad mid-run: the file and the way out, no traceback
            why = str(exc).strip().splitlines()[-1].removeprefix(f"{VideoReadError.__module__}.VideoReadError: ")
            log.error("train.failed data: %s", why)  # a loader worker's error carries its traceback as text
            print(f"error: {why}", file=sys.stderr)
            return EXIT_FAILED
        except Exception as exc:  # a failed save says all there is to say; anything else gets its traceback
            log.error("train.failed %s: %s", type(exc).__name__, exc, exc_info=not isinstance(exc, SaveError))
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    finally:
        lock.release()
        group.close()
        logging.getLogger().removeHandler(log_file)
        log_file.close()


register_configs()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    hc = HydraConfig.get()
    raise SystemExit(run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task), hc.job.name))


def main() -> None:
    quiet_library_warnings()
    sys.argv = [sys.argv[0], *prepare_argv(sys.argv[1:])]
    try:
        _hydra_main()
    except SystemExit as exc:
        # Hydra exits 1 for an unknown key, a value of the wrong type or a bad override, all found
        # while composing the config, before our task runs: that is a refused start.
        if exc.code == 1 and not _task_started:
            raise SystemExit(EXIT_CONFIG_ERROR) from None
        raise
    except Exception as exc:  # the same, raised as such under HYDRA_FULL_ERROR=1
        if _task_started:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


if __name__ == "__main__":
    main()
