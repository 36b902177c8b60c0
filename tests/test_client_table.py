"""fedsim.core.client_table: one row per client, grown in steps, state cut to the rows in use."""

import pytest
import torch

from fedsim.core.client_table import GROWTH, ClientTable


def test_new_clients_get_zero_rows_and_keep_their_row():
    t = ClientTable(3)
    t.add("agree", torch.float32)
    t.add("total", torch.float64, per_coordinate=False)
    rows = t.indices(["a", "b"])
    t["agree"][rows] += torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    t["total"][rows] += 1
    assert t.indices(["c", "a"]).tolist() == [2, 0]
    assert t["agree"].tolist() == [[1, 2, 3], [4, 5, 6], [0, 0, 0]]
    assert t["total"].tolist() == [1, 1, 0] and t.clients == ["a", "b", "c"]


def test_storage_grows_geometrically_not_every_round():
    t = ClientTable(4)
    t.add("agree", torch.float32)
    grown, capacity = 0, t.capacity
    for r in range(2000):  # ten new clients a round, 20,000 in all
        rows = t.indices([10 * r + i for i in range(10)])
        t["agree"][rows] += float(r)
        if t.capacity != capacity:
            grown, capacity = grown + 1, t.capacity
    assert len(t.rows) == 20_000 and t["agree"].shape == (20_000, 4)
    assert grown <= 1 + int(torch.log(torch.tensor(20_000 / 16)) / torch.log(torch.tensor(GROWTH))) + 1  # ~19, not 2,000
    assert torch.equal(t["agree"][:, 0], torch.arange(20_000).div(10, rounding_mode="floor").float())
    state = t.state()
    assert state["agree"].shape == (20_000, 4) and state["agree"].untyped_storage().nbytes() == 20_000 * 4 * 4  # no spare rows saved


def test_max_clients_caps_rows_and_storage():
    t = ClientTable(2, max_clients=20)
    t.add("x", torch.int32)
    t.indices(list(range(17)))
    assert t.capacity <= 20
    with pytest.raises(ValueError, match="more than max_clients=20"):
        t.indices(list(range(17, 22)))
    t.indices([17, 18, 19])
    assert t["x"].shape == (20, 2)


def test_load_replaces_rows_and_checks_shapes():
    t = ClientTable(2)
    t.add("x", torch.int32)
    t.load(["p", "q"], {"x": torch.ones(2, 2)}, {"x": torch.int32})
    assert t["x"].dtype == torch.int32 and t.indices(["q", "r"]).tolist() == [1, 2] and t["x"].tolist() == [[1, 1], [1, 1], [0, 0]]
    with pytest.raises(ValueError, match=r"shape \(3, 2\), expected \(2, 2\)"):
        t.load(["p", "q"], {"x": torch.ones(3, 2)}, {"x": torch.int32})
