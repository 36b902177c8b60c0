"""Run config: pyproject defaults = RunConfig defaults, validation messages, batch sizes."""

import tomllib
from pathlib import Path

import pytest

from fedsim.config import ConfigError, RunConfig
from fedsim.partitions.batch_sizes import batch_mode_sizes, client_batch_sizes, num_small_clients, parse_batch_sizes
from fedsim.validation import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_are_the_runconfig_defaults():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == load_config({}).to_mapping()
    assert load_config(app_config) == load_config({})
    assert {k: v for k, v in app_config.items() if k in RunConfig().to_mapping()} == RunConfig().to_mapping()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"strategy": "fedprox"}, "strategy='fedprox'"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"batch-mode": 7}, "batch-mode=7"),
        ({"no-such-key": 1}, "unknown run-config key"),
        ({"num-server-rounds": "ten"}, "expected int"),
        ({"dataset": "imagenet"}, "dataset='imagenet'"),
        ({"batch-mode": 2, "batch-sizes": "4,4"}, "not both"),
    ],
)
def test_bad_config_names_the_problem(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(values)


def test_model_auto_follows_dataset():
    from fedsim.data.load import DATASETS

    assert DATASETS["mnist"].default_model == "mnist-cnn"
    assert load_config({"model": "mnist-2nn"}).model == "mnist-2nn"


def test_batch_modes_match_the_paper_at_m15():
    for mode, small, large in [(1, 0, 64), (2, 9, 154), (3, 12, 304), (4, 14, 904)]:
        sizes = batch_mode_sizes(mode, 15, seed=0)
        assert sizes.count(4) == small and sum(sizes) == 960
        assert all(b == large for b in sizes if b != 4 or mode == 1)


@pytest.mark.parametrize("m", [2, 5, 10, 16, 31, 100])
@pytest.mark.parametrize("mode", [1, 2, 3, 4])
def test_batch_modes_generalise(m, mode):
    sizes = batch_mode_sizes(mode, m, seed=3)
    assert len(sizes) == m and sum(sizes) == 64 * m
    assert sizes.count(4) == num_small_clients(mode, m) or mode == 1
    assert max(sizes) - min(b for b in sizes if b != 4 or mode == 1) <= 1  # large ones differ by <= 1


def test_small_clients_are_chosen_by_seed():
    a, b, c = (batch_mode_sizes(2, 15, seed=s) for s in (0, 0, 1))
    assert a == b and a != c


def test_explicit_batch_sizes():
    assert client_batch_sizes(10, "4, 4,64", 0, 3, 0) == [4, 4, 64]
    assert client_batch_sizes(10, "", 0, 3, 0) == [10, 10, 10]
    with pytest.raises(ValueError, match="one per client"):
        parse_batch_sizes("4,4", 3)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_batch_sizes("4;4;4", 3)


def test_input_transforms_by_model_and_dataset():
    import torch

    from fedsim.data.load import DATASETS
    from fedsim.models import MODELS
    from fedsim.plan import input_transforms as transforms

    def input_transforms(dataset, shape, model):
        return transforms(DATASETS[dataset], shape, MODELS[model])

    train, evaluate = input_transforms("cifar10", (3, 32, 32), "cifar-cnn")
    x = torch.zeros(5, 3, 32, 32)
    assert train(x, torch.Generator().manual_seed(0)).shape == (5, 3, 24, 24)
    assert evaluate(x).shape == (5, 3, 24, 24)
    train, evaluate = input_transforms("cifar10", (3, 32, 32), "resnet20")
    assert train is not None and evaluate is None
    assert input_transforms("mnist", (1, 28, 28), "mnist-cnn") == (None, None)
    with pytest.raises(ConfigError, match="takes 1x28x28 inputs but dataset 'cifar10' has 3x32x32"):
        input_transforms("cifar10", (3, 32, 32), "mnist-cnn")
