"""The import graph of fedsim (README "Layout"): no cycle, no arrow from a lower layer to a
higher one, every import inside a function says why it is there, the apps never import
each other's side, the math imports no Flower, and the registry is the one list of
algorithms."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedsim"

# Layers, lowest first; a module may import modules of its own layer or below, never above.
# A module is placed by the longest prefix listed.
LAYERS: list[tuple[str, ...]] = [
    ("fedsim.errors", "fedsim.log_lines", "fedsim.config", "fedsim.seeding", "fedsim.plugins", "fedsim.core", "fedsim.aggregators", "fedsim.parallel", "fedsim.engine.settings", "fedsim.scaffold"),
    ("fedsim.data", "fedsim.models", "fedsim.partitions", "fedsim.device", "fedsim.arrays", "fedsim.attacks", "fedsim.objective", "fedsim.analysis"),
    ("fedsim.clients",),
    ("fedsim.protocol", "fedsim.run_folder"),
    ("fedsim.algorithms", "fedsim.results"),
    ("fedsim.validation", "fedsim.plan", "fedsim.strategies", "fedsim.checkpoint"),
    ("fedsim.runtime", "fedsim.callbacks", "fedsim.split_data"),
    ("fedsim.client_app", "fedsim.server_app"),
    ("fedsim.engine",),
    ("fedsim.sweep",),
    ("fedsim.sweep_ray",),
    ("fedsim.cli",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    if module == "fedsim":  # the package's __init__: a docstring and the version
        return 0
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer of tests/test_layers.py"
    return rank


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported fedsim module, line, inside a function) for every import of ``path``,
    TYPE_CHECKING blocks excepted; ``from package import module`` counts as the module."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name in MODULES)
            elif isinstance(child, ast.ImportFrom) and child.module in MODULES:
                subs = [f"{child.module}.{a.name}" for a in child.names if f"{child.module}.{a.name}" in MODULES]
                names = subs if len(subs) == len(child.names) else [child.module, *subs]
                found.extend((n, child.lineno, in_function) for n in names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return found


GRAPH = {m: {n for n, _, _ in imports(p) if n != m} for m, p in MODULES.items()}


def test_no_import_cycle():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path[path.index(n):], n])
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_no_import_points_up():
    upward = [f"{m} -> {n}" for m in sorted(GRAPH) for n in sorted(GRAPH[m]) if layer(n) > layer(m)]
    assert not upward, upward


def test_every_import_inside_a_function_says_why():
    silent = []
    for p in MODULES.values():
        lines = p.read_text().splitlines()
        for _, line, in_function in imports(p):
            if in_function and "#" not in lines[line - 1]:
                silent.append(f"{p.relative_to(ROOT)}:{line}")
    assert not silent, f"function-level imports without a comment saying why: {sorted(set(silent))}"


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "statement, forbidden",
    [
        ("import fedsim.client_app", {"fedsim.server_app", "fedsim.strategies", "fedsim.strategies.base", "fedsim.checkpoint", "fedsim.results"}),
        ("import fedsim.server_app", {"fedsim.client_app"}),
        ("import fedsim.core.signs, fedsim.core.votes, fedsim.core.fd, fedsim.core.aggregate, fedsim.core.model_vector", {"flwr", "fedsim.config"}),
        ("import fedsim.aggregators", {"flwr", "fedsim.config"}),
        ("import fedsim.config", {"torch", "flwr", "numpy"}),
    ],
)
def test_imports_point_down(statement, forbidden):
    loaded = _modules_after(statement)
    assert not forbidden & loaded, f"{statement} loads {sorted(forbidden & loaded)}"


def test_the_registry_is_the_one_list_of_strategy_names():
    import tomllib

    from fedsim.algorithms import REGISTRY, options
    from fedsim.validation import load_config

    assert all(cls.name == name for name, cls in REGISTRY.items())
    defaults = tomllib.load(open(ROOT / "pyproject.toml", "rb"))["tool"]["flwr"]["app"]["config"]
    assert {k: defaults[k] for k in options()} == {k: o.default for k, o in options().items()}
    assert load_config({}).to_mapping() == defaults


def test_functions_are_short():
    long = []
    for p in MODULES.values():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
