"""The papers' datasets as normalised tensors, loaded once per process.

``load_dataset(name, data_dir)`` returns a DatasetSplits for "digits" (scikit-learn, bundled),
"mnist", "fashion-mnist" (the four original IDX files, read by torchvision) and "cifar10"
(the python pickle batches); ``augment_batch`` is CIFAR's crop + flip on a device batch.
Every user-facing loading problem raises DataError.
"""

from fedsim.data.augment import augment_batch, center_crop
from fedsim.data.errors import DataError
from fedsim.data.load import DATASETS, load_dataset
from fedsim.data.splits import DatasetSplits

__all__ = ["DATASETS", "DataError", "DatasetSplits", "augment_batch", "center_crop", "load_dataset"]
