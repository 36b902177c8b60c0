"""Where data comes from and where derived files go."""

from __future__ import annotations

import os
from pathlib import Path

from fedsim.data.errors import DataError


def cache_dir() -> Path:
    """``$FEDSIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedsim``, else ``~/.cache/fedsim``."""
    env = os.environ.get("FEDSIM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedsim"


def given_dir(data_dir: str | os.PathLike[str]) -> Path:
    """``data_dir``, resolved; DataError when it does not exist or is not a folder."""
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"data_dir {str(path)!r} does not exist; pass the folder that holds the dataset's files")
    if not path.is_dir():
        raise DataError(f"data_dir {str(path)!r} is a file, not a folder; pass the folder that holds it")
    return path.resolve()


def env_data_dir(name: str) -> Path | None:
    """``$FEDSIM_DATA_DIR/<name>`` (or ``<name>`` with "_" for "-") when set and present."""
    root = os.environ.get("FEDSIM_DATA_DIR")
    if not root:
        return None
    for candidate in (Path(root).expanduser() / name, Path(root).expanduser() / name.replace("-", "_")):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def where_to_look(name: str) -> str:
    """How a missing local copy can be given, for error messages."""
    return (
        f"pass data-dir='/path/to/folder' (flwr run . --run-config \"dataset='{name}' data-dir='/path/to/folder'\"), "
        f"or set FEDSIM_DATA_DIR to a folder holding {name}/"
    )
