"""scikit-learn's bundled 8x8 digits: the embedded, offline default."""

from __future__ import annotations

import torch

from fedsim.data.splits import DatasetSplits

TEST_FRACTION = 0.2
RANDOM_STATE = 0


def load_digits_splits() -> DatasetSplits:
    """1,797 digits as [n, 1, 8, 8] in [0, 1] (pixel / 16), 10 classes.

    Stratified split by ``train_test_split(test_size=0.2, stratify=y, random_state=0)``:
    1,437 train / 360 test, the same in every process and on every machine.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=TEST_FRACTION, stratify=bunch.target, random_state=RANDOM_STATE
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return DatasetSplits(
        "digits", x[idx_train].contiguous(), y[idx_train], x[idx_test].contiguous(), y[idx_test], num_classes=10
    )
