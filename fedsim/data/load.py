"""The data sets fedsim knows by name (``DATASETS``, one self-describing entry each) and
``load_dataset``: name + optional folder -> DatasetSplits, once per process."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedsim.data.cifar import load_cifar10
from fedsim.data.digits import load_digits_splits
from fedsim.data.errors import DataError
from fedsim.data.mnist import load_idx_dataset
from fedsim.data.paths import env_data_dir, given_dir
from fedsim.data.splits import DatasetSplits


@dataclass(frozen=True)
class DatasetEntry:
    """One data set: how it loads (``load(folder)``; folder None: the default source) and
    what it is (shape of one example, number of classes, the model ``model = "auto"``
    picks, the training augmentation for a model that takes its full size: "crop-flip" is
    random pad-4 crops and horizontal flips, "" none)."""

    name: str
    load: Callable[[Path | None], DatasetSplits]
    input_shape: tuple[int, ...]
    num_classes: int
    default_model: str
    augment: str = ""
    bundled: bool = False  # ships with a package: data-dir is not read


DATASETS: dict[str, DatasetEntry] = {
    e.name: e
    for e in (
        DatasetEntry("digits", lambda _: load_digits_splits(), (1, 8, 8), 10, "digits-mlp", bundled=True),
        DatasetEntry("mnist", functools.partial(load_idx_dataset, "mnist"), (1, 28, 28), 10, "mnist-cnn"),
        DatasetEntry("fashion-mnist", functools.partial(load_idx_dataset, "fashion-mnist"), (1, 28, 28), 10, "mnist-cnn"),
        DatasetEntry("cifar10", load_cifar10, (3, 32, 32), 10, "resnet20", augment="crop-flip"),
    )
}


def dataset_entry(name: str) -> DatasetEntry:
    """The entry of ``name`` (case and ``_``/``-`` do not matter); DataError if unknown."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[key]


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> DatasetSplits:
    """The train/test tensors of ``name``, cached per process on the resolved arguments.

    ``data_dir``: the folder holding the dataset's files (ignored for a bundled one). None
    or "": ``$FEDSIM_DATA_DIR/<name>`` when present, else the Hugging Face hub. The returned
    object and its tensors are shared by every caller: treat them as read-only. Every
    loading problem raises DataError.
    """
    entry = dataset_entry(name)
    if entry.bundled:
        directory = None
    elif data_dir is not None and str(data_dir) != "":
        directory = given_dir(data_dir)
    else:
        directory = env_data_dir(entry.name)
    return _load(entry.name, None if directory is None else str(directory))


@functools.lru_cache(maxsize=8)
def _load(name: str, directory: str | None) -> DatasetSplits:
    """The entry's loader, cached (exceptions are not cached, so a fixed copy loads next time)."""
    return DATASETS[name].load(None if directory is None else Path(directory))


load_dataset.cache_clear = _load.cache_clear  # type: ignore[attr-defined]
