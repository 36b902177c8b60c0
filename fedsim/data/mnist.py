"""MNIST and Fashion-MNIST: the four original IDX files, read by torchvision's dataset classes.

torchvision's ``MNIST``/``FashionMNIST`` read ``<root>/<Class>/raw/<file>`` (uncompressed)
without touching the network when ``download=False``. The given folder is never written:
its ``.gz`` files are decompressed (and plain files symlinked) once into a cache folder
``<cache>/torchvision/<name>-<key>/<Class>/raw/``, ``key`` hashing the sources' paths,
sizes and mtimes; a folder already in torchvision's layout is read in place.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsim.data.errors import DataError
from fedsim.data.hub import REPOS, load_hub_arrays
from fedsim.data.paths import cache_dir, where_to_look
from fedsim.data.splits import DatasetSplits, normalise


@dataclass(frozen=True)
class Spec:
    """One IDX dataset: torchvision class name, normalisation, where to download it."""

    tv_class: str
    mean: float
    std: float
    url: str


SPECS = {
    "mnist": Spec("MNIST", 0.1307, 0.3081, "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashion-mnist": Spec(
        "FashionMNIST", 0.2860, 0.3530, "https://github.com/zalandoresearch/fashion-mnist (data/fashion/)"
    ),
}
# base name -> (number of examples, shape of one example)
FILES: dict[str, tuple[int, tuple[int, ...]]] = {
    "train-images-idx3-ubyte": (60_000, (28, 28)),
    "train-labels-idx1-ubyte": (60_000, ()),
    "t10k-images-idx3-ubyte": (10_000, (28, 28)),
    "t10k-labels-idx1-ubyte": (10_000, ()),
}


def how_to_get(name: str) -> str:
    """Where the four files come from and how to hand them over."""
    files = ", ".join(f"{base}.gz" for base in FILES)
    return f"Download {files} from {SPECS[name].url} into one folder and {where_to_look(name)}."


def load_idx_dataset(name: str, directory: Path | None) -> DatasetSplits:
    """``name`` from the files in ``directory``, or from the hub when it is None."""
    spec = SPECS[name]
    if directory is None:
        arrays = load_hub_arrays(name, how_to_get(name))
        (x_train, y_train), (x_test, y_test) = (
            (torch.from_numpy(arrays[s][0]), torch.from_numpy(arrays[s][1])) for s in ("train", "test")
        )
        for split, x, y, n in (("train", x_train, y_train, 60_000), ("test", x_test, y_test, 10_000)):
            if x.shape != (n, 28, 28) or y.shape != (n,):
                raise DataError(f"hub {REPOS[name]} {split} split has images {tuple(x.shape)}, expected ({n}, 28, 28)")
        label_source = f"hub {REPOS[name]}"
    else:
        folder, sources = find_sources(name, directory)
        root = torchvision_root(name, directory, folder, sources)
        x_train, y_train = read_split(name, root, train=True)
        x_test, y_test = read_split(name, root, train=False)
        label_source = str(sources["train-labels-idx1-ubyte"])
    for y in (y_train, y_test):
        if int(y.min()) < 0 or int(y.max()) > 9:
            raise DataError(f"{label_source}: labels {int(y.min())}..{int(y.max())}, expected 0..9. {how_to_get(name)}")
    return DatasetSplits(
        name,
        normalise(x_train.unsqueeze(1), (spec.mean,), (spec.std,)),
        y_train.to(torch.int64),
        normalise(x_test.unsqueeze(1), (spec.mean,), (spec.std,)),
        y_test.to(torch.int64),
        num_classes=10,
    )


def find_sources(name: str, directory: Path) -> tuple[Path, dict[str, Path]]:
    """The folder holding the four files and each file (plain preferred over ``.gz``).

    Looks in ``directory``, torchvision's ``directory/<Class>/raw``, then ``directory/<name>``.
    """
    spec = SPECS[name]
    candidates = (directory, directory / spec.tv_class / "raw", directory / name, directory / name.replace("-", "_"))
    for folder in candidates:
        found = {base: present(folder, base) for base in FILES}
        if any(found.values()):
            missing = [str(folder / f"{base}.gz") for base, path in found.items() if path is None]
            if missing:
                raise DataError(
                    f"{name}: missing file {', '.join(missing)}; expected all four files. {how_to_get(name)}"
                )
            return folder, {base: path for base, path in found.items() if path is not None}
    raise DataError(
        f"{directory} holds none of the {name} files (expected {', '.join(f'{b}.gz' for b in FILES)} there, "
        f"or torchvision's layout {directory / spec.tv_class / 'raw'}). {how_to_get(name)}"
    )


def present(folder: Path, base: str) -> Path | None:
    """``folder/base`` or ``folder/base.gz``, whichever exists first."""
    for path in (folder / base, folder / f"{base}.gz"):
        if path.is_file():
            return path
    return None


def torchvision_root(name: str, directory: Path, folder: Path, sources: dict[str, Path]) -> Path:
    """A root with ``<Class>/raw/<file>`` uncompressed and checked, built in the cache if needed."""
    tv_class = SPECS[name].tv_class
    if folder == directory / tv_class / "raw" and not any(p.suffix == ".gz" for p in sources.values()):
        for base, path in sources.items():
            check_idx(path, path, base, name)
        return directory
    stamp = repr(sorted((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sources.values()))
    root = cache_dir() / "torchvision" / f"{name}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
    raw = root / tv_class / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the cache folder {raw} ({exc}); set FEDSIM_CACHE_DIR to a writable folder"
        ) from exc
    for base, source in sources.items():
        target = raw / base
        if target.exists():
            try:
                check_idx(target, source, base, name)
                continue
            except DataError:
                target.unlink()  # a stale or damaged cache entry: rebuild it from the source once
        materialise(source, target, name)
        check_idx(target, source, base, name)
    return root


def materialise(source: Path, target: Path, name: str) -> None:
    """Decompress (``.gz``) or symlink ``source`` to ``target`` atomically (parallel processes)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        if source.suffix == ".gz":
            with gzip.open(source, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        else:
            os.symlink(source.resolve(), tmp)
        os.replace(tmp, target)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"{source} is not a valid gzip file or is truncated ({exc}); expected the original {source.name}. "
            f"{how_to_get(name)}"
        ) from exc
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"copying {source} to the cache {target} failed ({exc}); check that it is readable, "
            "or set FEDSIM_CACHE_DIR to a writable folder with free space"
        ) from exc


