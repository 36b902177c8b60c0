"""Byzantine-robust aggregators (issue #24, item 1): each rule against Flower's own legacy
functions, their properties (client order, bounded influence, translation), and the
run-config keys through FedSGD and FedAvg, the checks before a run and in a round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate, aggregate_bulyan, aggregate_krum, aggregate_median, aggregate_trimmed_avg
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.aggregators import AGGREGATORS, Settings
from fedsim.aggregators.krum import krum_scores, squared_distances

ROBUST = ("median", "trimmed-mean", "krum", "multi-krum", "bulyan")


def clients(seed: int, n: int, d: int, outliers: int = 0, scale: float = 1e6) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """n client vectors of d coordinates (standard normal), ``outliers`` of them (at random
    rows) replaced by values of magnitude ~``scale``; their weights (num-examples); the
    outlier rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    bad = sorted(rng.choice(n, size=outliers, replace=False).tolist()) if outliers else []
    x[bad] = scale * (1 + rng.random((len(bad), d))) * rng.choice([-1.0, 1.0], size=(len(bad), d))
    weights = rng.integers(1, 100, size=n).astype(np.float64)
    return x, weights, bad


def ours(name: str, x: np.ndarray, w: np.ndarray, **kw: float) -> np.ndarray:
    out = AGGREGATORS[name].apply(torch.from_numpy(x), w.tolist(), Settings(**kw))
    assert out.dtype == torch.float64 and out.shape == (x.shape[1],)
    return out.numpy()


def flower_results(x: np.ndarray, w: np.ndarray, layers: int = 2) -> list[tuple[list[np.ndarray], int]]:
    """Flower's input: per client its arrays (x split into ``layers`` arrays) and num-examples,
    the clients in lexicographic order of their vectors: Flower breaks an exact tie of Krum
    scores by list position, fedsim by the vectors' values, and so they then agree."""
    order = sorted(range(len(x)), key=lambda i: (x[i].tolist(), w[i]))
    return [(np.array_split(x[i], layers), int(w[i])) for i in order]


def flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.reshape(-1) for a in arrays])


# --- agreement with Flower's legacy aggregate functions ------------------------------------

CASES = [(seed, n, f, outliers) for seed, (n, f) in enumerate([(7, 1), (8, 1), (11, 2), (12, 2), (15, 3)]) for outliers in (0, f)]


@pytest.mark.parametrize("seed, n, f, outliers", CASES)
def test_mean_median_and_trimmed_mean_agree_with_flower(seed, n, f, outliers):
    x, w, _ = clients(seed, n, 9, outliers)
    np.testing.assert_allclose(ours("mean", x, w), flat(aggregate(flower_results(x, w))), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(ours("median", x, w), flat(aggregate_median(flower_results(x, w))), rtol=1e-12, atol=0)
    for beta in (0.0, 0.1, 0.2, 0.3, 0.49):
        np.testing.assert_allclose(
            ours("trimmed-mean", x, w, trim_fraction=beta), flat(aggregate_trimmed_avg(flower_results(x, w), beta)), rtol=1e-9, atol=1e-9,
        )


@pytest.mark.parametrize("seed, n, f, outliers", CASES)
def test_krum_and_multi_krum_agree_with_flower(seed, n, f, outliers):
    x, w, bad = clients(seed, n, 9, outliers)
    picked = ours("krum", x, w, byzantine_f=f)
    assert np.array_equal(picked, flat(aggregate_krum(flower_results(x, w), f, to_keep=0)))  # the very client Flower picks
    assert any(np.array_equal(picked, x[i]) for i in range(n) if i not in bad)
    for m in (1, 2, n - f, n):
        np.testing.assert_allclose(
            ours("multi-krum", x, w, byzantine_f=f, krum_m=m), flat(aggregate_krum(flower_results(x, w), f, to_keep=m)), rtol=1e-12, atol=1e-9,
        )
    np.testing.assert_allclose(ours("multi-krum", x, w, byzantine_f=f), ours("multi-krum", x, w, byzantine_f=f, krum_m=n - f))


@pytest.mark.parametrize("seed, n, f, outliers", [(s, n, f, o) for s, (n, f) in enumerate([(3, 0), (7, 1), (8, 1), (11, 2), (12, 2), (15, 3)]) for o in (0, f)])
def test_bulyan_agrees_with_flower(seed, n, f, outliers):
    x, w, _ = clients(100 + seed, n, 9, outliers)
    expected = flat(aggregate_bulyan(flower_results(x, w), f, aggregate_krum, to_keep=0))
    np.testing.assert_allclose(ours("bulyan", x, w, byzantine_f=f), expected, rtol=1e-12, atol=1e-9)


def test_krum_scores_sum_the_n_minus_f_minus_2_nearest_squared_distances():
    x, _, _ = clients(5, 8, 4)
    d = np.array([[np.sum((a - b) ** 2) for b in x] for a in x])
    k = 8 - 1 - 2
    expected = [np.sort(np.delete(d[i], i))[:k].sum() for i in range(8)]
    np.testing.assert_allclose(krum_scores(squared_distances(torch.from_numpy(x)), 1).numpy(), expected, rtol=1e-12)


def test_weights_count_only_for_the_mean_and_multi_krum():
    x, w, _ = clients(9, 9, 5)
    for name, a in AGGREGATORS.items():
        kw = {"byzantine_f": 1, "krum_m": 4}
        same = np.allclose(ours(name, x, w, **kw), ours(name, x, np.ones_like(w), **kw))
        assert same != a.weighted, name


def test_float32_input_comes_back_float32_and_too_few_clients_raise():
    x = torch.randn(5, 3)
    for name in AGGREGATORS:
        assert AGGREGATORS[name].apply(x, [1.0] * 5, Settings(byzantine_f=0)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"needs n > 2f \+ 2"):
        AGGREGATORS["krum"].apply(x[:4], [1.0] * 4, Settings(byzantine_f=1))
    with pytest.raises(ValueError, match=r"needs n >= 4f \+ 3"):
        AGGREGATORS["bulyan"].apply(x, [1.0] * 5, Settings(byzantine_f=1))


# --- properties ------------------------------------------------------------------------------

def _settings_for(name: str, n: int, f: int) -> Settings:
    return Settings(trim_fraction=min(0.49, (f + 0.5) / n), byzantine_f=f, krum_m=0)


sizes = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 3), st.integers(1, 6)).map(
    lambda t: (t[0], 4 * t[1] + 3 + t[0] % 3, t[1], t[2])  # seed, n >= 4f + 3, f, d
)


