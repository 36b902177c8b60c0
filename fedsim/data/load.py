"""The data sets fedsim knows by name (``DATASETS``, one self-describing entry each), a
user's own (``fedsim.data.formats``: ``disk``, ``imagefolder``, ``npz`` or a loader of
theirs by import path), and ``load_dataset``: what to load -> DatasetSplits, once per
process."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedsim.data import formats
from fedsim.data.cifar import load_cifar10
from fedsim.data.digits import load_digits_splits
from fedsim.data.errors import DataError
from fedsim.data.mnist import load_idx_dataset
from fedsim.data.paths import env_data_dir, given_dir
from fedsim.data.splits import DatasetSplits
from fedsim.errors import ConfigError
from fedsim.plugins import is_import_path, load_attr


@dataclass(frozen=True)
class DatasetEntry:
    """One data set: how it loads (``load(folder)``; folder None: the default source) and
    what it is (shape of one example, number of classes, the model ``model = "auto"``
    picks, the training augmentation for a model that takes its full size: "crop-flip" is
    random pad-4 crops and horizontal flips, "" none)."""

    name: str
    load: Callable[[Path | None], DatasetSplits] | None  # None: a user's format (load_user_data)
    input_shape: tuple[int, ...] | None  # None: what the files hold
    num_classes: int | None
    default_model: str  # "": none (model must be set)
    augment: str = ""
    bundled: bool = False  # ships with a package: data-dir is not read

    @property
    def user(self) -> bool:
        """A user's data (a format or a loader of theirs), not a built-in data set."""
        return self.load is None


@dataclass(frozen=True)
class DataSpec:
    """What to load: the ``dataset`` and ``data-dir`` keys, and for a user's data the
    columns to read (``image-column``: one, or several comma-separated numeric ones;
    ``label-column``), ``normalize`` ("auto" or "none") and whether the task has a loss of
    the user's (then float labels are regression targets; integer labels stay class ids)."""

    dataset: str
    data_dir: str = ""
    image_column: str = "image"
    label_column: str = "label"
    normalize: str = "auto"
    user_loss: bool = False
    holdout: float | None = formats.HOLDOUT_FRACTION  # the test share made when the data has none (None: make none)


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
    """The entry of ``name`` (case and ``_``/``-`` do not matter for a built-in), of a
    user's format or of a user's loader ("package.module:attr"); DataError if unknown."""
    if name in formats.USER_FORMATS or is_import_path(name):
        return DatasetEntry(name, None, None, None, "")
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, or your own data: "
            f"{', '.join(formats.USER_FORMATS)} (with data-dir) or a loader as 'package.module:attr'"
        )
    return DATASETS[key]


def load_data(spec: DataSpec) -> DatasetSplits:
    """The splits ``spec`` names, cached per process; DataError (or ConfigError for a
    loader that does not import) naming the problem."""
    entry = dataset_entry(spec.dataset)
    if not entry.user:
        return load_dataset(spec.dataset, spec.data_dir or None)
    return _load_user(spec)


@functools.lru_cache(maxsize=4)
def _load_user(spec: DataSpec) -> DatasetSplits:
    name = spec.dataset
    if name in formats.USER_FORMATS:
        if not spec.data_dir:
            raise DataError(f"dataset={name!r} reads your files: set data-dir to the folder (or, for npz, the file)")
        path = Path(spec.data_dir).expanduser()
        if not path.exists():
            raise DataError(f"data-dir {str(path)!r} does not exist")
        if name == "disk":
            raw = formats.read_disk(path, [c.strip() for c in spec.image_column.split(",") if c.strip()], spec.label_column)
        elif name == "imagefolder":
            raw = formats.read_imagefolder(path)
        else:
            raw = formats.read_npz(path)
    else:
        try:
            loader = load_attr(name, "dataset")
        except ConfigError as err:
            raise DataError(str(err)) from None
        raw = formats.read_user_loader(loader, name, spec.data_dir)
    return formats.to_splits(name, raw, spec.normalize, spec.user_loss, spec.holdout)


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
    load = DATASETS[name].load
    assert load is not None  # a built-in entry
    return load(None if directory is None else Path(directory))


def clear_data_cache() -> None:
    """Forget every data set this process loaded."""
    _load.cache_clear()
    _load_user.cache_clear()


load_dataset.cache_clear = clear_data_cache  # type: ignore[attr-defined]
