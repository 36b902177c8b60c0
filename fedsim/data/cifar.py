"""CIFAR-10 from the python pickle batches (folder or the original .tar.gz), or the hub.

torchvision's ``CIFAR10`` insists on the md5 of every batch, so the batches are read here:
a restricted unpickler accepts only what a batch holds (dicts, lists, bytes, numpy arrays)
and refuses any other global, and every batch is validated (keys, dtype, sizes, labels).
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.data.errors import DataError
from fedsim.data.hub import REPOS, load_hub_arrays
from fedsim.data.paths import where_to_look
from fedsim.data.splits import DatasetSplits, normalise

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
PIXELS = 3 * 32 * 32
# The only globals a CIFAR batch pickle (python 2 or 3, numpy 1 or 2) needs.
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}
Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 [n, 3, 32, 32], int64 [n]


def how_to_get() -> str:
    """Where CIFAR-10 comes from and how to hand it over."""
    return f"Download {URL} (md5 {MD5}) into a folder (extracted or not) and {where_to_look('cifar10')}."


def load_cifar10(directory: Path | None) -> DatasetSplits:
    """CIFAR-10 as [n, 3, 32, 32], normalised per channel with MEAN/STD; the hub when ``directory`` is None."""
    if directory is None:
        arrays = load_hub_arrays("cifar10", how_to_get())
        splits = {}
        for split, (x, y) in arrays.items():
            if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
                raise DataError(f"hub {REPOS['cifar10']} {split} split has images {x.shape}, expected (n, 32, 32, 3)")
            splits[split] = (torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y))
        x_train, y_train = splits["train"]
        x_test, y_test = splits["test"]
    else:
        batches = read_batches(directory)
        x_train, y_train = concat(batches, TRAIN_BATCHES)
        x_test, y_test = concat(batches, TEST_BATCHES)
    return DatasetSplits(
        "cifar10", normalise(x_train, MEAN, STD), y_train, normalise(x_test, MEAN, STD), y_test, num_classes=10
    )


def concat(batches: dict[str, Batch], names: tuple[str, ...]) -> Batch:
    """The named batches, in order, as one (images, labels) pair."""
    return torch.cat([batches[n][0] for n in names]), torch.cat([batches[n][1] for n in names])


def read_batches(directory: Path) -> dict[str, Batch]:
    """Every batch from ``directory/cifar-10-batches-py/`` (or ``directory`` itself), else the archive."""
    for folder in (directory / FOLDER, directory):
        if (folder / TRAIN_BATCHES[0]).exists() or (folder / TEST_BATCHES[0]).exists():
            names = TRAIN_BATCHES + TEST_BATCHES
            return {name: parse_batch(read_file(folder / name), str(folder / name)) for name in names}
    if (directory / ARCHIVE).exists():
        return read_archive(directory / ARCHIVE)
    raise DataError(f"{directory} holds neither {FOLDER}/ nor {ARCHIVE}. {how_to_get()}")


def read_file(path: Path) -> bytes:
    """The file's bytes; DataError naming it when it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path} is missing; expected the 5 training batches and test_batch. {how_to_get()}") from exc
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc}). {how_to_get()}") from exc


def read_archive(archive: Path) -> dict[str, Batch]:
    """The batches straight from the .tar.gz (one pass, nothing extracted to disk)."""
    wanted = {f"{FOLDER}/{name}": name for name in TRAIN_BATCHES + TEST_BATCHES}
    batches: dict[str, Batch] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    batches[name] = parse_batch(data, f"{archive}:{member.name}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{archive} is not a valid .tar.gz or is truncated ({exc}). {how_to_get()}") from exc
    missing = [f"{FOLDER}/{n}" for n in TRAIN_BATCHES + TEST_BATCHES if n not in batches]
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}; expected the original {ARCHIVE}. {how_to_get()}")
    return batches


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def parse_batch(data: bytes, source: str) -> Batch:
    """A batch's (uint8 [n, 3, 32, 32], int64 [n]) after checking keys, dtype and sizes."""
    expected = 'a pickled dict with b"data" (uint8 [n, 3072]) and b"labels" (n ints in 0..9)'
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise DataError(
            f"{source} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}); expected {expected}. "
            f"{how_to_get()}"
        ) from exc
    if not isinstance(batch, dict):
        raise DataError(f"{source} holds a {type(batch).__name__}; expected {expected}")
    images = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if images is None or labels is None:
        raise DataError(f"{source} has keys {sorted(map(repr, batch))}; expected {expected}")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != PIXELS:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"{source}: data is {got}; expected {expected}")
    try:
        y = np.asarray(labels)
        if y.dtype == object or not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"labels of dtype {y.dtype}")
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: labels are not integers ({exc}); expected {expected}") from exc
    if y.shape != (images.shape[0],):
        raise DataError(f"{source}: {y.size} labels for {images.shape[0]} images; expected {expected}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{source}: labels {y.min()}..{y.max()}; expected {expected}")
    if not images.flags.writeable:  # protocol-5 pickles give read-only views of their buffer
        images = images.copy()
    x = torch.from_numpy(np.ascontiguousarray(images).reshape(-1, 3, 32, 32))
    return x, torch.from_numpy(y.astype(np.int64))
