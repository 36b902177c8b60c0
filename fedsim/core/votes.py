"""Sign votes: plain majority (signSGD-MV) and the LLR-weighted vote with online
cross-probability estimation (signSGD-FV, the seeds' IT-signSGD).

``signs`` is always an int8 tensor of shape [M, N] holding +-1: M clients, N coordinates.
Votes return an int8 tensor of shape [N] in {-1, 0, +1}; 0 is a tie (no step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar

import torch

from fedsim.device import available_cores

# Coordinates per block in the LLR vote: temporaries of M x 65,536 floats stay in cache and
# below the allocator's mmap threshold (no page faults per round).
_BLOCK = 1 << 16


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


_CORES: ContextVar[int | None] = ContextVar("fedsim_vote_cores", default=None)


@contextlib.contextmanager
def vote_cores(cores: int) -> Iterator[None]:
    """Within the block, estimators built with the default ``threads`` use at most ``cores``
    cores (an engine's budget: ``fedsim run --workers 1`` means one core, vote included)."""
    token = _CORES.set(max(1, cores))
    try:
        yield
    finally:
        _CORES.reset(token)


def vote_threads() -> int:
    """Threads for a CPU vote: the cores this process may use (or the ``vote_cores`` budget),
    divided by torch's intra-op threads (each block's kernels already use that many)."""
    cores = _CORES.get() or available_cores()
    return max(1, cores // max(1, torch.get_num_threads()))


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """One shared pool per thread count for every estimator of the process (concurrent votes queue in it)."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="fedsim-vote")
    return _POOLS[threads]


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

    Threads: the vote and the update work on blocks of coordinates that do not touch each
    other, so ``threads`` > 1 runs the blocks on that many threads (torch releases the GIL
    in its kernels) with bit-identical results. None (default): on a CPU, the cores left
    over by torch's own intra-op threads (``vote_threads``, within ``vote_cores``); on a GPU, 1.
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
        threads: int | None = None,
    ) -> None:
        if num_coordinates < 1:
            raise ValueError(f"num_coordinates must be >= 1, got {num_coordinates}")
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        if eps <= 0 or max_llr <= 0 or warmup_rounds < 0:
            raise ValueError("eps and max_llr must be > 0 and warmup_rounds >= 0")
        if max_clients is not None and max_clients < 1:
            raise ValueError(f"max_clients must be >= 1 or None, got {max_clients}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        self.num_coordinates = num_coordinates
        self.eps = eps
        self.max_llr = max_llr
        self.warmup_rounds = warmup_rounds
        self.forgetting = forgetting
        self.prior_weight = prior_weight
        self.max_clients = max_clients
        self.device = torch.device(device)
        self.threads = threads if threads is not None else (vote_threads() if self.device.type == "cpu" else 1)
        self.rounds_seen = 0
        self._rows: dict[Hashable, int] = {}
        self._agree = torch.zeros(0, num_coordinates, dtype=torch.float32, device=self.device)
        self._total = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._abstained: torch.Tensor | None = None  # [clients, N] float32, from the first abstention on

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
            self._abstained = torch.zeros_like(self._agree)
        rows = self._selector(client_ids)
        if self.forgetting != 1.0:
            self._total[rows] *= self.forgetting

        def count(cols: slice) -> None:
            y = signs[:, cols].to(torch.float32)
            agreement = y.mul(vote[cols]).add_(1.0).mul_(0.5)  # (1 + Y U) / 2
            if self.forgetting != 1.0:
                self._agree[rows, cols] *= self.forgetting
            if self._abstained is not None:
                abstained = y == 0
                agreement.masked_fill_(abstained, 0.0)
                if self.forgetting != 1.0:
                    self._abstained[rows, cols] *= self.forgetting
                self._abstained[rows, cols] += abstained.to(torch.float32)
            self._agree[rows, cols] += agreement

        self._each_block(count)
        self._total[rows] += 1.0
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

            self._each_block(vote_block)
        self.update(client_ids, signs, u)
        return u

    def state_dict(self) -> dict:
        """The counts and their client order (tensors, lists and ints only: ``torch.load``
        reads it back with ``weights_only=True``)."""
        state = {"clients": list(self._rows), "agree": self._agree, "total": self._total, "rounds_seen": self.rounds_seen}
        if self._abstained is not None:
            state["abstained"] = self._abstained
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what ``state_dict`` returned (same number of coordinates)."""
        agree, clients = state["agree"], list(state["clients"])
        if agree.shape != (len(clients), self.num_coordinates):
            raise ValueError(f"estimator state has counts of shape {tuple(agree.shape)}, expected ({len(clients)}, {self.num_coordinates})")
        self._rows = {c: i for i, c in enumerate(clients)}
        self._agree = agree.to(self.device, torch.float32).clone()
        self._total = state["total"].to(self.device, torch.float64).clone()
        self.rounds_seen = int(state["rounds_seen"])
        abstained = state.get("abstained")
        if abstained is not None and abstained.shape != agree.shape:
            raise ValueError(f"estimator state has abstentions of shape {tuple(abstained.shape)}, expected {tuple(agree.shape)}")
        self._abstained = None if abstained is None else abstained.to(self.device, torch.float32).clone()

    def _blocks(self) -> Iterator[slice]:
        for start in range(0, self.num_coordinates, _BLOCK):
            yield slice(start, start + _BLOCK)

    def _each_block(self, fn: Callable[[slice], None]) -> None:
        """fn(cols) for every block, on ``threads`` threads when there are several blocks."""
        blocks = list(self._blocks())
        if self.threads < 2 or len(blocks) < 2:
            for cols in blocks:
                fn(cols)
            return
        for _ in _pool(self.threads).map(fn, blocks):  # consumes the iterator: a block's error is raised here
            pass

    def _selector(self, client_ids: Sequence[Hashable]) -> slice | torch.Tensor:
        """The clients' rows of the count tables: a slice (a view, no copies) when they are
        consecutive, else an index tensor."""
        rows = self._row_indices(client_ids)
        first = int(rows[0]) if len(rows) else 0
        if torch.equal(rows, torch.arange(first, first + len(rows), device=rows.device)):
            return slice(first, first + len(rows))
        return rows

    def _row_indices(self, client_ids: Sequence[Hashable]) -> torch.Tensor:
        """Rows of the count tables; a client seen for the first time gets zero counts."""
        new = [c for c in dict.fromkeys(client_ids) if c not in self._rows]
        if new and self.max_clients is not None and len(self._rows) + len(new) > self.max_clients:
            raise ValueError(
                f"{len(new)} new clients would make {len(self._rows) + len(new)} with counts, "
                f"more than max_clients={self.max_clients}"
            )
        if new:
            for c in new:
                self._rows[c] = len(self._rows)
            zeros = torch.zeros(len(new), self.num_coordinates, device=self.device)
            self._agree = torch.cat([self._agree, zeros])
            self._total = torch.cat(
                [self._total, torch.zeros(len(new), dtype=torch.float64, device=self.device)]
            )
            if self._abstained is not None:
                self._abstained = torch.cat([self._abstained, zeros])
        return torch.tensor([self._rows[c] for c in client_ids], dtype=torch.long, device=self.device)
