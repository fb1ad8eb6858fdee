"""Where a start's seconds go (:mod:`resilient_train.startup`): every process logs one timing line after its first
step, ``start.timing`` fresh and ``resume.timing`` resuming (naming the checkpoint), with its phases in order,
adding up to its total (the process's birth to the end of its first step)."""

from __future__ import annotations

import re
import shutil

from conftest import run_train

FRESH = ["interpreter", "imports", "config", "model_imports", "read_verify", "data", "build", "setup", "first_step"]
RESUME = [*FRESH[:6], "checks", "build", "restore", "setup", "first_step"]


def timing(log: str, kind: str) -> tuple[dict[str, float], str]:
    (line,) = [x for x in log.splitlines() if f" {kind}.timing " in x]
    spans = {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)(?=\s|$)", line)}
    return spans, line


def test_each_start_logs_its_phases_once_and_they_add_up(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # the shared run (20 steps, fresh) is only read
    fresh, _ = timing((run / "train.log").read_text(), "start")
    assert list(fresh) == [*FRESH, "total"]
    run_train(run, "resume_from=auto", "trainer.max_steps=21")
    resumed, line = timing((run / "train.log").read_text(), "resume")
    assert list(resumed) == [*RESUME, "total"]
    assert line.endswith(f"path={run / 'checkpoints' / 'step_00000020'}")
    for spans in (fresh, resumed):
        parts = sum(v for k, v in spans.items() if k != "total")
        assert abs(parts - spans["total"]) <= 0.01 * len(spans), spans  # each printed to 0.01 s
        assert spans["model_imports"] > 0.1 and spans["first_step"] > 0, spans  # magvit2 imported in its phase
