"""The pure math: sign codec, votes, cross-probability estimator, weighted mean."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsim.core.aggregate import weighted_mean
from fedsim.core.signs import pack_on_device, pack_signs, packed_size, unpack_signs
from fedsim.core.votes import CrossProbabilityEstimator, llr_weighted_vote, majority_vote

S = lambda rows: torch.tensor(rows, dtype=torch.int8)  # noqa: E731


# --- sign codec -------------------------------------------------------------------------

def test_pack_known_bytes_and_zero_is_plus_one():
    t = torch.tensor([1.0, -2.0, 0.0, -0.5, 3.0, 3.0, -1.0, -1.0, 0.1])
    packed = pack_signs(t)
    assert packed.dtype == np.uint8 and packed.tolist() == [0b10101100, 0b10000000]
    assert unpack_signs(packed, 9).tolist() == [1, -1, 1, -1, 1, 1, -1, -1, 1]


def test_pack_rejects_nan_and_unpack_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        pack_signs(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_signs(np.zeros(3, np.uint8), 9)
    with pytest.raises(ValueError, match="uint8"):
        unpack_signs(np.zeros(2, np.float32), 9)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e6, 1e6, width=32)))
def test_pack_unpack_round_trip(x):
    t = torch.from_numpy(x)
    packed = pack_signs(t)
    assert packed.size == packed_size(t.numel()) == math.ceil(t.numel() / 8)
    expected = torch.where(t >= 0, 1, -1).to(torch.int8)
    assert torch.equal(unpack_signs(packed, t.numel()), expected)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e6, 1e6, width=32)), st.booleans())
def test_packing_on_the_device_equals_numpys_packbits(x, with_nan):
    """pack_on_device (what a CUDA client runs) is bit-identical to the host code, and its
    flag byte says NaN; run here on the CPU, on the GPU by benchmarks/gpu_check.sh."""
    if with_nan:
        x = x.copy()
        x[len(x) // 2] = np.nan
    out = pack_on_device(torch.from_numpy(x)).numpy()
    assert out.size == packed_size(x.size) + 1 and out[-1] == int(with_nan)
    with np.errstate(invalid="ignore"):
        assert out[:-1].tolist() == np.packbits(x >= 0).tolist()


# --- votes --------------------------------------------------------------------------------

def test_majority_vote_by_hand_and_tie():
    assert majority_vote(S([[1, -1, 1], [1, 1, -1], [-1, 1, -1]])).tolist() == [1, 1, -1]
    assert majority_vote(S([[1, -1], [-1, -1]])).tolist() == [0, -1]


def test_llr_vote_by_hand():
    signs = S([[1, 1], [-1, -1], [-1, 1]])
    assert llr_weighted_vote(signs, torch.tensor([3.0, 1.0, 1.0])).tolist() == [1, 1]
    per_coord = torch.tensor([[1.0, 0.5], [1.0, 2.0], [1.0, 0.5]])
    assert llr_weighted_vote(signs, per_coord).tolist() == [-1, -1]
    assert llr_weighted_vote(S([[1], [-1]]), torch.tensor([2.0, 2.0])).tolist() == [0]
    # a negative weight flips that client's vote
    assert llr_weighted_vote(S([[1], [1], [-1]]), torch.tensor([-5.0, 1.0, 1.0])).tolist() == [-1]


sign_matrices = st.integers(1, 9).flatmap(
    lambda m: arrays(np.int8, (m, 17), elements=st.sampled_from([-1, 1]))
)


@settings(max_examples=100, deadline=None)
@given(sign_matrices, st.randoms(use_true_random=False))
def test_vote_invariances(y, rnd):
    signs = torch.from_numpy(y)
    u = majority_vote(signs)
    perm = list(range(signs.shape[0]))
    rnd.shuffle(perm)
    assert torch.equal(majority_vote(signs[perm]), u)  # client order does not matter
    assert torch.equal(majority_vote(-signs), -u)  # flipping every sign flips the vote
    ones = torch.ones(signs.shape[0])
    assert torch.equal(llr_weighted_vote(signs, ones), u)  # equal weights = majority
    w = torch.rand(signs.shape[0]) + 0.1
    assert torch.equal(llr_weighted_vote(signs, w * 7.0), llr_weighted_vote(signs, w))


# --- cross-probability estimator ----------------------------------------------------------

def _llr(a, eps=1e-5, cap=10.0):
    return max(-cap, min(cap, math.log((a + eps) / (1 - a + eps))))


def test_estimator_warmup_then_llr_by_hand():
    est = CrossProbabilityEstimator(num_coordinates=2, warmup_rounds=3)
    ids = ["a", "b", "c"]
    rounds = [S([[1, 1], [1, -1], [-1, -1]]), S([[1, 1], [1, 1], [-1, 1]]), S([[-1, -1], [-1, 1], [1, 1]])]
    votes = []
    for signs in rounds:
        assert est.in_warmup
        assert torch.equal(est.weights(ids), torch.ones(3, 2))  # plain majority during warm-up
        votes.append(est.vote(ids, signs).tolist())
    assert votes == [[1, -1], [1, 1], [-1, 1]]
    assert not est.in_warmup
    # coord 0 votes 1, 1, -1 and coord 1 votes -1, 1, 1:
    # a agrees 3/3 and 1/3, b 3/3 and 3/3, c 0/3 and 3/3
    rates = est.agreement_rates(ids)
    assert rates.flatten().tolist() == pytest.approx([1.0, 1 / 3, 1.0, 1.0, 0.0, 1.0])
    w = est.weights(ids)
    assert w[1].tolist() == pytest.approx([10.0, 10.0])  # clipped at max_llr
    assert w[0, 1].item() == pytest.approx(_llr(1 / 3), rel=1e-5)  # = -log 2
    assert w[2, 0].item() == pytest.approx(-10.0)  # always disagrees: negative, clipped


def test_negative_weight_flips_an_adversary():
    # One honest client, two sign-flipping adversaries. After warm-up the adversaries
    # disagree with the (honest-dominated) vote... only if the vote is right. Here the honest
    # majority is 3 vs 2 adversaries; the LLR vote must then also undo the adversaries.
    est = CrossProbabilityEstimator(num_coordinates=1, warmup_rounds=2)
    ids = [0, 1, 2, 3, 4]
    honest = S([[1], [1], [1], [-1], [-1]])
    for _ in range(2):
        est.vote(ids, honest)
    w = est.weights(ids)
    assert (w[:3] > 0).all() and (w[3:] < 0).all()
    # Now two honest clients drop out: a plain majority would follow the adversaries.
    signs = S([[1], [-1], [-1]])
    assert majority_vote(signs).item() == -1
    assert est.vote([0, 3, 4], signs).item() == 1


def test_tie_counts_half_an_agreement():
    est = CrossProbabilityEstimator(num_coordinates=1, warmup_rounds=1)
    u = est.vote([0, 1], S([[1], [-1]]))
    assert u.item() == 0
    assert est.agreement_rates([0, 1]).tolist() == [[0.5], [0.5]]
    assert est.weights([0, 1]).flatten().tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_partial_participation_and_prior_weight():
    est = CrossProbabilityEstimator(num_coordinates=1, warmup_rounds=0, prior_weight=1.0)
    est.update(["a", "b"], S([[1], [-1]]), torch.tensor([1], dtype=torch.int8))
    est.update(["a"], S([[-1]]), torch.tensor([1], dtype=torch.int8))
    rates = est.agreement_rates(["a", "b", "new"])
    assert rates[0].item() == pytest.approx(0.5) and rates[1].item() == 0.0
    assert math.isnan(rates[2].item())
    w = est.weights(["a", "b", "new"])
    assert w[:, 0].tolist() == pytest.approx([0.0, -10.0, 1.0], abs=1e-6)


def test_forgetting_factor_by_hand():
    est = CrossProbabilityEstimator(num_coordinates=1, warmup_rounds=0, forgetting=0.5)
    one = torch.tensor([1], dtype=torch.int8)
    est.update([7], S([[1]]), one)  # agree = 1, total = 1
    est.update([7], S([[-1]]), one)  # agree = 0.5, total = 1.5
    assert est.agreement_rates([7]).item() == pytest.approx(1 / 3)


def test_estimator_memory_is_four_bytes_per_client_coordinate():
    est = CrossProbabilityEstimator(num_coordinates=1000, warmup_rounds=0)
    est.update(list(range(15)), torch.ones(15, 1000, dtype=torch.int8), torch.ones(1000, dtype=torch.int8))
    assert est._agree.element_size() * est._agree.numel() == 4 * 15 * 1000


def test_blocked_vote_equals_the_definition_across_blocks_and_partial_participation():
    """vote() works on blocks of coordinates and on row views; it must equal the plain
    definition: U = sign(sum_m w_m Y_m) with w from weights(), then counts += (1 + Y U) / 2."""
    from fedsim.core.blocks import BLOCK

    n = 2 * BLOCK + 123
    est = CrossProbabilityEstimator(num_coordinates=n, warmup_rounds=2, forgetting=0.9)
    g = torch.Generator().manual_seed(1)
    agree, total = {}, {}
    for ids in [[0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3], [3, 0, 2], [0, 1, 2, 3, 4], [4, 2], [1, 2], [2, 3, 4]]:
        signs = (torch.randint(0, 2, (len(ids), n), generator=g) * 2 - 1).to(torch.int8)
        signs[:, :10] = 1 if len(ids) % 2 else torch.tensor([1, -1] * (len(ids) // 2))[:, None].to(torch.int8)  # ties
        expected = majority_vote(signs) if est.in_warmup else llr_weighted_vote(signs, est.weights(ids))
        u = est.vote(ids, signs)
        assert torch.equal(u, expected)
        for row, c in enumerate(ids):
            agree[c] = agree.get(c, torch.zeros(n)) * 0.9 + (1 + signs[row].float() * u.float()) / 2
            total[c] = total.get(c, 0.0) * 0.9 + 1
        ids_seen = sorted(agree)
        assert torch.allclose(est.agreement_rates(ids_seen), torch.stack([agree[c] / total[c] for c in ids_seen]), atol=1e-6)


@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_blocks_are_bit_identical_to_one_thread(threads):
    """Blocks of coordinates on several threads: the same votes and counts, bit for bit,
    through warm-up, partial participation, forgetting and abstentions (zeros)."""
    from fedsim.core.blocks import BLOCK
    from fedsim.parallel import block_map

    n = 3 * BLOCK + 77
    one = CrossProbabilityEstimator(num_coordinates=n, warmup_rounds=1, forgetting=0.95)
    many = CrossProbabilityEstimator(num_coordinates=n, warmup_rounds=1, forgetting=0.95, map_blocks=block_map(threads))
    assert many.map_blocks.threads == threads
    g = torch.Generator().manual_seed(3)
    for rnd, ids in enumerate([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [4, 0, 2], [1, 2, 3, 4], [0, 1, 2, 3, 4]]):
        signs = torch.randint(-1 if rnd >= 2 else 0, 2, (len(ids), n), generator=g).to(torch.int8)
        if rnd < 2:
            signs = signs * 2 - 1  # +-1 only before the first abstention
        assert torch.equal(one.vote(ids, signs), many.vote(ids, signs))
    a, b = one.state_dict(), many.state_dict()
    assert a["clients"] == b["clients"] and a["rounds_seen"] == b["rounds_seen"]
    for key in ("agree", "total", "abstained"):
        assert torch.equal(a[key], b[key]), key


def test_block_map_runs_every_block_once_and_raises_a_blocks_error():
    from fedsim.parallel import block_map

    for threads in (1, 3):
        seen: list[int] = []
        block_map(threads)(seen.append, list(range(7)))
        assert sorted(seen) == list(range(7))

    def fail(b: int) -> None:
        if b == 4:
            raise RuntimeError("block 4")

    with pytest.raises(RuntimeError, match="block 4"):
        block_map(3)(fail, list(range(7)))
    with pytest.raises(ValueError, match="threads"):
        block_map(0)


def test_estimator_rejects_bad_shapes():
    est = CrossProbabilityEstimator(num_coordinates=3)
    with pytest.raises(ValueError, match="shape"):
        est.update([0, 1], torch.ones(2, 4, dtype=torch.int8), torch.ones(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="distinct"):
        est.update([0, 0], torch.ones(2, 3, dtype=torch.int8), torch.ones(3, dtype=torch.int8))


# --- weighted mean -------------------------------------------------------------------------

def test_weighted_mean_by_hand():
    out = weighted_mean([torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0])], [1, 3])
    assert out.tolist() == pytest.approx([3.25, 6.5])
    with pytest.raises(ValueError):
        weighted_mean([torch.zeros(2)], [0])


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_weighted_mean_of_float32_is_the_float64_mean_of_their_casts_bit_for_bit(n, d, seed):
    """The accumulator takes float32 rows as they are (no float64 copy each): the same bits
    as casting every row to float64 first, what the mean did before."""
    rng = np.random.default_rng(seed)
    rows = [torch.from_numpy((rng.standard_normal(d) * 10.0 ** rng.integers(-4, 4)).astype(np.float32)) for _ in range(n)]
    weights = [float(w) for w in rng.integers(1, 1000, n)]
    cast = torch.zeros(d, dtype=torch.float64)  # the unblocked sum of float64 casts, row after row
    for r, w in zip(rows, weights, strict=True):
        cast.add_(r.double(), alpha=w / sum(weights))
    assert torch.equal(weighted_mean(rows, weights, torch.float64), cast)
    assert torch.equal(weighted_mean(rows, weights), cast.float())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_weighted_mean_in_blocks_of_coordinates_is_the_same_bits(n, d, block, seed):
    """The mean walks the coordinates block by block (every row into a block, so the
    accumulator stays in cache): each coordinate sums the same terms in the same order."""
    from fedsim.core import aggregate

    rng = np.random.default_rng(seed)
    rows = [torch.from_numpy(rng.standard_normal((d, 3)).astype(np.float32)) for _ in range(n)]
    weights = [float(w) for w in rng.integers(1, 100, n)]
    whole = weighted_mean(rows, weights, torch.float64)
    saved = aggregate.MEAN_BLOCK
    aggregate.MEAN_BLOCK = block
    try:
        assert torch.equal(weighted_mean(rows, weights, torch.float64), whole)
    finally:
        aggregate.MEAN_BLOCK = saved


def test_estimator_rows_are_capped_by_max_clients():
    est = CrossProbabilityEstimator(num_coordinates=2, warmup_rounds=0, max_clients=3)
    est.vote([0, 1], S([[1, 1], [1, -1]]))
    est.vote([2], S([[1, 1]]))
    with pytest.raises(ValueError, match="max_clients=3"):
        est.vote([1, 7], S([[1, 1], [1, 1]]))
    assert est.state_dict()["clients"] == [0, 1, 2] and est.rounds_seen == 2  # the refused round changed nothing
    est.vote([2, 0], S([[1, 1], [1, 1]]))  # known clients still vote
    unbounded = CrossProbabilityEstimator(num_coordinates=1, warmup_rounds=0)
    unbounded.vote(list(range(50)), torch.ones(50, 1, dtype=torch.int8))
    assert len(unbounded.state_dict()["clients"]) == 50
