"""The torch-free tools, and the package as a user installs it: run from anywhere, writing only under the cwd."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.parametrize("module", ["resilient_train.status", "resilient_train.orchestrator"])
def test_tool_imports_without_torch(module: str) -> None:
    code = f"import {module}, sys; assert 'torch' not in sys.modules, sorted(sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _listing(root: Path) -> set[str]:
    """Top-level entries of ``root`` and every path under ``root/outputs``."""
    names = {p.name for p in root.iterdir()}
    outputs = root / "outputs"
    if outputs.is_dir():
        names |= {str(p.relative_to(root)) for p in outputs.rglob("*")}
    return names


@pytest.mark.slow
def test_installed_package_runs_the_chaos_proof_from_another_directory(tmp_path: Path) -> None:
    before = _listing(REPO)

    # Build from a copy of the sources: an in-tree build would write build/ and *.egg-info into the repo.
    src = tmp_path / "src-copy"
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=junk)
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    pip += ["--no-cache-dir", "--disable-pip-version-check", "--target", str(site), str(src)]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import resilient_train; print(resilient_train.__file__)"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve().is_relative_to(site.resolve()), where.stdout

    proc = subprocess.run(
        [sys.executable, "-m", "resilient_train.orchestrator", "--steps", "12"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report_path = Path(proc.stdout.strip().splitlines()[-1])
    assert report_path.name == "report.json" and report_path.parent.parent == cwd / "outputs" / "chaos"
    report = json.loads(report_path.read_text())
    assert report["identical"] is True and report["steps"] == 12, report
    assert [t for t in report["trials"] if "error" in t] == []
    assert {"save_kill", "step_kill", "sigterm", "corrupt"} <= {e["kind"] for e in report["events"]}
    assert (report_path.parent / "report.md").exists() and (report_path.parent / "loss.png").stat().st_size > 0
    for arm in ("reference", "chaos"):  # trial run directories are absolute, under the report's folder
        run_dir = Path(report["trials"][0][arm]["run_dir"])
        assert run_dir.is_absolute() and run_dir.is_relative_to(report_path.parent), run_dir
    assert sorted(p.name for p in cwd.iterdir()) == ["outputs"]

    assert _listing(REPO) - before == set(), "the installed package wrote into the source tree"
