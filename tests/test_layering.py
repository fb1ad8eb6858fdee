"""The house stays legible: no import circles, no import from a higher layer, no module over 400 lines.

``tests/layering.py`` reads the imports with ``ast``; the rules and the layer order are there. The
negative controls plant each kind of violation in a copy of the package and show it is caught.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import layering
import pytest
from conftest import REPO

PACKAGE = REPO / "src" / "resilient_train"


def test_the_package_keeps_the_house_rules():
    extra = tuple(d for d in (REPO / "benchmarks", REPO / "scripts") if d.is_dir())
    assert layering.check(PACKAGE, extra) == []


@pytest.fixture
def copy(tmp_path) -> Path:
    dst = tmp_path / "resilient_train"
    shutil.copytree(PACKAGE, dst, ignore=shutil.ignore_patterns("__pycache__", "configs"))
    assert layering.check(dst) == [], "the copy must start clean"
    return dst


def plant(path: Path, line: str) -> None:
    path.write_text(path.read_text() + "\n" + line + "\n")


def test_a_planted_circle_is_caught(copy):
    plant(copy / "fsio.py", "from .status import run_status  # planted")
    problems = layering.check(copy)
    circles = [p for p in problems if p.startswith("import circle:")]
    assert len(circles) == 1 and "fsio" in circles[0] and "status" in circles[0], problems
    assert "fsio (base) imports status (tools), a higher layer" in problems


def test_a_lower_layer_importing_a_higher_one_is_caught(copy):
    plant(copy / "checkpoint" / "layout.py", "def f():\n    from ..train.rng import RNGState  # planted, lazily")
    assert layering.check(copy) == ["checkpoint.layout (checkpoint) imports train.rng (train), a higher layer"]


def test_a_component_importing_the_trainer_is_caught(copy):
    plant(copy / "chaos" / "agent.py", "from ..train.trainer import Trainer  # planted")
    assert layering.check(copy) == ["chaos.agent imports train.trainer, which only cli may import"]


def test_a_type_checking_import_is_not_an_import(copy):
    planted = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..cli import run"
    plant(copy / "checkpoint" / "layout.py", planted)
    assert layering.check(copy) == []


def test_a_trainer_class_over_250_lines_is_caught(copy):
    path = copy / "train" / "trainer.py"
    text = path.read_text()
    anchor = "    def restore(self"
    path.write_text(text.replace(anchor, "    x = 0\n" * 20 + anchor, 1))
    [problem] = layering.check(copy)
    assert problem.startswith("class over 250 lines: train.trainer.Trainer (")


def test_a_big_module_a_long_function_and_a_stray_module_are_caught(copy):
    (copy / "train" / "big.py").write_text("x = 1\n" * 401)
    (copy / "stray.py").write_text("def f():\n" + "    x = 1\n" * 100)
    assert layering.check(copy) == [
        "stray: in no layer (add it to tests/layering.py's LAYERS)",
        "train.big: 401 lines (over 400)",
        "function over 100 lines: stray.f (101 lines)",
    ]
