"""How names are found: the subpackages' lazy public names, and the old module paths.

* :func:`lazy`: a subpackage's ``__init__`` names its public API without importing the modules
  behind it, so importing one torch-free module of a subpackage never drags torch (or the
  trainer) in; a name is imported from its module on first use.
* :data:`MOVED`: the modules moved into subpackages by concern (see the README's "Layout") stay
  importable under their old paths for one release (until 0.2): a finder on ``sys.meta_path``
  answers an old name with the module at its new path (the same module object, so classes and
  functions are identical) after a ``DeprecationWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["MOVED", "install", "lazy", "forward"]


def lazy(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``names`` maps a public name to the submodule holding it."""
    module = sys.modules[package]

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
            setattr(module, name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


#: old dotted path -> new dotted path
MOVED: dict[str, str] = {
    "resilient_train.trainer": "resilient_train.train.trainer",
    "resilient_train.state": "resilient_train.train",  # its names are in train.parts and train.env now
    "resilient_train.rng": "resilient_train.train.rng",
    "resilient_train.device": "resilient_train.train.device",
    "resilient_train.observers": "resilient_train.train",
    "resilient_train.tblog": "resilient_train.train.tblog",
    "resilient_train.model": "resilient_train.tokenizer.model",
    "resilient_train.metrics": "resilient_train.tokenizer.metrics",
    "resilient_train.video": "resilient_train.data",
    "resilient_train.checks": "resilient_train.resume.checks",
}


def forward(old: str, module: ModuleType) -> Callable[[str], Any]:
    """A module ``__getattr__`` for a command kept at its old path (``python -m resilient_train.export``):
    any other name is taken from ``module``, with a ``DeprecationWarning``."""

    def __getattr__(name: str) -> Any:
        warnings.warn(f"{old}.{name} moved to {module.__name__}.{name} (until 0.2)", DeprecationWarning, stacklevel=2)
        return getattr(module, name)

    return __getattr__


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the module at the new path has run already


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(
            f"{fullname} moved to {new}; the old path works until resilient-train 0.2", DeprecationWarning, stacklevel=3
        )
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
