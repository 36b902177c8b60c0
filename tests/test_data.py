"""fedsim.data: digits, real MNIST/Fashion-MNIST from shared/data, synthetic CIFAR batches, errors, augmentation."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import shutil
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.data import DATASETS, DataError, DatasetSplits, augment_batch, load_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
needs_shared = pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason=f"real data not found at {SHARED}")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Decompressed IDX copies go to a temporary cache, never to ~/.cache; no ambient data dir."""
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fedsim-cache"))
    monkeypatch.delenv("FEDSIM_DATA_DIR", raising=False)


# --- digits -------------------------------------------------------------------------------------


def test_digits_shapes_split_and_range():
    d = load_dataset("digits")
    assert d.name == "digits" and d.num_classes == 10 and d.input_shape == (1, 8, 8)
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    assert set(d.y_train.tolist()) == set(d.y_test.tolist()) == set(range(10))
    assert d.y_test.bincount().min() >= 35  # stratified: every class ~36 times in the test set
    assert load_dataset("digits") is d and "1437" in repr(d) and len(repr(d)) < 200


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(DataError, match=r"imagenet.*digits, mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet")
    assert tuple(DATASETS) == ("digits", "mnist", "fashion-mnist", "cifar10")


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope")) + ".*does not exist"):
        load_dataset("mnist", tmp_path / "nope")


# --- real MNIST / Fashion-MNIST -------------------------------------------------------------------


@pytest.fixture(scope="module")
def idx_sets(tmp_path_factory) -> dict[str, DatasetSplits]:
    """Both real sets, loaded once for the module (a few seconds with torchvision's import)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSIM_CACHE_DIR", str(tmp_path_factory.mktemp("idx-cache")))
        return {
            "mnist": load_dataset("mnist", SHARED / "mnist"),
            "fashion-mnist": load_dataset("fashion-mnist", str(SHARED / "fashion_mnist")),
        }


@needs_shared
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_idx_sets(idx_sets, name):
    d = idx_sets[name]
    assert d.name == name and d.num_classes == 10 and d.input_shape == (1, 28, 28)
    assert d.x_train.shape == (60_000, 1, 28, 28) and d.x_test.shape == (10_000, 1, 28, 28)
    assert d.x_train.dtype == d.x_test.dtype == torch.float32
    assert d.y_train.dtype == d.y_test.dtype == torch.int64
    train_hist, test_hist = d.y_train.bincount(minlength=10), d.y_test.bincount(minlength=10)
    assert len(train_hist) == len(test_hist) == 10
    assert int(train_hist.min()) > 5_000 and int(train_hist.max()) < 7_000
    assert int(test_hist.min()) > 800 and int(test_hist.max()) < 1_200
    assert abs(float(d.x_train.mean())) < 0.01 and abs(float(d.x_train.std()) - 1.0) < 0.01


@needs_shared
def test_second_call_is_the_cached_object(idx_sets, monkeypatch):
    d = idx_sets["mnist"]
    assert load_dataset("mnist", SHARED / "mnist") is d
    assert load_dataset("MNIST", str(SHARED / "mnist") + os.sep) is d  # same resolved arguments
    monkeypatch.setenv("FEDSIM_DATA_DIR", str(SHARED))  # $FEDSIM_DATA_DIR/<name>, "_" for "-"
    assert load_dataset("fashion-mnist") is idx_sets["fashion-mnist"]


def _idx_dir(tmp_path: Path, skip: str = "") -> Path:
    """A folder with symlinks to the real MNIST files, ``skip`` left out."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    for base in IDX_FILES:
        if base != skip:
            (folder / f"{base}.gz").symlink_to(SHARED / "mnist" / f"{base}.gz")
    return folder


