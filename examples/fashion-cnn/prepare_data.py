"""Write Fashion-MNIST's original files as a Hugging Face ``save_to_disk`` folder.

    python prepare_data.py /path/to/fashion_mnist data/fashion-mnist [--train N --test M]

The source folder holds the four files of the distribution (train-images-idx3-ubyte.gz,
train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz); the
result is a DatasetDict with ``train`` and ``test`` splits of ``image`` (PNG) and
``label`` (ClassLabel) columns, the layout of Flower's own Fashion-MNIST examples.
``--train``/``--test`` keep the first N / M examples (for a quick try).
"""

import argparse
import gzip
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as a numpy array: magic 0x0000080N, N dimensions, big-endian sizes."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def split(source: Path, prefix: str, limit: int | None) -> Dataset:
    images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")[:limit]
    labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")[:limit]
    features = Features({"image": Image(), "label": ClassLabel(names=CLASSES)})
    return Dataset.from_dict({"image": list(images), "label": labels.astype(np.int64)}, features=features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="folder with the four original .gz files")
    parser.add_argument("dest", type=Path, help="where the save_to_disk folder goes")
    parser.add_argument("--train", type=int, default=None, help="keep the first N training images")
    parser.add_argument("--test", type=int, default=None, help="keep the first M test images")
    args = parser.parse_args()
    DatasetDict({"train": split(args.source, "train", args.train), "test": split(args.source, "t10k", args.test)}).save_to_disk(str(args.dest))
    print(f"wrote {args.dest}")


if __name__ == "__main__":
    main()
