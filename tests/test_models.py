"""fedsim.models: exact parameter counts, shapes, seeded init, errors, gradients."""

import pytest
import torch
from torch import nn

from fedsim.models import MODELS, build_model, count_parameters

PARAMETER_COUNTS = {
    "digits-logreg": 650,
    "digits-mlp": 4_810,
    "mnist-logreg": 7_850,
    "mnist-2nn": 199_210,
    "mnist-cnn": 1_663_370,
    "fv-mnist-cnn": 582_026,
    "cifar-cnn": 1_068_298,
    "resnet20": 269_722,
    "resnet56": 853_018,
}


def test_registry_is_complete():
    assert set(MODELS) == set(PARAMETER_COUNTS)
    assert all(e.name == name and e.input_shape is not None for name, e in MODELS.items())


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_exact_parameter_count(name):
    assert count_parameters(build_model(name)) == PARAMETER_COUNTS[name]


def test_count_parameters_skips_frozen_and_buffers():
    model = build_model("resnet20")
    model.fc.weight.requires_grad_(False)
    assert count_parameters(model) == PARAMETER_COUNTS["resnet20"] - 64 * 10


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_gives_logits_and_gradients_flow(name):
    model = build_model(name, seed=0)
    x = torch.randn(3, *MODELS[name].input_shape, generator=torch.Generator().manual_seed(1))
    logits = model(x)
    assert logits.shape == (3, 10) and logits.dtype == torch.float32
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["mnist-cnn", "resnet20"])
def test_num_classes_sets_the_output_width(name):
    model = build_model(name, num_classes=62)
    assert model(torch.zeros(2, *MODELS[name].input_shape)).shape == (2, 62)


@pytest.mark.parametrize("name", ["digits-mlp", "cifar-cnn", "resnet20"])
def test_seeded_build_is_deterministic_and_leaves_global_rng_alone(name):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model(name, seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(5)
    b = build_model(name, seed=7).state_dict()
    c = build_model(name, seed=8).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unseeded_builds_differ():
    a, b = build_model("digits-mlp").state_dict(), build_model("digits-mlp").state_dict()
    assert not torch.equal(a["1.weight"], b["1.weight"])


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet18'") as err:
        build_model("resnet18")
    assert all(name in str(err.value) for name in MODELS)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("digits-mlp", num_classes=0)


def test_resnet_shortcuts_are_parameter_free():
    model = build_model("resnet20")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(m.bias is None and m.kernel_size == (3, 3) for m in convs)
    assert len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) == 19
