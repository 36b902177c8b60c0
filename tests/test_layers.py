"""Imports point down (README "Layout"): the apps never import each other's side, the
math imports no Flower, and the registry is the one list of algorithms."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "statement, forbidden",
    [
        ("import fedsim.client_app", {"fedsim.server_app", "fedsim.strategies", "fedsim.strategies.base", "fedsim.checkpoint", "fedsim.results"}),
        ("import fedsim.server_app", {"fedsim.client_app"}),
        ("import fedsim.core.signs, fedsim.core.votes, fedsim.core.aggregate, fedsim.core.model_vector", {"flwr", "fedsim.config"}),
    ],
)
def test_imports_point_down(statement, forbidden):
    loaded = _modules_after(statement)
    assert not forbidden & loaded, f"{statement} loads {sorted(forbidden & loaded)}"


def test_the_registry_is_the_one_list_of_strategy_names():
    import tomllib

    from fedsim.algorithms import REGISTRY, options
    from fedsim.config import RunConfig, strategy_names

    assert strategy_names() == tuple(REGISTRY)
    assert all(cls.name == name for name, cls in REGISTRY.items())
    defaults = tomllib.load(open("pyproject.toml", "rb"))["tool"]["flwr"]["app"]["config"]
    assert {k: defaults[k] for k in options()} == {k: o.default for k, o in options().items()}
    assert RunConfig().to_mapping() == defaults
