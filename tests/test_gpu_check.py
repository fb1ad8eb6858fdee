"""``scripts/gpu_check.sh`` rehearsed on the CPU (``DEVICE=cpu``): every step of the GPU acceptance run runs and
passes, so a session lent a GPU spends its minutes on the GPU, not on the script. Slow (about two minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_rehearsal_passes_every_check_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # the script runs `python`
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "BUDGET": "480", "PATH": path}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    status = {c["check"]: c["status"] for c in report["checks"]}
    expected = ["cuda.continuous", "cuda.split", "cuda.compare", "auto", "chaos", "bench"]
    expected += ["shared.continuous", "shared.split", "shared.compare"]
    expected += ["precision"]
    assert status == {**dict.fromkeys(expected, "PASS"), "nccl": "SKIP"}, status
    assert {c["check"]: c["detail"] for c in report["checks"]}["cuda.compare"] == "identical"
    bench = json.loads((out / "bench" / "gpu_bench.json").read_text())
    assert [(r["batch"], r["deterministic"]) for r in bench["throughput"]] == [
        (1, True),
        (2, True),
        (1, False),
        (2, False),
    ]
    assert all(r["flops_per_step"] > 0 and r["clips_per_s"] > 0 for r in bench["throughput"])
    assert "loop vs bare step" in proc.stdout and "async stall" in proc.stdout
    # Precision x compile: every setting either timed against float32 eager, or named as too slow to time.
    rows = json.loads((out / "bench" / "gpu_precision.json").read_text())["rows"]
    for p in ("bf16", "16"):
        timed = {f"precision_{p}_eager_vs_32", f"precision_{p}_compiled_vs_32"}
        assert timed <= rows.keys() or (
            f"precision_{p}_not_timed" in rows and rows[f"precision_{p}_not_timed"]["kernel"] < 0.1
        )
    assert all(r["ratio"] > 0 and r["ours_steps_per_s"] > 0 for r in rows.values() if r["ratio"] is not None)
    assert "precision_32_compiled_vs_32" in rows and "precision x compile" in proc.stdout
