"""The house rules, read from the source with ``ast`` (nothing is imported or run): layers, circles, sizes.

``LAYERS`` lists the parts of ``resilient_train`` from the bottom up. A module may import its own
layer and the layers below it, never one above: the base knows nothing of checkpoints, the
checkpoint package nothing of the config, the loop nothing of resume, chaos or the command line.
Imports under ``if TYPE_CHECKING:`` are not imports. The package root (``resilient_train/__init__``)
is the public facade and may reach any layer lazily (``load_tokenizer``).

:func:`check` returns every violation as a sentence: an import circle, an import from a higher
layer, a module outside every layer, a module over ``MAX_LINES``, a function over ``MAX_FUNCTION``, a class
over its ``MAX_CLASS``.
"""

from __future__ import annotations

import ast
from pathlib import Path

#: bottom to top; a name stands for that module and everything under it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("_imports", "fsio", "dist", "startup")),
    ("checkpoint", ("checkpoint",)),
    ("config", ("config",)),
    ("monitor", ("monitor",)),
    ("data", ("data",)),
    ("tokenizer", ("tokenizer",)),
    ("train", ("train",)),
    ("chaos", ("chaos",)),
    ("resume", ("resume",)),
    ("tools", ("cli", "verify", "status", "export", "tokenize", "evaluate", "orchestrator")),
]
#: imported only by these (the loop is handed what it needs; nothing below the command line builds it)
ONLY_FROM = {"train.trainer": ("cli",)}
MAX_LINES = 400
MAX_FUNCTION = 100
#: The loop and its state stay one screen's worth: policies are parts it is given.
MAX_CLASS = {"train.trainer.Trainer": 250}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)  # relative to the package: "" is the root, "train.trainer", ...


def layer_of(mod: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return i
    return None


def _imports(tree: ast.AST, mod: str, is_pkg: bool, known: set[str]) -> set[str]:
    """The package's modules that ``mod`` imports (at any depth, outside ``if TYPE_CHECKING:``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for c in child.orelse:
                    visit(c)
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = mod.split(".") if mod else []
                    if not is_pkg:
                        base = base[:-1]
                    base = base[: len(base) - (child.level - 1)] if child.level > 1 else base
                    target = ".".join([*base, *([child.module] if child.module else [])])
                elif (child.module or "").startswith("resilient_train"):
                    target = child.module[len("resilient_train") :].lstrip(".")
                else:
                    target = None
                if target is not None:
                    found.update([target, *(f"{target}.{a.name}".lstrip(".") for a in child.names)])
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("resilient_train"):
                        found.add(a.name[len("resilient_train") :].lstrip("."))
            visit(child)

    visit(tree)
    out = set()
    for name in found:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name != mod and (name or mod == ""):
            out.add(name)
    return {n for n in out if not (n and mod.startswith(n + ".")) and n != ""}  # a parent package is no edge


def read_package(root: Path) -> tuple[dict[str, set[str]], dict[str, int], list[str]]:
    """Import graph, line counts and over-long functions of the package at ``root``."""
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    graph, lines, long_fns = {}, {}, []
    for mod, path in files.items():
        src = path.read_text(encoding="utf-8")
        lines[mod] = src.count("\n")
        tree = ast.parse(src)
        graph[mod] = _imports(tree, mod, path.name == "__init__.py", known)
        for node in ast.walk(tree):
            n = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and n > MAX_FUNCTION:
                long_fns.append(f"function over {MAX_FUNCTION} lines: {mod or '__init__'}.{node.name} ({n} lines)")
            limit = MAX_CLASS.get(f"{mod}.{getattr(node, 'name', '')}")
            if isinstance(node, ast.ClassDef) and limit is not None and n > limit:
                long_fns.append(f"class over {limit} lines: {mod}.{node.name} ({n} lines)")
    return graph, lines, long_fns


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def check(root: Path, extra_dirs: tuple[Path, ...] = ()) -> list[str]:
    graph, lines, long_fns = read_package(root)
    problems = [f"import circle: {' <-> '.join(c)}" for c in cycles(graph)]
    for mod, deps in sorted(graph.items()):
        if mod == "":
            continue  # the facade
        mine = layer_of(mod)
        if mine is None:
            problems.append(f"{mod}: in no layer (add it to tests/layering.py's LAYERS)")
            continue
        for dep in sorted(deps):
            theirs = layer_of(dep)
            if theirs is not None and theirs > mine:
                problems.append(f"{mod} ({LAYERS[mine][0]}) imports {dep} ({LAYERS[theirs][0]}), a higher layer")
            allowed = ONLY_FROM.get(dep)
            if allowed and not any(mod == a or mod.startswith(a + ".") for a in allowed):
                problems.append(f"{mod} imports {dep}, which only {', '.join(allowed)} may import")
    problems += [f"{m or '__init__'}: {n} lines (over {MAX_LINES})" for m, n in sorted(lines.items()) if n > MAX_LINES]
    problems += long_fns
    for d in extra_dirs:
        for p in sorted(d.rglob("*.py")):
            n = p.read_text(encoding="utf-8").count("\n")
            if n > MAX_LINES:
                problems.append(f"{p.relative_to(d.parent)}: {n} lines (over {MAX_LINES})")
    return problems
