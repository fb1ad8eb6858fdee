"""Config errors fail fast and name the key; both experiments build the real model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TRAIN, compose_cfg
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from resilient_train.config import to_plain, validate_config
from resilient_train.tokenizer.model import build_model, model_kwargs


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
            "optimizer.betas=[0.9,1.5]",
            "trainer.eval_batches=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    for key in ("trainer.grad_accum_steps", "optimizer.betas", "trainer.eval_batches"):
        assert key in proc.stderr
    assert "train.start" not in proc.stdout + proc.stderr
    assert not list((tmp_path / "run" / "checkpoints").glob("*")), "nothing may be saved before the refusal"


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


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["+experiment=tiny"],
        ["+experiment=magvit64"],
        ["data=folder", "data.path=/videos"],
        ["+experiment=magvit64", "data=folder", "data.path=/videos", "data.val_path=/val"],
        ["+experiment=tiny", "chaos=default", "chaos.hold_phase=files_written@10", "chaos.sigterm_steps=[3,7]"],
        ["+experiment=tiny", "chaos.enabled=true", "chaos.node_loss_steps=[5]", "chaos.events_dir=/tmp/events"],
        ["+experiment=tiny", "checkpoint.remote=s3://b/p", "chaos.enabled=true", "chaos.hold_phase=uploading@20"],
        ["+experiment=tiny", "model.max_dim=inf", "optimizer.max_grad_norm=inf", "trainer.device=cuda:1"],
    ],
)
def test_shipped_configs_validate(overrides):
    validate_config(compose_cfg(overrides))


BAD_VALUES = [
    # model
    ("model.init_dim=0", "model.init_dim"),
    ("model.channels=0", "model.channels"),
    ("model.num_codebooks=0", "model.num_codebooks"),
    ("model.attn_heads=0", "model.attn_heads"),
    ("model.attn_dim_head=0", "model.attn_dim_head"),
    ("model.grad_penalty_every=0", "model.grad_penalty_every"),
    ("model.discr.dim=0", "model.discr.dim"),
    ("model.discr.max_dim=2", "model.discr.max_dim"),  # below model.channels: the discriminator's input
    ("model.discr.attn_heads=0", "model.discr.attn_heads"),
    ("model.discr.attn_dim_head=-1", "model.discr.attn_dim_head"),
    ("model.discr.linear_attn_heads=0", "model.discr.linear_attn_heads"),
    ("model.discr.linear_attn_dim_head=0", "model.discr.linear_attn_dim_head"),
    ("model.max_dim=0", "model.max_dim"),
    ("model.max_dim=nan", "model.max_dim"),
    ("model.max_dim=12", "model.max_dim"),  # would cap [compress_space, 16] to a float width
    ("model.layers=[residual,bogus]", "model.layers[1]"),
    ("model.layers=[3]", "model.layers[0]"),
    ("model.layers=[{a:1}]", "model.layers[0]"),
    ("model.layers=[[compress_space,0]]", "model.layers[0]"),
    ("model.layers=[[compress_time,1.5]]", "model.layers[0]"),
    ("model.layers=[consecutive_residual]", "model.layers[0]"),
    ("model.layers=[[residual,8]]", "model.layers[0]"),
    ("model.layers=[cond_residual]", "model.layers[0]"),
    ("model.layers=[compress_space,compress_space,compress_space,compress_space,compress_space]", "model.layers"),
    ("model.fsq_levels=[]", "model.fsq_levels"),
    ("model.fsq_levels=[1000,1000,1000]", "model.fsq_levels"),
    ("model.adversarial_loss_weight=-0.1", "model.adversarial_loss_weight"),
    ("model.adversarial_loss_weight=nan", "model.adversarial_loss_weight"),
    ("model.grad_penalty_loss_weight=inf", "model.grad_penalty_loss_weight"),
    ("model.perceptual_loss_weight=-1", "model.perceptual_loss_weight"),
    # data
    ("data.num_frames=0", "data.num_frames"),
    ("data.num_shapes=0", "data.num_shapes"),
    ("data.train_size=0", "data.train_size"),
    ("data.val_size=0", "data.val_size"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("data.val_fraction=-0.1", "data.val_fraction"),
    ("data.val_fraction=nan", "data.val_fraction"),
    ("data.extensions=[mp4]", "data.extensions"),
    ("data.extensions=[]", "data.extensions"),
    # optimizer
    ("optimizer.lr=nan", "optimizer.lr"),
    ("optimizer.lr=inf", "optimizer.lr"),
    ("optimizer.discr_lr=0", "optimizer.discr_lr"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas"),
    ("optimizer.betas=[-0.1,0.99]", "optimizer.betas"),
    ("optimizer.betas=[0.9,nan]", "optimizer.betas"),
    ("optimizer.weight_decay=-0.01", "optimizer.weight_decay"),
    ("optimizer.weight_decay=inf", "optimizer.weight_decay"),
    ("optimizer.max_grad_norm=0", "optimizer.max_grad_norm"),
    ("optimizer.max_grad_norm=nan", "optimizer.max_grad_norm"),
    ("optimizer.min_lr_ratio=nan", "optimizer.min_lr_ratio"),
    # trainer
    ("trainer.eval_batches=0", "trainer.eval_batches"),
    ("trainer.num_samples=-1", "trainer.num_samples"),
    ("trainer.heartbeat_secs=-1", "trainer.heartbeat_secs"),
    ("trainer.heartbeat_secs=nan", "trainer.heartbeat_secs"),
    ("trainer.dist_timeout_secs=inf", "trainer.dist_timeout_secs"),
    ("trainer.ema.update_every=0", "trainer.ema.update_every"),
    ("trainer.ema.decay=nan", "trainer.ema.decay"),
    ("trainer.device=cudax", "trainer.device"),
    # top level
    ("seed=-1", "seed"),
    ("seed=9223372036854775808", "seed"),  # 2**63
    # chaos
    ("chaos.seed=-1", "chaos.seed"),
    ("chaos.step_kill_rate=1.5", "chaos.step_kill_rate"),
    ("chaos.save_kill_rate=-0.1", "chaos.save_kill_rate"),
    ("chaos.sigterm_rate=nan", "chaos.sigterm_rate"),
    ("chaos.corrupt_rate=inf", "chaos.corrupt_rate"),
    ("chaos.step_kill_steps=[0]", "chaos.step_kill_steps"),
    ("chaos.save_kill_steps=[-3]", "chaos.save_kill_steps"),
    ("chaos.sigterm_steps=[0]", "chaos.sigterm_steps"),
    ("chaos.corrupt_steps=[0]", "chaos.corrupt_steps"),
    ("chaos.node_loss_rate=1.5", "chaos.node_loss_rate"),
    ("chaos.node_loss_steps=[0]", "chaos.node_loss_steps"),
    ("chaos.hold_phase=@5", "chaos.hold_phase"),
    ("chaos.hold_phase=upload", "chaos.hold_phase"),
]


@pytest.mark.parametrize("override, key", BAD_VALUES, ids=[row[0] for row in BAD_VALUES])
def test_bad_value_is_refused_naming_key(override, key):
    cfg = compose_cfg(["+experiment=tiny", override])
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    assert f"\n  {key}=" in str(info.value), str(info.value)


def test_odd_values_in_an_untyped_config_give_one_value_error_naming_each_key(cfg_tiny):
    """A config read back from a checkpoint is not checked by the schema: any value must still give the one error."""
    cfg = OmegaConf.create(to_plain(cfg_tiny))
    cfg.model.fsq_levels = [8, 5.5, True]
    cfg.model.layers = "residual"
    cfg.model.discr = None
    cfg.optimizer.betas = "0.9"
    cfg.trainer.eval_batches = "two"
    cfg.data.num_frames = None
    cfg.chaos.hold_phase = 3
    cfg.chaos.events_dir = 3
    del cfg.trainer["ema"]
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    msg = str(info.value)
    for key in (
        "model.fsq_levels",
        "model.layers",
        "model.discr.dim",
        "optimizer.betas",
        "trainer.eval_batches",
        "data.num_frames",
        "chaos.hold_phase",
        "chaos.events_dir",
        "trainer.ema.decay",
    ):
        assert f"\n  {key}=" in msg, msg
