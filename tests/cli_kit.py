"""Calling the fedsim CLI in tests as a user would, in this process."""

from __future__ import annotations

import pytest

from fedsim.cli import main


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``fedsim *argv``: its exit code (argparse's SystemExit included) and what it wrote to stderr."""
    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    return int(rc or 0), capsys.readouterr().err
