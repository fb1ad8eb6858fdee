"""Nothing a user has breaks when modules move: old import paths warn and still work, the commands keep their names."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
from conftest import REPO

from resilient_train._imports import MOVED

#: ``__all__`` of each module at the last commit before the move (ac25e70, read with ``git show``): the
#: public names a user may import from the old paths.
OLD_PUBLIC = {
    "trainer": (
        "Trainer",
        "configure_process",
        "EXIT_FINISHED",
        "EXIT_PREEMPTED",
        "EXIT_ABORTED",
        "TENSOR_GROUPS",
        "REQUIRED_PARTS",
    ),
    "state": (
        "StateError",
        "TrainCounters",
        "DataPosition",
        "RankState",
        "EMA",
        "warmup_cosine",
        "capture_env",
        "env_differences",
        "check_env",
        "apply_hyperparameters",
        "package_versions",
    ),
    "rng": ("RNGState", "seed_everything", "rank_seed", "RNGRestoreError"),
    "device": ("DeviceError", "DEVICE_SPEC", "resolve_device", "describe_machine", "device_name", "shares_gpu"),
    "observers": (
        "Observer",
        "HistoryObserver",
        "HeartbeatObserver",
        "RankHeartbeatObserver",
        "ProgressObserver",
        "default_observers",
        "rank_dir",
    ),
    "tblog": ("TensorBoardObserver", "require_tensorboard"),
    "model": ("build_model", "eval_copy", "model_kwargs", "time_downsample_factor"),
    "metrics": ("psnr", "ssim", "codebook_stats", "Reconstruction"),
    "video": (
        "VideoReadError",
        "VideoFile",
        "VideoClips",
        "build_folder_datasets",
        "fingerprint_difference",
        "content_hash",
        "probe",
        "write_video",
        "clips_of",
        "Preprocessing",
    ),
    "chaos": ("Chaos", "ChaosSchedule", "EVENT_KINDS", "EVENTS_FILE", "read_events", "corrupt_checkpoint"),
    "orchestrator": ("main", "run_trial", "default_schedule", "compare_histories", "TRAIN_CMD"),
    "checks": ("check_checkpoint", "check_rng_state", "saved_config"),
    "export": ("export_tokenizer", "load_tokenizer", "read_config", "tokenizer_kwargs", "main", "FORMAT"),
    "tokenize": ("main", "tokenize_videos"),
    "evaluate": ("evaluate_tokenizer", "main"),
    "data": (
        "SyntheticVideoDataset",
        "VideoReadError",
        "ResumableSampler",
        "SequentialResumableSampler",
        "build_data",
        "build_loader",
        "batches_per_epoch",
    ),
    "config": (
        "CONFIG_DIR",
        "TrainConfig",
        "register_configs",
        "compose",
        "validate_config",
        "config_hash",
        "to_plain",
        "typed",
        "RESUME_SAFE_KEYS",
    ),
    "monitor": (
        "HEARTBEAT_FILE",
        "HISTORY_FILE",
        "REJECTED_HISTORY_FILE",
        "HEARTBEAT_STATUSES",
        "Heartbeat",
        "HistoryWriter",
        "write_side_file",
        "read_history",
        "truncate_history",
        "finite_float",
        "plot_loss",
        "save_sample_grid",
        "SAMPLE_GRID_GAP",
        "SAMPLE_GRID_MIN_FRAME_HEIGHT",
    ),
    "resume": (
        "StartupError",
        "ConfigDriftError",
        "ResumePlan",
        "plan_resume",
        "plan_chosen",
        "take_over_timeline",
        "resume_target",
        "config_diff",
        "check_added_keys",
        "CONFIG_GROUPS",
    ),
    "cli": ("main", "run", "start", "RunLock", "EXIT_CONFIG_ERROR", "EXIT_FAILED"),
    "verify": ("verify_checkpoint", "compare_checkpoints", "compare_states", "checkpoints_under", "main"),
}


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_an_old_module_path_warns_and_gives_the_module_at_its_new_path(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_every_old_module_is_covered():
    assert {f"resilient_train.{m}" for m in OLD_PUBLIC} >= set(MOVED) | {"resilient_train.orchestrator"}


@pytest.mark.parametrize("old", sorted(OLD_PUBLIC))
def test_every_public_name_of_an_old_module_still_imports(old):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module(f"resilient_train.{old}")
        missing = [name for name in OLD_PUBLIC[old] if not hasattr(module, name)]
    assert missing == [], f"resilient_train.{old} lost {missing}"


def test_names_from_an_old_path_are_the_same_objects():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from resilient_train.trainer import Trainer as Old  # noqa: PLC0415

    from resilient_train.train.trainer import Trainer

    assert Old is Trainer


def test_a_name_imported_from_a_command_module_warns():
    import resilient_train.export as command

    with pytest.warns(DeprecationWarning, match="resilient_train.export.export_tokenizer moved to"):
        fn = command.export_tokenizer
    from resilient_train.tokenizer.export import export_tokenizer

    assert fn is export_tokenizer


@pytest.mark.parametrize(
    "command", ["export", "tokenize", "evaluate", "verify", "status", "chaos", "orchestrator", "cli"]
)
def test_the_commands_keep_their_names(command):
    args = [sys.executable, "-W", "error::DeprecationWarning:resilient_train", "-m", f"resilient_train.{command}"]
    proc = subprocess.run([*args, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower() or "== Config ==" in proc.stdout, proc.stdout[:500]