@settings(max_examples=60, deadline=None)
@given(sizes, st.sampled_from((*ROBUST, "mean")))
def test_every_rule_ignores_the_order_of_the_clients(case, name):
    seed, n, f, d = case
    x, w, _ = clients(seed, n, d)
    perm = np.random.default_rng(seed + 1).permutation(n)
    s = _settings_for(name, n, f)
    np.testing.assert_allclose(ours(name, x[perm], w[perm], **vars(s)), ours(name, x, w, **vars(s)), rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(sizes, st.sampled_from((*ROBUST, "mean")), st.floats(-1e3, 1e3))
def test_every_rule_is_translation_equivariant(case, name, c):
    seed, n, f, d = case
    x, w, _ = clients(seed, n, d)
    shift = c * np.random.default_rng(seed + 2).standard_normal(d)
    s = _settings_for(name, n, f)
    np.testing.assert_allclose(ours(name, x + shift, w, **vars(s)), ours(name, x, w, **vars(s)) + shift, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(sizes, st.sampled_from(ROBUST), st.booleans())
def test_f_huge_outliers_cannot_pull_a_robust_rule_out_of_the_honest_range(case, name, clustered):
    seed, n, f, d = case
    x, w, bad = clients(seed, n, d, outliers=f)
    if clustered and bad:  # the attackers agree with each other: one point, so their distances are 0
        x[bad] = x[bad[0]]
    honest = np.delete(x, bad, axis=0)
    out = ours(name, x, w, **vars(_settings_for(name, n, f)))
    assert np.all(out >= honest.min(axis=0) - 1e-9) and np.all(out <= honest.max(axis=0) + 1e-9)
    if name == "krum":
        assert any(np.array_equal(out, h) for h in honest)


def test_the_mean_is_not_robust_which_the_bounded_influence_test_would_catch():
    x, w, bad = clients(3, 7, 4, outliers=1)
    honest = np.delete(x, bad, axis=0)
    out = ours("mean", x, w)
    assert np.any(out < honest.min(axis=0)) or np.any(out > honest.max(axis=0))


def test_an_exact_tie_of_krum_scores_goes_to_the_smaller_vector_whatever_the_order():
    x = np.array([[0.0], [1.0], [5.0]])  # f = 0, k = 1: rows 0 and 1 are each other's nearest, both score 1
    for perm in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
        assert ours("krum", x[perm], np.ones(3), byzantine_f=0).tolist() == [0.0]
    assert flat(aggregate_krum([([np.array([1.0])], 1), ([np.array([0.0])], 1), ([np.array([5.0])], 1)], 0, 0)).tolist() == [1.0]  # Flower: list order
