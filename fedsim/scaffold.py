"""``fedsim new <dir>``: a Flower app that uses fedsim, as ``flwr new`` writes Flower's
templates (which it downloads: no internet here). The app's components are fedsim's
ServerApp and ClientApp; its ``task.py`` holds a model (``Net``) and a data loader
(``load_data``) of the user's, named in its run config. It runs with ``flwr run .`` where
fedsim is installed, and with ``fedsim run <dir>``.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedsim.errors import ConfigError

PYPROJECT = '''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "A federated-learning app on fedsim"
dependencies = ["fedsim"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "{name}"

[tool.flwr.app.components]
serverapp = "fedsim.server_app:app"
clientapp = "fedsim.client_app:app"

# fedsim's run config (every key: fedsim's README, "Run-config keys"). Flower passes an app
# only the keys it declares here: declare any key you want to set with --run-config.
[tool.flwr.app.config]
strategy = "fedavg"
dataset = "task:load_data"
model = "task:Net"
num-nodes = 10
partitioning = "iid"
fraction-train = 1.0
local-epochs = 1
batch-size = 10
lr = 0.1
num-server-rounds = 10
eval-every = 1
eval-fraction = 0.0
seed = 0
results-dir = ""
# for a run on the devices' own data (dataset = "disk" and each SuperNode's
# --node-config "dataset-path=..."): the classes and input shape the server cannot read
num-classes = 0
input-shape = ""
normalize = "auto"
'''

TASK = '''"""The model and the data of this app (fedsim reads them as ``model = "task:Net"`` and
``dataset = "task:load_data"``). Replace them with your own."""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


class Net(nn.Module):
    """8x8 digit images -> 10 classes (a zero-argument constructor, as in Flower's templates)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.layers(x)


def load_data():
    """(x_train, y_train, x_test, y_test): scikit-learn's bundled digits (no download), as
    uint8 images [n, 8, 8]; fedsim scales and standardises them, and splits the training
    set over the clients as the run config's ``partitioning`` says."""
    digits = load_digits()
    x = (digits.images * 15).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.2, stratify=digits.target, random_state=0)
    return x_train, y_train, x_test, y_test
'''

README = '''# {name}

A federated-learning app on [fedsim](https://github.com/) (Flower's runtime, fedsim's
algorithms): `task.py` holds the model (`Net`) and the data (`load_data`);
`pyproject.toml`'s `[tool.flwr.app.config]` chooses the strategy (`fedavg`, `fedsgd`,
`sign-mv`, `llr-vote`, `ef-sign`, `sign-fd`) and the rest.

```bash
pip install fedsim                                   # or: pip install -e /path/to/fedsim
FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . --stream \\
  --federation-config "num-supernodes=10 client-resources-num-cpus=1"
fedsim run .                                         # the same app on fedsim's in-process engine
```

Change a setting with `--run-config "strategy='llr-vote' lr=0.01"` (a key must be declared
in `[tool.flwr.app.config]` for Flower to pass it).
'''


def new_app(folder: str | Path) -> Path:
    """Write the app into ``folder`` (new, or empty); its name is the folder's name.
    ConfigError if the folder holds files or the name is not a valid project name."""
    path = Path(folder)
    name = path.resolve().name
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise ConfigError(f"fedsim new {folder}: {name!r} is not a project name (letters, digits, - and _, starting with a letter)")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"fedsim new {folder}: {path} exists and is not an empty folder; choose a new one")
    path.mkdir(parents=True, exist_ok=True)
    (path / "pyproject.toml").write_text(PYPROJECT.format(name=name))
    (path / "task.py").write_text(TASK)
    (path / "README.md").write_text(README.format(name=name))
    return path
