"""A user's data in the formats this ecosystem already uses, as DatasetSplits.

- ``disk``: a Hugging Face dataset saved with ``save_to_disk`` (a ``DatasetDict`` with a
  ``train`` and optionally a ``test`` split, or one ``Dataset``): an image or array column,
  or several numeric columns, as the input (``image-column``, comma-separated for
  several; default ``image``), and a label column (``label-column``, default ``label``);
  any other column is kept for ``partitioning = "natural:<column>"``.
- ``imagefolder``: torchvision's ``ImageFolder`` layout, ``train/<class>/<image>`` and
  optionally ``test/<class>/<image>``; classes are the folder names, sorted.
- ``npz``: one ``.npz`` file (``data-dir`` names it, or a folder holding exactly one) with
  ``x_train``, ``y_train`` and optionally ``x_test``, ``y_test``; images ``[n, C, H, W]`` or
  ``[n, H, W]``, feature vectors ``[n, d]``.
- ``package.module:attr``: a loader of yours, called as ``attr()`` or ``attr(data_dir)``
  when it takes a parameter named ``data_dir``; it returns ``(x_train, y_train, x_test,
  y_test)`` (tensors or arrays) or ``(train, test)`` torch Datasets of ``(x, y)`` pairs.

Without a test split, a fixed 20% of the training examples (a permutation seeded with 0,
the same on every machine) is the test set. Inputs become float32: uint8 images are
divided by 255; ``normalize = "auto"`` then standardises them per channel (images) or per
feature (vectors) with the training set's mean and std, ``"none"`` leaves them. Labels
must be integers 0..K-1 (K = a ClassLabel's size, else the largest label + 1), or, for a
regression task with a loss of yours, numbers. Every problem is a DataError naming the
file or column and what was expected.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.config import parse_normalization
from fedsim.data.errors import DataError
from fedsim.data.splits import DatasetSplits

USER_FORMATS = ("disk", "imagefolder", "npz")
HOLDOUT_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Arrays:
    """Raw arrays of a user's data set, before conversion; ``test`` None: none given.
    ``columns``: extra per-example columns of the training split (for natural partitions);
    ``num_classes``: known from the data's own description (a ClassLabel), else None."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    source: str
    columns: dict[str, np.ndarray] | None = None
    num_classes: int | None = None
    channels_last: bool = False  # images decoded as [n, H, W, C] (PIL): moved to [n, C, H, W]


def read_disk(folder: Path, input_columns: list[str], label_column: str) -> Arrays:
    """A ``save_to_disk`` folder (module docstring)."""
    import datasets  # lazy: `datasets` takes seconds to import, and only this format needs it

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:
        raise DataError(f"{folder} is not a dataset saved with save_to_disk ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{folder}: the DatasetDict has splits {sorted(loaded)}, it needs a 'train' split (and optionally 'test')")
        train, test = loaded["train"], loaded.get("test")
    else:
        train, test = loaded, None
    x_train, y_train, columns, classes, image = _disk_columns(train, input_columns, label_column, f"{folder} (train)")
    x_test = y_test = None
    if test is not None:
        x_test, y_test, _, _, _ = _disk_columns(test, input_columns, label_column, f"{folder} (test)")
    return Arrays(x_train, y_train, x_test, y_test, str(folder), columns, classes, channels_last=image)


