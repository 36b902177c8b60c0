"""Sign votes: plain majority (signSGD-MV) and the LLR-weighted vote with online
cross-probability estimation (signSGD-FV, the seeds' IT-signSGD).

``signs`` is always an int8 tensor of shape [M, N] holding +-1: M clients, N coordinates.
Votes return an int8 tensor of shape [N] in {-1, 0, +1}; 0 is a tie (no step).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from fedsim.core.blocks import BLOCK, BlockMap, coordinate_blocks, sequential_blocks
from fedsim.core.client_table import ClientTable


def majority_vote(signs: torch.Tensor) -> torch.Tensor:
    """U_n = sign(sum_m Y_{m,n}); a tie gives 0."""
    _check_signs(signs)
    return torch.sign(signs.sum(dim=0, dtype=torch.int32)).to(torch.int8)


def llr_weighted_vote(signs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """U_n = sign(sum_m w_{m,n} Y_{m,n}); an exact tie gives 0.

    ``weights`` is [M, N] (per client and coordinate) or [M] (per client).
    """
    _check_signs(signs)
    if weights.dim() == 1:
        weights = weights[:, None]
    if weights.shape[0] != signs.shape[0]:
        raise ValueError(f"llr_weighted_vote: {signs.shape[0]} clients but {weights.shape[0]} weight rows")
    total = (weights.to(torch.float32) * signs).sum(dim=0)
    return torch.sign(total).to(torch.int8)


def _check_signs(signs: torch.Tensor) -> None:
    if signs.dim() != 2:
        raise ValueError(f"signs must have shape [clients, coordinates], got {tuple(signs.shape)}")


class CrossProbabilityEstimator:
    """Online estimate of each client's per-coordinate cross-over probability p_{m,n}.

    A client's agreement rate a_{m,n} = 1 - p_{m,n} is the fraction of the rounds it took
    part in where its sign matched the vote: a tied coordinate (U_n = 0) carries no
    information and counts as half an agreement, i.e. the count grows by (1 + Y U) / 2.
    Its weight is the log-likelihood ratio

        w_{m,n} = clip(log((a + eps) / (1 - a + eps)), -max_llr, +max_llr)

    which keeps its sign: a client that disagrees more than half the time is flipped.

    - Weights for round t come from rounds before t; ``update`` is called after each vote.
    - Warm-up: during the first ``warmup_rounds`` updates, ``weights`` returns 1 for every
      client (the plain majority vote) while the counts still accumulate.
    - Partial participation: a client's counts change only in rounds it takes part in, so
      its rate is over its own rounds. A client with no history gets ``prior_weight``
      (default 1.0: the weight every client has in the majority vote, neither silenced
      nor dominant until it has a rate of its own).
    - Forgetting: before a client's counts are updated both are multiplied by
      ``forgetting`` (1.0 = keep all history), so its history decays per participation.
    - Abstention: a client's 0 on a coordinate (zero-sign "abstain") adds nothing to the
      vote and neither an agreement nor a round to that coordinate's counts: its rate on
      n is over the rounds it voted on n.

    Memory: one float32 agreement count per (client, coordinate) (4 bytes) and one
    float64 round count per client, plus, from the first abstention on, one float32
    abstention count per (client, coordinate) (4 bytes more); ``max_clients`` (None:
    unbounded) caps the clients, and a new client beyond it raises ValueError.

    Blocks: the vote and the update work on blocks of coordinates that do not touch each
    other (fedsim.core.blocks); ``map_blocks`` runs them (default: in order on this
    thread; fedsim.parallel.block_map runs them on a thread pool), with the same bits.
    """

    def __init__(
        self,
        num_coordinates: int,
        eps: float = 1e-5,
        max_llr: float = 10.0,
        warmup_rounds: int = 100,
        forgetting: float = 1.0,
        prior_weight: float = 1.0,
        device: torch.device | str = "cpu",
        max_clients: int | None = None,
        map_blocks: BlockMap = sequential_blocks,
    ) -> None:
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        if eps <= 0 or max_llr <= 0 or warmup_rounds < 0:
            raise ValueError("eps and max_llr must be > 0 and warmup_rounds >= 0")
        self.table = ClientTable(num_coordinates, device, max_clients)
        self.num_coordinates = num_coordinates
        self.eps = eps
        self.max_llr = max_llr
        self.warmup_rounds = warmup_rounds
        self.forgetting = forgetting
        self.prior_weight = prior_weight
        self.max_clients = max_clients
        self.device = self.table.device
        self.map_blocks = map_blocks
        self.rounds_seen = 0
        self.table.add("agree", torch.float32)
        self.table.add("total", torch.float64, per_coordinate=False)

    @property
    def _agree(self) -> torch.Tensor:
        return self.table["agree"]

    @property
    def _total(self) -> torch.Tensor:
        return self.table["total"]

    @property
    def _abstained(self) -> torch.Tensor | None:
        """Abstention counts [clients, N] float32, from the first abstention on."""
        return self.table["abstained"] if "abstained" in self.table else None

    @property
    def in_warmup(self) -> bool:
        """True while the vote is still the plain majority."""
        return self.rounds_seen < self.warmup_rounds

    def agreement_rates(self, client_ids: Sequence[Hashable]) -> torch.Tensor:
        """a_{m,n} for the given clients, [M, N]; NaN for a client with no history."""
        rows = self._selector(client_ids)
        total = self._voted(rows, self._total[rows].to(torch.float32)[:, None], slice(None))
        return torch.where(total > 0, self._agree[rows] / total.clamp_min(1e-30), torch.nan)

    def _voted(self, rows: slice | torch.Tensor, total: torch.Tensor, cols: slice) -> torch.Tensor:
        """Rounds each client voted on each coordinate: its rounds minus its abstentions."""
        return total if self._abstained is None else total - self._abstained[rows, cols]

    def weights(self, client_ids: Sequence[Hashable]) -> torch.Tensor:
        """LLR weights w_{m,n} for the given clients, [M, N] float32 (see class docstring)."""
        if self.in_warmup:
            return torch.ones(len(client_ids), self.num_coordinates, device=self.device)
        rows = self._selector(client_ids)
        return self._llr(rows, self._total[rows].to(torch.float32)[:, None], slice(None))

    def mean_weights(self, client_ids: Sequence[Hashable]) -> torch.Tensor:
        """(1/N) sum_n w_{m,n}: each client's learned LLR weight averaged over the
        coordinates, [M] (from the counts, also during warm-up), computed block by block."""
        rows = self._selector(client_ids)
        total = self._total[rows].to(torch.float32)[:, None]
        sums = torch.zeros(len(client_ids), dtype=torch.float64, device=self.device)
        for cols in self._blocks():
            sums += self._llr(rows, total, cols).sum(dim=1, dtype=torch.float64)
        return sums / self.num_coordinates

    def _llr(self, rows: slice | torch.Tensor, total: torch.Tensor, cols: slice) -> torch.Tensor:
        """w = clip(log((a + eps) / (1 - a + eps))), a = agree / total, for rows x cols;
        ``prior_weight`` where a client has no history (total = 0)."""
        total = self._voted(rows, total, cols)
        a = self._agree[rows, cols] / total.clamp_min(1e-30)
        den = (1.0 - a).add_(self.eps)
        w = a.add_(self.eps).div_(den).log_().clamp_(-self.max_llr, self.max_llr)
        return w.masked_fill_(total == 0, self.prior_weight)

    def update(self, client_ids: Sequence[Hashable], signs: torch.Tensor, vote: torch.Tensor) -> None:
        """Count agreements of ``signs`` [M, N] with ``vote`` [N] for the given clients."""
        if signs.shape != (len(client_ids), self.num_coordinates):
            raise ValueError(
                f"update: signs must have shape ({len(client_ids)}, {self.num_coordinates}), "
                f"got {tuple(signs.shape)}"
            )
        if len(set(client_ids)) != len(client_ids):
            raise ValueError("update: client_ids must be distinct")
        signs, vote = signs.to(self.device), vote.to(self.device)
        if self._abstained is None and bool((signs == 0).any()):
            self.table.add("abstained", torch.float32)
        rows = self._selector(client_ids)
        agree, total, abstained_counts = self._agree, self._total, self._abstained
        if self.forgetting != 1.0:
            total[rows] *= self.forgetting

        def count(cols: slice) -> None:
            y = signs[:, cols].to(torch.float32)
            agreement = y.mul(vote[cols]).add_(1.0).mul_(0.5)  # (1 + Y U) / 2
            if self.forgetting != 1.0:
                agree[rows, cols] *= self.forgetting
            if abstained_counts is not None:
                abstained = y == 0
                agreement.masked_fill_(abstained, 0.0)
                if self.forgetting != 1.0:
                    abstained_counts[rows, cols] *= self.forgetting
                abstained_counts[rows, cols] += abstained.to(torch.float32)
            agree[rows, cols] += agreement

        self.map_blocks(count, self._blocks())
        total[rows] += 1.0
        self.rounds_seen += 1

    def vote(self, client_ids: Sequence[Hashable], signs: torch.Tensor) -> torch.Tensor:
        """One round of signSGD-FV: weight with past counts, vote, then update the counts.

        Weights are computed and used one block of coordinates at a time, so the round's
        temporaries stay small whatever N is."""
        signs = signs.to(self.device)
        if self.in_warmup:
            u = majority_vote(signs)
        else:
            _check_signs(signs)
            rows = self._selector(client_ids)
            total = self._total[rows].to(torch.float32)[:, None]
            u = torch.empty(self.num_coordinates, dtype=torch.int8, device=self.device)

            def vote_block(cols: slice) -> None:
                u[cols] = llr_weighted_vote(signs[:, cols], self._llr(rows, total, cols))

            self.map_blocks(vote_block, self._blocks())
        self.update(client_ids, signs, u)
        return u

    def state_dict(self) -> dict:
        """The counts and their client order (tensors, lists and ints only: ``torch.load``
        reads it back with ``weights_only=True``)."""
        return {**self.table.state(), "rounds_seen": self.rounds_seen}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what ``state_dict`` returned (same number of coordinates)."""
        tables = {"agree": state["agree"], "total": state["total"]}
        if state.get("abstained") is not None:
            tables["abstained"] = state["abstained"]
        dtypes = {"agree": torch.float32, "total": torch.float64, "abstained": torch.float32}
        try:
            self.table.load(list(state["clients"]), tables, dtypes)
        except ValueError as err:
            raise ValueError(f"estimator state: {err}") from None
        self.rounds_seen = int(state["rounds_seen"])

    def _blocks(self) -> list[slice]:
        return coordinate_blocks(self.num_coordinates, BLOCK)

    def _selector(self, client_ids: Sequence[Hashable]) -> slice | torch.Tensor:
        """The clients' rows of the count tables (new clients get zero rows): a slice when
        they are consecutive, else an index tensor."""
        return self.table.select(client_ids)
