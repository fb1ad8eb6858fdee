"""Resume is bit-exact on a CUDA device too: real ``train.py`` subprocesses with ``trainer.device=cuda``.

Marked ``gpu`` (``make test`` deselects it) and skipped where ``torch.cuda.is_available()`` is False, so it
is not run on this project's CPU CI machines. ``scripts/gpu_check.sh`` runs the same proof from the shell,
also with two ranks on NCCL, and the chaos proof on CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO, run_train

from resilient_train.checkpoint import committed, read_manifest
from resilient_train.monitor import read_history
from resilient_train.verify import compare_checkpoints

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False"),
]

CUDA = ("trainer.device=cuda", "checkpoint.every_n_steps=10")


def final_checkpoint(run: Path) -> Path:
    found = committed(run / "checkpoints")
    assert found, f"no committed checkpoint under {run}"
    return found[-1]


def train_losses(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_history(run) if r.get("kind") == "train"]


def test_cuda_run_split_and_resumed_ends_bit_identical_to_the_continuous_one(tmp_path):
    continuous, split = tmp_path / "continuous", tmp_path / "split"
    run_train(continuous, *CUDA, "trainer.max_steps=20")
    run_train(split, *CUDA, "trainer.max_steps=10")
    run_train(split, *CUDA, "resume_from=auto", "trainer.max_steps=20")

    a, b = final_checkpoint(continuous), final_checkpoint(split)
    assert a.name == b.name == "step_00000020"
    assert read_manifest(a)["env"]["device"].startswith("cuda"), f"{a} was not trained on CUDA"
    diff = compare_checkpoints(a, b)
    assert diff is None, f"continuous and resumed CUDA runs differ: {diff} (see {REPO / 'scripts' / 'gpu_check.sh'})"
    assert train_losses(split) == train_losses(continuous), "per-step losses differ after the resume"
    assert [s for s, _, _ in train_losses(split)] == list(range(1, 21)), "each train step must be logged once"


def test_model_ema_optimizer_state_and_batches_live_on_the_gpu(tmp_path):
    from conftest import compose_cfg

    from resilient_train.train.trainer import Trainer

    trainer = Trainer(compose_cfg(["+experiment=tiny", "trainer.device=cuda"]), tmp_path)
    trainer.train_step()
    tensors = {
        **{f"model.{k}": t for k, t in trainer.model.state_dict().items()},
        **{f"ema.{k}": t for k, t in trainer.ema.state_dict().items()},
        **{
            f"{name}.{k}": v
            for name, opt in (("optim_gen", trainer.opt_gen), ("optim_discr", trainer.opt_discr))
            for st in opt.state.values()
            for k, v in st.items()
            if k != "step"
        },
    }
    assert trainer.device.type == "cuda"
    assert [k for k, t in tensors.items() if t.device != trainer.device] == []
    assert trainer.next_batch().device == trainer.device