def _disk_columns(split: Any, inputs: list[str], label: str, where: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], int | None, bool]:
    """(inputs, labels, the other columns, ClassLabel size, whether the input is an image)."""
    import datasets  # lazy: as read_disk

    features = split.features
    missing = [c for c in [*inputs, label] if c not in features]
    if missing:
        raise DataError(f"{where}: no column {missing}; it has {sorted(features)} (set image-column / label-column)")
    table = split.with_format("numpy")[:]
    image = len(inputs) == 1 and isinstance(features[inputs[0]], datasets.Image)
    if len(inputs) == 1:
        x = _stacked(table[inputs[0]], f"{where} column {inputs[0]!r}")
    else:
        x = np.stack([_stacked(table[c], f"{where} column {c!r}") for c in inputs], axis=1)
        if x.ndim != 2:
            raise DataError(f"{where}: feature columns {inputs} must each hold one number per example, got shape {x.shape}")
    label_feature = features[label]
    classes = label_feature.num_classes if isinstance(label_feature, datasets.ClassLabel) else None
    others = {c: np.asarray(table[c]) for c in features if c not in (*inputs, label) and np.asarray(table[c]).ndim == 1}
    return x, np.asarray(table[label]), others, classes, image and x.ndim == 4


def _stacked(values: Any, where: str) -> np.ndarray:
    """A column as one array [n, ...]; DataError when its rows differ in shape."""
    arr = np.asarray(values)
    if arr.dtype == object:
        shapes = sorted({np.asarray(v).shape for v in values})
        raise DataError(f"{where}: examples differ in shape ({', '.join(map(str, shapes[:3]))}); give them one shape")
    return arr


def read_imagefolder(folder: Path) -> Arrays:
    """``train/<class>/...`` and optionally ``test/<class>/...`` (module docstring)."""
    train_dir = folder / "train"
    if not train_dir.is_dir():
        raise DataError(f"{folder} has no train/ folder; expected train/<class>/<image> (and optionally test/<class>/<image>)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir} holds no class folders; expected train/<class>/<image>")
    x_train, y_train = _read_images(train_dir, classes)
    x_test = y_test = None
    if (folder / "test").is_dir():
        extra = sorted(p.name for p in (folder / "test").iterdir() if p.is_dir() and p.name not in classes)
        if extra:
            raise DataError(f"{folder / 'test'} has class folders {extra} that train/ does not have")
        x_test, y_test = _read_images(folder / "test", classes)
    return Arrays(x_train, y_train, x_test, y_test, str(folder), None, len(classes), channels_last=True)


