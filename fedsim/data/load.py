"""``load_dataset``: name + optional folder -> DatasetSplits, once per process."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from fedsim.data.errors import DataError
from fedsim.data.paths import env_data_dir, given_dir
from fedsim.data.splits import DatasetSplits

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10")


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> DatasetSplits:
    """The train/test tensors of ``name``, cached per process on the resolved arguments.

    ``data_dir``: the folder holding the dataset's files (ignored for "digits", which is
    bundled with scikit-learn). None or "": ``$FEDSIM_DATA_DIR/<name>`` when present, else
    the Hugging Face hub. The returned object and its tensors are shared by every caller:
    treat them as read-only. Every loading problem raises DataError.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if key == "digits":
        directory = None
    elif data_dir is not None and str(data_dir) != "":
        directory = given_dir(data_dir)
    else:
        directory = env_data_dir(key)
    return _load(key, None if directory is None else str(directory))


@functools.lru_cache(maxsize=8)
def _load(name: str, directory: str | None) -> DatasetSplits:
    """Dispatch to the dataset's loader (exceptions are not cached, so a fixed copy loads next time)."""
    path = None if directory is None else Path(directory)
    if name == "digits":
        from fedsim.data.digits import load_digits_splits

        return load_digits_splits()
    if name in ("mnist", "fashion-mnist"):
        from fedsim.data.mnist import load_idx_dataset

        return load_idx_dataset(name, path)
    from fedsim.data.cifar import load_cifar10

    return load_cifar10(path)


load_dataset.cache_clear = _load.cache_clear  # type: ignore[attr-defined]