@needs_shared
@pytest.mark.parametrize("bad", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_truncated_gzip_is_named(tmp_path, bad):
    folder = _idx_dir(tmp_path, skip=bad)
    original = (SHARED / "mnist" / f"{bad}.gz").read_bytes()
    (folder / f"{bad}.gz").write_bytes(original[: len(original) // 2])
    with pytest.raises(DataError, match=re.escape(str(folder / f"{bad}.gz")) + ".*truncated.*Download"):
        load_dataset("mnist", folder)


@needs_shared
def test_missing_file_is_named(tmp_path):
    folder = _idx_dir(tmp_path, skip="t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match=r"missing file .*t10k-labels-idx1-ubyte\.gz.*ossci-datasets"):
        load_dataset("mnist", folder)


@needs_shared
def test_wrong_number_of_examples_is_named(tmp_path):
    folder = _idx_dir(tmp_path, skip="train-labels-idx1-ubyte")
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, 5) + bytes(5))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz holds 5 examples; expected 60000"):
        load_dataset("mnist", folder)


def test_folder_without_the_files_says_what_is_expected(tmp_path):
    with pytest.raises(DataError, match=r"holds none of the fashion-mnist files.*FashionMNIST/raw"):
        load_dataset("fashion-mnist", tmp_path)


@needs_shared
@pytest.mark.parametrize("compressed", [True, False])
def test_torchvision_layout_is_accepted(idx_sets, tmp_path, monkeypatch, compressed):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for base in IDX_FILES:
        if compressed:
            (raw / f"{base}.gz").symlink_to(SHARED / "mnist" / f"{base}.gz")
        else:
            with gzip.open(SHARED / "mnist" / f"{base}.gz") as fin, open(raw / base, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    before = sorted(raw.iterdir())
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "cache"))
    d = load_dataset("mnist", tmp_path / "data")
    assert d.x_train.equal(idx_sets["mnist"].x_train) and d.y_test.equal(idx_sets["mnist"].y_test)
    assert sorted(raw.iterdir()) == before  # the data folder is only read
    assert (tmp_path / "cache").exists() == compressed  # plain files are read in place


# --- offline hub --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_offline_hub_fails_fast(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError, match=rf"no local copy of {name} was given.*data-dir="):
        load_dataset(name)
    assert time.monotonic() - start < 20


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(DataError, match=r"hub is unreachable.*Download .*train-images-idx3-ubyte\.gz.*data-dir="):
        load_dataset("fashion-mnist", "")
    assert time.monotonic() - start < 20


def test_hub_split_conversion():
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from fedsim.data.hub import hub_split_arrays

    images = [Image.fromarray(np.full((32, 32, 3), i, dtype=np.uint8)) for i in range(3)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    x, y = hub_split_arrays(datasets.Dataset.from_dict({"img": images, "label": [7, 0, 2]}, features=features))
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.uint8 and int(x[2, 5, 5, 1]) == 2
    assert y.tolist() == [7, 0, 2] and y.dtype == np.int64


# --- CIFAR-10 (synthetic batches in the original format) -------------------------------------------


def _write_cifar(folder: Path, n_train: int = 4, n_test: int = 3, seed: int = 0) -> dict[str, dict]:
    """data_batch_1..5 and test_batch as the original pickles (protocol 2, bytes keys)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else n_train
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{j}.png".encode() for j in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2 if i % 2 == 0 else pickle.HIGHEST_PROTOCOL))
        batches[name] = batch
    return batches


def test_cifar_extracted_folder(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    d = load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10
    assert d.x_train.dtype == torch.float32 and d.y_test.dtype == torch.int64
    assert d.y_train.tolist() == [label for k in range(1, 6) for label in batches[f"data_batch_{k}"][b"labels"]]
    raw = batches["test_batch"][b"data"][1]  # 1024 red, 1024 green, 1024 blue, row-major
    green_5_7 = int(raw[1024 + 5 * 32 + 7])
    assert float(d.x_test[1, 1, 5, 7]) == pytest.approx((green_5_7 / 255 - 0.4822) / 0.2435, abs=1e-5)
    assert load_dataset("cifar10", tmp_path / "cifar-10-batches-py").x_train.equal(d.x_train)  # the folder itself


def test_cifar_tar_gz_equals_folder(tmp_path):
    _write_cifar(tmp_path / "x" / "cifar-10-batches-py")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "x" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_tar, from_folder = load_dataset("cifar10", tmp_path), load_dataset("cifar10", tmp_path / "x")
    assert from_tar.x_train.equal(from_folder.x_train) and from_tar.y_train.equal(from_folder.y_train)
    assert from_tar.x_test.equal(from_folder.x_test) and from_tar.y_test.equal(from_folder.y_test)

    truncated = tmp_path / "t" / "cifar-10-python.tar.gz"
    truncated.parent.mkdir()
    data = (tmp_path / "cifar-10-python.tar.gz").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(str(truncated)) + ".*truncated"):
        load_dataset("cifar10", truncated.parent)


@pytest.mark.parametrize(
    "change, message",
    [
        ({b"labels": [1, 2]}, r"2 labels for 4 images"),
        ({b"data": np.zeros((4, 3072), dtype=np.float32)}, r"data is float32"),
        ({b"data": np.zeros((4, 1024), dtype=np.uint8)}, r"expected a pickled dict"),
        ({b"labels": [0, 1, 2, 10]}, r"labels 0\.\.10"),
        ({b"data": None}, r"has keys"),
    ],
)
def test_cifar_malformed_batch_is_named(tmp_path, change, message):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    batch = {**batches["data_batch_3"], **change}
    batch = {k: v for k, v in batch.items() if v is not None}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3.*" + message):
        load_dataset("cifar10", tmp_path)


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    evil = pickle.dumps({b"data": shutil.rmtree, b"labels": []})  # would resolve a function on load
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(evil)
    with pytest.raises(DataError, match=r"test_batch is not a readable CIFAR-10 batch .*refusing .*shutil\.rmtree"):
        load_dataset("cifar10", tmp_path)


def test_cifar_missing_batch_and_empty_folder(tmp_path):
    _write_cifar(tmp_path / "a" / "cifar-10-batches-py")
    (tmp_path / "a" / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(DataError, match=r"data_batch_5 is missing"):
        load_dataset("cifar10", tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"neither cifar-10-batches-py/ nor cifar-10-python\.tar\.gz.*c58f3010"):
        load_dataset("cifar10", tmp_path / "b")


# --- augmentation ---------------------------------------------------------------------------------


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_augment_keeps_shape_and_is_deterministic():
    x = _batch()
    a = augment_batch(x, torch.Generator().manual_seed(7))
    b = augment_batch(x, torch.Generator().manual_seed(7))
    c = augment_batch(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.equal(b) and not a.equal(c)


def test_augment_identity_without_pad_or_flip():
    x = _batch()
    assert augment_batch(x, torch.Generator().manual_seed(0), pad=0, flip=False).equal(x)


def test_augment_is_a_crop_of_the_padded_image_or_its_mirror():
    x, pad = _batch(), 4
    out = augment_batch(x, torch.Generator().manual_seed(3), pad=pad)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    flips = 0
    for i in range(len(x)):  # brute force: exactly one offset/flip reproduces each image
        matches = [
            (dy, dx, f)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for f in (False, True)
            if out[i].equal((lambda crop: crop.flip(-1) if f else crop)(padded[i, :, dy : dy + 32, dx : dx + 32]))
        ]
        assert len(matches) == 1
        flips += matches[0][2]
    assert 0 < flips < len(x)
    mirrored = augment_batch(x, torch.Generator().manual_seed(3), pad=0)
    assert all(m.equal(xi) or m.equal(xi.flip(-1)) for m, xi in zip(mirrored, x, strict=True))


def test_augment_crop_to_smaller_size_and_center_crop():
    from fedsim.data import center_crop

    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, g, pad=0, flip=False, size=24)
    assert out.shape == (2, 3, 24, 24)
    # each output is a contiguous 24x24 window of its own image
    for i in range(2):
        top, left = divmod(int(out[i, 0, 0, 0].item() - x[i, 0, 0, 0].item()), 32)
        assert torch.equal(out[i], x[i, :, top : top + 24, left : left + 24])
    assert torch.equal(center_crop(x, 24), x[..., 4:28, 4:28])
    with pytest.raises(ValueError, match="does not fit"):
        augment_batch(x, g, pad=0, size=40)