def _read_images(split_dir: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every image under ``split_dir/<class>/`` as uint8 [n, H, W, C], and its class index."""
    from PIL import Image, UnidentifiedImageError  # lazy: only this format reads image files

    images, labels, first = [], [], None
    for index, name in enumerate(classes):
        for path in sorted((split_dir / name).iterdir()) if (split_dir / name).is_dir() else []:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    arr = np.asarray(img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode))
            except (OSError, UnidentifiedImageError) as err:
                raise DataError(f"{path} cannot be read as an image ({err})") from None
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            if first is None:
                first = (path, arr.shape)
            elif arr.shape != first[1]:
                raise DataError(f"{path} is {arr.shape[1]}x{arr.shape[0]}x{arr.shape[2]} but {first[0]} is "
                                f"{first[1][1]}x{first[1][0]}x{first[1][2]}; give every image one size and mode")
            images.append(arr)
            labels.append(index)
    if not images:
        raise DataError(f"{split_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def read_npz(path: Path) -> Arrays:
    """An ``.npz`` file, or the one ``.npz`` in a folder (module docstring)."""
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if len(files) != 1:
            raise DataError(f"{path} holds {len(files)} .npz files; set data-dir to the one to read")
        path = files[0]
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{path} cannot be read as an .npz file ({err})") from None
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing or (("x_test" in arrays) != ("y_test" in arrays)):
        raise DataError(f"{path} holds {sorted(arrays)}; it needs x_train, y_train (and optionally both x_test, y_test)")
    return Arrays(arrays["x_train"], arrays["y_train"], arrays.get("x_test"), arrays.get("y_test"), str(path))


def read_user_loader(loader: Any, path: str, data_dir: str) -> Arrays:
    """What a user's loader returns (module docstring), as arrays."""
    try:
        takes_dir = "data_dir" in inspect.signature(loader).parameters
    except (TypeError, ValueError):
        takes_dir = False
    try:
        out = loader(data_dir=data_dir) if takes_dir else loader()
    except Exception as err:
        raise DataError(f"dataset={path!r}: the loader raised {type(err).__name__}: {err}") from None
    if isinstance(out, (tuple, list)) and len(out) == 4:
        x_train, y_train, x_test, y_test = (_as_array(a, f"dataset={path!r} item {i}") for i, a in enumerate(out))
        return Arrays(x_train, y_train, x_test, y_test, source=path)
    if isinstance(out, (tuple, list)) and len(out) == 2:
        (xa, ya), (xb, yb) = (_from_dataset(d, f"dataset={path!r} {name}") for d, name in zip(out, ("train", "test"), strict=True))
        return Arrays(xa, ya, xb, yb, path)
    raise DataError(f"dataset={path!r} returned a {type(out).__name__}; return (x_train, y_train, x_test, y_test) or (train, test) Datasets")


def _as_array(value: Any, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as err:
        raise DataError(f"{where} is a {type(value).__name__} that is not an array ({err})") from None


def _from_dataset(dataset: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A torch Dataset of (x, y) pairs as two stacked arrays."""
    try:
        pairs = [dataset[i] for i in range(len(dataset))]
        xs = np.stack([_as_array(x, where) for x, _ in pairs])
        ys = np.asarray([_as_array(y, where) for _, y in pairs])
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{where}: reading it as (x, y) pairs failed: {type(err).__name__}: {err}") from None
    return xs, ys


def to_splits(name: str, raw: Arrays, normalize: str, user_loss: bool, holdout: float | None = HOLDOUT_FRACTION) -> DatasetSplits:
    """DatasetSplits of ``raw`` (module docstring); its ``info`` says what was done: the
    source, how the test set was made, the input shape, the normalisation's mean and std.
    Without a test split, ``holdout`` of the training examples becomes one (None: none is
    made, the test set is empty: a device that does not evaluate trains on everything)."""
    x_train, y_train, x_test, y_test = raw.x_train, raw.y_train, raw.x_test, raw.y_test
    facts: dict[str, Any] = {"source": raw.source, "test": "given"}
    columns = raw.columns
    if (x_test is None or y_test is None) and holdout is None:
        x_test, y_test = x_train[:0], y_train[:0]
        facts["test"] = "none"
    elif x_test is None or y_test is None:
        assert holdout is not None  # the branch above took None
        order = np.random.default_rng(0).permutation(len(x_train))
        cut = len(order) - max(1, math.ceil(holdout * len(order)))
        train_idx, test_idx = np.sort(order[:cut]), np.sort(order[cut:])
        x_train, y_train, x_test, y_test = x_train[train_idx], y_train[train_idx], x_train[test_idx], y_train[test_idx]
        columns = {k: v[train_idx] for k, v in (columns or {}).items()}
        facts["test"] = f"held out {len(test_idx)} of {len(order)} training examples (fixed permutation, seed 0)"
    xs = [_inputs(x, raw.channels_last, f"{raw.source} ({split})", allow_empty=split == "test") for x, split in ((x_train, "train"), (x_test, "test"))]
    if len(xs[1]) and xs[0].shape[1:] != xs[1].shape[1:]:
        raise DataError(f"{raw.source}: train examples have shape {xs[0].shape[1:]} but test examples {xs[1].shape[1:]}")
    if not len(xs[1]):
        xs[1] = xs[1].reshape(0, *xs[0].shape[1:])
    mean, std = _normalization(normalize, xs[0], raw.source)
    if mean is not None and std is not None:
        xs = [(x - mean) / std for x in xs]
        facts["normalization"] = {"mean": mean.reshape(-1).tolist()[:64], "std": std.reshape(-1).tolist()[:64]}
    regression = user_loss and not np.issubdtype(np.asarray(y_train).dtype, np.integer) and raw.num_classes is None
    ys, num_classes = _labels(y_train, y_test, raw, regression)
    facts["task"] = "regression" if regression else "classification"
    facts["input_shape"] = list(xs[0].shape[1:])
    return DatasetSplits(name, torch.from_numpy(xs[0]), torch.from_numpy(ys[0]), torch.from_numpy(xs[1]), torch.from_numpy(ys[1]),
                         num_classes, columns=columns or None, info=facts)


def _normalization(normalize: str, x: np.ndarray, where: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The mean and std to standardise with: the training set's ("auto"), given ("MEAN/STD",
    one value per channel of images or per feature of vectors, or one for all), or none."""
    if normalize == "none":
        return None, None
    if normalize == "auto":
        return _moments(x)
    given = parse_normalization(normalize)  # checked by the run config
    assert given is not None  # "auto" and "none" returned above
    mean, std = given
    width = x.shape[1] if x.ndim in (2, 4) else 1
    if len(mean) not in (1, width):
        raise DataError(f"{where}: normalize={normalize!r} gives {len(mean)} values, the data has {width} channels or features")
    shape = (-1, 1, 1) if x.ndim == 4 else (-1,) if x.ndim == 2 else ()
    return np.asarray(mean, np.float32).reshape(shape), np.asarray(std, np.float32).reshape(shape)


def _inputs(x: np.ndarray, channels_last: bool, where: str, allow_empty: bool = False) -> np.ndarray:
    """float32 inputs [n, ...]: uint8 scaled to [0, 1], [n, H, W] images given a channel,
    decoded [n, H, W, C] images moved to [n, C, H, W]."""
    if x.ndim < 2 or (x.shape[0] == 0 and not allow_empty):
        raise DataError(f"{where}: inputs have shape {x.shape}; expected [examples, ...] with at least one example")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{where}: inputs have dtype {x.dtype}; expected numbers")
    scaled = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if channels_last and scaled.ndim == 4:
        scaled = np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))
    elif scaled.ndim == 3 and x.dtype == np.uint8:
        scaled = scaled[:, None]
    if not np.isfinite(scaled).all():
        raise DataError(f"{where}: inputs hold NaN or infinite values")
    return np.ascontiguousarray(scaled)


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the training inputs per channel (images [n, C, H, W]) or per
    feature (anything else), shaped to broadcast; a constant feature gets std 1."""
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x.std(axis=axes, keepdims=True, dtype=np.float64)
    std[std == 0] = 1.0
    return mean.astype(np.float32)[0], std.astype(np.float32)[0]


def _labels(y_train: np.ndarray, y_test: np.ndarray, raw: Arrays, regression: bool) -> tuple[list[np.ndarray], int]:
    """Labels as int64 0..K-1 and K (classification), or float32 targets and their width."""
    ys = [np.asarray(y) for y in (y_train, y_test)]
    for y, split in zip(ys, ("train", "test"), strict=True):
        if y.shape[:1] != (len(y),) or (y.size == 0 and split == "train"):
            raise DataError(f"{raw.source} ({split}): no labels, or labels of shape {y.shape}")
    if regression:
        out = [y.astype(np.float32).reshape(len(y), -1) if y.ndim > 1 else y.astype(np.float32) for y in ys]
        return out, 1 if out[0].ndim == 1 else int(out[0].shape[1])
    integral = all(np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)) for y in ys)
    if not integral or any(y.ndim != 1 for y in ys):
        raise DataError(f"{raw.source}: labels must be integers 0..K-1 (class ids), got dtype {ys[0].dtype} shape {ys[0].shape}; "
                        "for a regression target set a loss of yours (loss = 'package.module:fn')")
    low = min(int(y.min()) for y in ys if y.size)
    high = max(int(y.max()) for y in ys if y.size)
    k = raw.num_classes if raw.num_classes is not None else high + 1
    if low < 0 or high >= k:
        raise DataError(f"{raw.source}: labels run {low}..{high}, but class ids must be 0..{k - 1}; renumber them 0..K-1")
    return [y.astype(np.int64) for y in ys], k