def check_idx(path: Path, source: Path, base: str, name: str) -> None:
    """``path`` is an uint8 IDX file with the expected count and shape; errors name ``source``."""
    n, dims = FILES[base]
    what = "images" if dims else "labels"
    nd = 1 + len(dims)
    header_len = 4 * (1 + nd)
    try:
        with open(path, "rb") as f:
            header = f.read(header_len)
    except OSError as exc:
        raise DataError(f"{source} cannot be read ({exc}). {how_to_get(name)}") from exc
    if len(header) < header_len:
        raise DataError(f"{source} is truncated: {len(header)} bytes, shorter than an IDX header. {how_to_get(name)}")
    magic, count, *shape = struct.unpack(f">{1 + nd}I", header)
    expected_magic = 0x0800 + nd  # uint8, nd dimensions
    if magic != expected_magic or tuple(shape) != dims:
        raise DataError(
            f"{source} is not an IDX file of {what} {dims}: magic {magic:#x}, shape {tuple(shape)} "
            f"(expected magic {expected_magic:#x}). {how_to_get(name)}"
        )
    if count != n:
        raise DataError(f"{source} holds {count} examples; expected {n}. {how_to_get(name)}")
    payload = os.path.getsize(path) - header_len
    if payload != n * math.prod(dims):
        raise DataError(
            f"{source} is truncated or padded: {payload} bytes of {what}, expected {n * math.prod(dims)}. "
            f"{how_to_get(name)}"
        )


def read_split(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's reader on a checked root: uint8 [n, 28, 28] images, int64 [n] labels."""
    from torchvision import datasets as tv_datasets

    cls = getattr(tv_datasets, SPECS[name].tv_class)
    try:
        ds = cls(root=str(root), train=train, download=False)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
        raise DataError(f"torchvision could not read {name} under {root} ({exc}). {how_to_get(name)}") from exc
    return ds.data, ds.targets
