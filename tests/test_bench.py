"""Smoke test of ``scripts/bench.py --quick``: it runs and writes every ratio. No timing is asserted
(claims of speed live in the benchmark's report, not in tests).

Marked slow: even ``--quick`` trains magvit64 for a few steps and starts train.py several times,
which takes well over a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO

RATIOS = {
    "save_vs_raw_fsync",
    "save_vs_torch_save",
    "save_vs_magvit2_trainer",
    "load_vs_raw_read",
    "loop_vs_bare",
    "loop_vs_bare_tiny",
    "loop_vs_bare_magvit64",
    "async_stall_vs_sync",
    "resume_vs_fresh_start",
}


@pytest.mark.slow
def test_bench_quick_writes_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert set(report["ratios"]) == RATIOS
    for name, value in report["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
        assert name in report["measurements"], name
    for name, m in report["measurements"].items():
        pairs = [("ours_s", "baseline_s"), ("ours_steps_per_s", "baseline_steps_per_s")]
        numbers = [m[k] for pair in pairs if pair[0] in m for k in pair]
        assert numbers and all(math.isfinite(v) and v > 0 for v in numbers), (name, m)
    for name in ("save_vs_raw_fsync", "load_vs_raw_read", "async_stall_vs_sync"):
        assert report["measurements"][name]["ours_bytes"] > 0, name
    machine = report["machine"]
    assert machine["cpu_model"] and machine["cpu_count"] >= 1 and machine["torch"]
    assert machine["disk"]["total_bytes"] > 0
    # Every temporary directory of the run was removed.
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]
