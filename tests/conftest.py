"""Fixtures shared by the tests that start Flower's runtime."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsim.engine.flower_runtime import stop_stragglers


@pytest.fixture
def flwr_home(tmp_path: Path) -> Iterator[Path]:
    """A private FLWR_HOME; afterwards no process that names it may be left running."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    yield home
    left = stop_stragglers(home)
    assert not left, f"processes left running: {left}"
