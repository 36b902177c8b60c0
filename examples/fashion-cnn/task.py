"""Fashion-MNIST as a federated image task: the data as a Hugging Face ``save_to_disk``
folder (written by prepare_data.py from the original files), a small CNN of our own,
FedAvg across 10 clients with Dirichlet(0.5) label skew, and federated evaluation (each
client tests the global model on 20% of its own images).

fedsim reads ``model = "task:Net"`` from pyproject.toml's run config; the data is
``dataset = "disk"`` with ``data-dir`` the folder.
"""

from torch import nn


class Net(nn.Module):
    """1x28x28 -> conv5x5(16) -> pool -> conv5x5(32) -> pool -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))
