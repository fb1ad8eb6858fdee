"""``trainer.compile``: the same checkpoints with it on or off, resumable across the switch, reproducible across
processes (kernels compiled afresh in each), and the chaos proof with compiled kernels.

Compiled and eager runs are never compared bit for bit (compiled kernels order the arithmetic
differently); compiled runs are compared with compiled runs on this machine.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, run_train, train_env

from resilient_train.checkpoint import committed, load_checkpoint
from resilient_train.monitor import read_history
from resilient_train.verify import compare_checkpoints

FAST = ("trainer.num_threads=1", "trainer.eval_every_n_steps=2", "checkpoint.every_n_steps=2")


def final(run):
    return committed(run / "checkpoints")[-1]


def test_compile_without_a_cxx_compiler_is_refused_before_the_model_is_built(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = run_train(
        tmp_path / "run",
        "trainer.compile=true",
        env={"PATH": str(empty), "CXX": str(tmp_path / "no-such-cxx")},
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "trainer.compile=true on cpu needs a C++ compiler" in proc.stderr
    assert "set trainer.compile=false" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not committed(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_compiled_runs_keep_the_keys_resume_across_the_switch_and_repeat_bit_for_bit(tmp_path):
    eager, compiled, again = tmp_path / "eager", tmp_path / "compiled", tmp_path / "again"
    run_train(eager, *FAST, "trainer.max_steps=4")
    first = run_train(compiled, *FAST, "trainer.max_steps=4", "trainer.compile=true")
    assert "train.compile layers=" in first.stderr + first.stdout
    # Kernels compiled afresh in another process (an empty inductor cache): the same bits.
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    run_train(again, *FAST, "trainer.max_steps=4", "trainer.compile=true", env=cache)
    assert compare_checkpoints(final(compiled), final(again)) is None

    e, c = load_checkpoint(final(eager)).state, load_checkpoint(final(compiled)).state
    for part in ("model", "ema"):
        assert list(c[part]) == list(e[part]) and not any("_orig_mod" in k for k in c[part])
    for part in ("optim_gen", "optim_discr"):
        assert c[part]["state"].keys() == e[part]["state"].keys()

    # Switched on resume, both ways: the key is resume-safe, and the run goes on from the step it saved.
    off = run_train(compiled, "resume_from=auto", "trainer.max_steps=6", "trainer.compile=false", experiment=None)
    assert "train.compile" not in off.stderr + off.stdout
    on = run_train(eager, "resume_from=auto", "trainer.max_steps=6", "trainer.compile=true", experiment=None)
    assert "train.compile layers=" in on.stderr + on.stdout
    for run in (compiled, eager):
        steps = [r["step"] for r in read_history(run) if r["kind"] == "train"]
        assert steps == list(range(1, 7)) and load_checkpoint(final(run)).step == 6

    # The exported tokenizer of a compiled run is its checkpoint's EMA weights, loadable by magvit2-pytorch.
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "resilient_train.export", str(compiled), "--out", str(out)]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO).returncode == 0
    import torch
    from safetensors.torch import load_file

    import resilient_train

    ema = load_checkpoint(final(compiled)).state["ema"]
    exported = load_file(out / "tokenizer.safetensors")
    assert exported.keys() == resilient_train.load_tokenizer(out).state_dict().keys()
    assert all(torch.equal(v, ema[k]) for k, v in exported.items())


@pytest.mark.slow
def test_the_chaos_proof_holds_with_compiled_kernels(tmp_path):
    import json

    out = tmp_path / "chaos"
    cmd = [sys.executable, str(REPO / "scripts" / "chaos_test.py"), "--steps", "30", "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--set", "trainer.compile=true"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=train_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["identical"] and {"nan", "hang", "save_kill", "step_kill", "corrupt"} <= {
        e["kind"] for e in report["events"]
    }
