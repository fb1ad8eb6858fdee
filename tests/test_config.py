"""Config errors fail fast and name the key; both experiments build the real model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TRAIN, compose_cfg
from hydra.errors import ConfigCompositionException

from resilient_train.config import validate_config
from resilient_train.model import build_model, model_kwargs


@pytest.mark.parametrize(
    "override, env",
    [
        ("trainer.max_step=5", {}),  # Hydra refuses it while composing
        ("trainer.max_step=5", {"HYDRA_FULL_ERROR": "1"}),  # ... and then raises instead of exiting
        ("+trainer.max_step=5", {}),  # '+' adds a key Hydra would accept; the schema has no such key
    ],
)
def test_mistyped_key_fails_fast_naming_it(tmp_path, override, env):
    proc = subprocess.run(
        [sys.executable, str(TRAIN), "+experiment=tiny", override, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, **env},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "max_step" in proc.stderr
    assert "train.start" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("override, key", [("trainer.max_steps=abc", "max_steps"), ("model.nope=1", "nope")])
def test_wrong_type_or_unknown_key_rejected_at_composition(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(["+experiment=tiny", override])
    assert key in str(info.value) + str(info.value.__cause__)


def test_value_errors_are_collected_into_one_message():
    cfg = compose_cfg(["+experiment=tiny", "model.fsq_levels=[8,2,5]", "data.num_frames=6", "optimizer.lr=-1"])
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    msg = str(info.value)
    for key in ("model.fsq_levels", "data.num_frames", "optimizer.lr"):
        assert key in msg


def test_bad_value_on_command_line_exits_2_naming_key(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "+experiment=tiny",
            "trainer.grad_accum_steps=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "trainer.grad_accum_steps" in proc.stderr


def test_perceptual_loss_needs_local_weights_file(tmp_path):
    cfg = compose_cfg(["+experiment=tiny", "model.perceptual_loss_weight=0.1"])
    with pytest.raises(ValueError, match="vgg_weights_path"):
        validate_config(cfg)
    cfg = compose_cfg(
        ["+experiment=tiny", "model.perceptual_loss_weight=0.1", f"model.vgg_weights_path={tmp_path / 'missing.pth'}"]
    )
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model(cfg.model)


@pytest.mark.parametrize("experiment", ["tiny", "magvit64"])
def test_experiments_build_the_real_model(experiment):
    cfg = compose_cfg([f"+experiment={experiment}"])
    validate_config(cfg)
    kwargs = model_kwargs(cfg.model)
    assert isinstance(kwargs["layers"], tuple) and isinstance(kwargs["fsq_levels"], list)
    assert kwargs["flash_attn"] is False
    model = build_model(cfg.model)
    assert any(k.startswith("discr.") for k in model.state_dict())
    n_discr = sum(p.numel() for p in model.discr_parameters())
    assert n_discr < 10_000_000, "discriminator must be sized by config, not the 35M default"
    m = cfg.model
    video = torch.rand(1, m.channels, cfg.data.num_frames, m.image_size, m.image_size)
    with torch.no_grad():
        codes = model(video, return_codes=True, video_contains_first_frame=m.video_contains_first_frame)
    assert codes.dtype in (torch.int32, torch.int64) and codes.numel() > 0
