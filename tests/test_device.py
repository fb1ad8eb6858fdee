"""Where the tensors live: the device a run trains on, checked without a GPU.

Every machine has the ``meta`` device (shapes and dtypes, no data). A trainer built and restored
there must leave every parameter, buffer, EMA tensor and optimizer moment on ``meta``: a part that
moves a tensor to the CPU behind the trainer's back (as magvit2-pytorch's ``copy_for_eval()`` does
with ``deepcopy(self.cpu())``) fails here exactly as it fails on a GPU, where it crashed the first
step. A device the machine lacks is refused at start-up with exit 2 (real ``train.py`` processes).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_cfg, train_env
from omegaconf import OmegaConf

from resilient_train.checkpoint import committed, load_checkpoint
from resilient_train.config import typed
from resilient_train.dist import Group
from resilient_train.resume.admit import admit
from resilient_train.tokenizer.model import build_model
from resilient_train.train.device import DeviceError, resolve_device
from resilient_train.train.env import capture_env
from resilient_train.train.parts import EMA, StateError
from resilient_train.train.trainer import Trainer

META = torch.device("meta")
EXIT_CONFIG_ERROR = 2
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def off_device(named: dict[str, torch.Tensor], device: torch.device) -> list[str]:
    return [f"{k} on {t.device}" for k, t in named.items() if t.device != device]


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's moments (its ``step`` counter stays on the CPU by torch's design unless capturable/fused)."""
    return {
        f"{i}.{k}": v
        for i, st in enumerate(opt.state.values())
        for k, v in st.items()
        if isinstance(v, torch.Tensor) and k != "step"
    }


def test_ema_leaves_the_model_it_averages_where_it_is(cfg_tiny):
    model = build_model(cfg_tiny.model).to(META)
    ema = EMA(model, decay=0.9)
    assert off_device(dict(model.state_dict()), META) == [], "building the EMA moved the trained model"
    assert off_device(ema.state_dict(), META) == [], "the EMA copy is not on the model's device"
    assert not hasattr(ema.model, "discr"), "the EMA copy must hold the generator only"
    upstream = build_model(cfg_tiny.model).copy_for_eval()  # on the CPU, where its in-place move is harmless
    assert list(ema.state_dict()) == list(upstream.state_dict()), "the EMA holds other keys than upstream's copy"


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_trainer_keeps_every_tensor_on_its_device_through_construction_and_restore(trained_run, tmp_path):
    loaded = load_checkpoint(committed(trained_run / "checkpoints")[-1])
    cfg = OmegaConf.create(loaded.state["config"])

    # Another kind of device than the checkpoint's: refused with the way out, unless allowed.
    env = capture_env(META)
    with pytest.raises(StateError) as refused:
        admit(loaded, typed(cfg), env=env, device=META, group=Group(), fingerprint=None)
    assert "trained on cpu" in str(refused.value) and "trainer.device=cpu" in str(refused.value)
    assert "resume.allow_config_change=true" in str(refused.value)

    cfg.resume.allow_config_change = True
    changes = admit(loaded, typed(cfg), env=env, device=META, group=Group(), fingerprint=None)
    assert any(c.startswith("env.device: 'cpu' -> 'meta'") for c in changes), changes
    trainer = Trainer(cfg, tmp_path / "meta", device=META)
    trainer.restore(loaded)
    assert trainer.counters.step == loaded.step
    placed = {
        **{f"model.{k}": t for k, t in trainer.model.state_dict().items()},
        **{f"ema.{k}": t for k, t in trainer.ema.state_dict().items()},
        **{f"optim_gen.{k}": t for k, t in optimizer_tensors(trainer.opt_gen).items()},
        **{f"optim_discr.{k}": t for k, t in optimizer_tensors(trainer.opt_discr).items()},
    }
    assert optimizer_tensors(trainer.opt_gen) and optimizer_tensors(trainer.opt_discr), "no optimizer state restored"
    assert off_device(placed, META) == []
    assert trainer.next_batch().device == META


def test_auto_is_the_default_and_is_the_cpu_without_cuda(cfg_tiny):
    assert cfg_tiny.trainer.device == "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("auto", local_rank=1, local_world_size=2).type == expected


@no_cuda
@pytest.mark.parametrize(
    "spec, says",
    [
        ("cuda", "this machine has no CUDA device"),
        ("cuda:3", "this machine has no CUDA device"),
        ("gpu", "not a device; use auto"),
        ("cuda:x", "not a device; use auto"),
    ],
)
def test_a_device_the_machine_lacks_is_refused_before_anything_is_written(tmp_path, spec, says):
    with pytest.raises(DeviceError, match=f"trainer.device={spec}: {says}"):
        resolve_device(spec)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "+experiment=tiny", f"hydra.run.dir={run}", f"trainer.device={spec}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=train_env(),
    )
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: trainer.device={spec}: {says}"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not run.exists(), "a refused device must not create the run directory"


@no_cuda
def test_cuda_under_torchrun_names_the_rank_and_the_ways_out(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(DeviceError, match=r"trainer.device=cuda: this machine has no CUDA device.*trainer.device=cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_the_device_key_is_validated_with_the_rest_of_the_config():
    from resilient_train.config import validate_config

    with pytest.raises(ValueError, match="trainer.device"):
        validate_config(compose_cfg(["+experiment=tiny", "trainer.device=tpu"]))
