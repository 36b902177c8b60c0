"""Federated defense (signSGD-FD, Park and Lee, ICML 2024): the sign vote whose weights are
log-likelihood ratios of each worker's estimated reliability, estimated online from how
often its signs matched the server's decoded sign.

Notation: M workers, N coordinates; Y_{m,n} in {-1, +1} worker m's sign (int8 [M, N]);
U^t in {-1, 0, +1}^N the decoded sign of round t (0 = exact tie, no step). After each
round the server counts matches c_{m,n} += [Y_{m,n} = U_n] (a tie matches nobody) and
n_m += 1. With a = an agreement rate, the weight is the clipped LLR

    llr(a) = clip(log((a + eps) / (1 - a + eps)), -C, +C)

(a > 1/2: w > 0; a < 1/2: w < 0, the worker's votes are flipped; a = 1/2: w = 0). The
decoded sign is U_n = sign(sum_m w_{m,n} Y_{m,n}) where, with r the rounds counted so far:

- r = 0: w = 1 (the plain majority vote);
- 0 < r < T_in: one weight per worker, w_m = llr(sum_n c_{m,n} / (N n_m));
- r >= T_in: one weight per worker and coordinate, w_{m,n} = llr(c_{m,n} / n_m).

A worker with no history (n_m = 0: it has not taken part yet) gets w = 1.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from fedsim.core.blocks import BLOCK, BlockMap, coordinate_blocks, sequential_blocks
from fedsim.core.client_table import ClientTable
from fedsim.core.votes import llr_weighted_vote

EPS = 1e-5  # the authors' smoothing of the rates (``eps = 10 ** -5`` in train_signSGD_FD.py)


def fd_llr(agree: torch.Tensor, total: torch.Tensor, max_llr: float, eps: float = EPS) -> torch.Tensor:
    """w = clip(log((a + eps) / (1 - a + eps)), -max_llr, +max_llr) with a = agree / total
    (``total`` > 0, broadcast against ``agree``); float64 in, float64 out."""
    a = agree.to(torch.float64) / total.to(torch.float64)
    return torch.log((a + eps) / (1.0 - a + eps)).clamp(-max_llr, max_llr)


def count_matches(signs: torch.Tensor, vote: torch.Tensor) -> torch.Tensor:
    """[Y_{m,n} = U_n] as int32 [M, N]; a tied coordinate (U_n = 0) matches no +-1 sign."""
    return (signs == vote.to(signs.dtype)[None, :]).to(torch.int32)


class FederatedDefense:
    """The signSGD-FD server state: match counts c [K, N] (int32) and rounds n [K] (int64)
    for the K workers seen so far, and the rounds r counted (see the module docstring).

    ``warmup_rounds`` is T_in (>= 1); ``max_llr`` is C; ``max_clients`` (None: unbounded)
    caps K, and a new worker beyond it raises ValueError. A worker is any hashable id (the
    strategy uses partition ids, stable across runs and resumes). ``map_blocks`` runs the
    blocks of coordinates (fedsim.core.blocks; the same bits on any BlockMap).
    """

    def __init__(
        self,
        num_coordinates: int,
        warmup_rounds: int = 100,
        max_llr: float = 10.0,
        eps: float = EPS,
        device: torch.device | str = "cpu",
        max_clients: int | None = None,
        map_blocks: BlockMap = sequential_blocks,
    ) -> None:
        if warmup_rounds < 1 or not max_llr > 0 or not 0 < eps < 0.5:
            raise ValueError(f"need warmup_rounds >= 1, max_llr > 0, eps in (0, 0.5); got {warmup_rounds}, {max_llr}, {eps}")
        self.table = ClientTable(num_coordinates, device, max_clients, what="workers")
        self.num_coordinates = num_coordinates
        self.warmup_rounds = warmup_rounds
        self.max_llr = max_llr
        self.eps = eps
        self.max_clients = max_clients
        self.device = self.table.device
        self.map_blocks = map_blocks
        self.rounds_seen = 0
        self.table.add("matches", torch.int32)
        self.table.add("rounds", torch.int64, per_coordinate=False)

    @property
    def phase(self) -> str:
        """"majority" (r = 0), "worker" (0 < r < T_in) or "coordinate" (r >= T_in)."""
        if self.rounds_seen == 0:
            return "majority"
        return "worker" if self.rounds_seen < self.warmup_rounds else "coordinate"

    def worker_weights(self, client_ids: Sequence[Hashable]) -> torch.Tensor:
        """w_m = llr(sum_n c_{m,n} / (N n_m)), float64 [M]; 1 for a worker with n_m = 0."""
        rows = self.table.indices(client_ids)
        n = self.table["rounds"][rows]
        total = self.table["matches"][rows].sum(dim=1, dtype=torch.int64)
        w = fd_llr(total, (n * self.num_coordinates).clamp_min(1), self.max_llr, self.eps)
        return torch.where(n > 0, w, torch.ones_like(w))

    def coordinate_weights(self, client_ids: Sequence[Hashable], cols: slice = slice(None)) -> torch.Tensor:
        """w_{m,n} = llr(c_{m,n} / n_m) for the coordinates ``cols``, float64 [M, len(cols)];
        1 for a worker with n_m = 0."""
        rows = self.table.indices(client_ids)
        n = self.table["rounds"][rows][:, None]
        w = fd_llr(self.table["matches"][rows, cols], n.clamp_min(1), self.max_llr, self.eps)
        return torch.where(n > 0, w, torch.ones_like(w))

    def weights(self, client_ids: Sequence[Hashable]) -> torch.Tensor:
        """The weights this round's vote uses, float64 [M, N] (by phase; whole, for tests)."""
        if self.phase == "majority":
            return torch.ones(len(client_ids), self.num_coordinates, dtype=torch.float64, device=self.device)
        if self.phase == "worker":
            return self.worker_weights(client_ids)[:, None].expand(-1, self.num_coordinates).clone()
        return self.coordinate_weights(client_ids)

    def vote(self, client_ids: Sequence[Hashable], signs: torch.Tensor) -> torch.Tensor:
        """One round: U = sign(sum_m w_m Y_m) with this phase's weights, then count the
        matches with U. Returns U, int8 [N]."""
        if len(set(client_ids)) != len(client_ids):
            raise ValueError("vote: client_ids must be distinct")
        if signs.shape != (len(client_ids), self.num_coordinates):
            raise ValueError(f"vote: signs must have shape ({len(client_ids)}, {self.num_coordinates}), got {tuple(signs.shape)}")
        signs = signs.to(self.device)
        phase = self.phase
        if phase == "coordinate":
            u = torch.empty(self.num_coordinates, dtype=torch.int8, device=self.device)
            self.table.indices(client_ids)  # new workers' rows first: the blocks then only read the tables

            def vote_block(cols: slice) -> None:
                u[cols] = llr_weighted_vote(signs[:, cols], self.coordinate_weights(client_ids, cols))

            self.map_blocks(vote_block, self._blocks())
        else:
            w = torch.ones(len(client_ids), dtype=torch.float64, device=self.device)
            if phase == "worker":
                w = self.worker_weights(client_ids)
            u = llr_weighted_vote(signs, w)
        self.update(client_ids, signs, u)
        return u

    def update(self, client_ids: Sequence[Hashable], signs: torch.Tensor, vote: torch.Tensor) -> None:
        """c_{m,n} += [Y_{m,n} = U_n], n_m += 1 for the given workers; r += 1."""
        rows = self.table.indices(client_ids)
        signs, vote = signs.to(self.device), vote.to(self.device)
        matches = self.table["matches"]

        def count(cols: slice) -> None:
            matches[rows, cols] += count_matches(signs[:, cols], vote[cols])

        self.map_blocks(count, self._blocks())
        self.table["rounds"][rows] += 1
        self.rounds_seen += 1

    def state_dict(self) -> dict[str, Any]:
        """Counts, their worker order and r (tensors, lists and ints: ``torch.load`` reads it
        back with ``weights_only=True``)."""
        return {**self.table.state(), "rounds_seen": self.rounds_seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (same number of coordinates)."""
        tables = {"matches": state["matches"], "rounds": state["rounds"]}
        if tables["matches"].dim() != 2 or tables["rounds"].dim() != 1:
            raise ValueError(f"FD state has counts of shape {tuple(tables['matches'].shape)} and rounds {tuple(tables['rounds'].shape)}, expected 2-D and 1-D")
        try:
            self.table.load(list(state["clients"]), tables, {"matches": torch.int32, "rounds": torch.int64})
        except ValueError as err:
            raise ValueError(f"FD state: {err}") from None
        self.rounds_seen = int(state["rounds_seen"])

    def _blocks(self) -> list[slice]:
        return coordinate_blocks(self.num_coordinates, BLOCK)
