"""Breast-cancer diagnosis as a federated task: scikit-learn's bundled Wisconsin data set
(569 patients, 30 numeric features, benign / malignant; no download), a small MLP of our
own, and fedsim's LLR-weighted sign vote across 5 hospitals.

fedsim reads two things from here, named in pyproject.toml's run config:
``dataset = "task:load_data"`` and ``model = "task:Net"``.
"""

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn


class Net(nn.Module):
    """30 features -> 32 -> 2 classes (a zero-argument constructor, as in Flower's templates)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x):
        return self.layers(x)


def load_data():
    """(x_train, y_train, x_test, y_test): a fixed, stratified 75/25 split of the 569
    patients (fedsim standardises the features with the training set's mean and std)."""
    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data.astype(np.float32), data.target, test_size=0.25, stratify=data.target, random_state=0
    )
    return x_train, y_train, x_test, y_test
