"""Per-client count tables: what the LLR vote's and signSGD-FD's estimators keep.

Row r of every table belongs to one client (any hashable id, e.g. a partition id); a
client seen for the first time gets a new row of zeros in every table. Tables are either
per (client, coordinate), [K, N], or per client, [K]. ``max_clients`` (None: unbounded)
caps K: a reply cannot make the server's state grow at will.

Growth: rows live in storage with room to spare, which grows by GROWTH (x1.5) when full,
so that a round with new clients copies the tables only now and then (amortised O(1)
per new row), not every round: with 100,000 clients a table is gigabytes.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

GROWTH = 1.5  # storage grows to this many times the rows needed when it is full
MIN_CAPACITY = 16


class ClientTable:
    """Named count tables with one row per client (module docstring)."""

    def __init__(self, num_coordinates: int, device: torch.device | str = "cpu", max_clients: int | None = None, what: str = "clients") -> None:
        if num_coordinates < 1:
            raise ValueError(f"num_coordinates must be >= 1, got {num_coordinates}")
        if max_clients is not None and max_clients < 1:
            raise ValueError(f"max_clients must be >= 1 or None, got {max_clients}")
        self.num_coordinates = num_coordinates
        self.device = torch.device(device)
        self.max_clients = max_clients
        self.what = what  # "clients" or "workers", for the error message
        self.rows: dict[Hashable, int] = {}
        self._storage: dict[str, torch.Tensor] = {}  # capacity rows each; the first len(rows) are in use

    @property
    def clients(self) -> list[Hashable]:
        """The clients in row order."""
        return list(self.rows)

    @property
    def tables(self) -> dict[str, torch.Tensor]:
        """Each table's rows in use (views into the storage)."""
        k = len(self.rows)
        return {name: t[:k] for name, t in self._storage.items()}

    @property
    def capacity(self) -> int:
        """Rows the storage holds before it grows."""
        return next(iter(self._storage.values())).shape[0] if self._storage else 0

    def add(self, name: str, dtype: torch.dtype, per_coordinate: bool = True) -> torch.Tensor:
        """A new table of zeros (one row per client known so far)."""
        shape = (max(self.capacity, len(self.rows)),) + ((self.num_coordinates,) if per_coordinate else ())
        self._storage[name] = torch.zeros(shape, dtype=dtype, device=self.device)
        return self[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._storage[name][: len(self.rows)]

    def __contains__(self, name: str) -> bool:
        return name in self._storage

    def indices(self, client_ids: Sequence[Hashable]) -> torch.Tensor:
        """Rows of the clients (int64); a client seen for the first time gets zero rows."""
        new = [c for c in dict.fromkeys(client_ids) if c not in self.rows]
        if new and self.max_clients is not None and len(self.rows) + len(new) > self.max_clients:
            raise ValueError(
                f"{len(new)} new {self.what} would make {len(self.rows) + len(new)} with counts, "
                f"more than max_clients={self.max_clients}"
            )
        if new:
            self._reserve(len(self.rows) + len(new))
            for c in new:
                self.rows[c] = len(self.rows)
        return torch.tensor([self.rows[c] for c in client_ids], dtype=torch.long, device=self.device)

    def _reserve(self, rows: int) -> None:
        """Storage for at least ``rows`` rows (grown by GROWTH, capped at max_clients); new rows are zeros."""
        if rows <= self.capacity:
            return
        want = max(rows, MIN_CAPACITY, int(self.capacity * GROWTH))
        if self.max_clients is not None:
            want = max(rows, min(want, self.max_clients))
        for name, t in self._storage.items():
            grown = torch.zeros((want, *t.shape[1:]), dtype=t.dtype, device=self.device)
            grown[: len(self.rows)] = t[: len(self.rows)]
            self._storage[name] = grown

    def select(self, client_ids: Sequence[Hashable]) -> slice | torch.Tensor:
        """``indices`` as a slice (a view, no copies) when the rows are consecutive."""
        rows = self.indices(client_ids)
        first = int(rows[0]) if len(rows) else 0
        if torch.equal(rows, torch.arange(first, first + len(rows), device=rows.device)):
            return slice(first, first + len(rows))
        return rows

    def state(self) -> dict[str, object]:
        """``{"clients": [...], <table>: tensor, ...}`` (readable with ``weights_only=True``).
        The storage is first cut to the rows in use (else ``torch.save`` would write the spare rows too)."""
        k = len(self.rows)
        if self.capacity > k:
            self._storage = {name: t[:k].clone() for name, t in self._storage.items()}
        return {"clients": self.clients, **self.tables}

    def load(self, clients: Sequence[Hashable], tables: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype]) -> None:
        """Replace the rows and tables (each checked: K rows, N columns where per coordinate)."""
        k = len(clients)
        for name, t in tables.items():
            per_coordinate = t.dim() == 2
            want = (k, self.num_coordinates) if per_coordinate else (k,)
            if tuple(t.shape) != want:
                raise ValueError(f"state table {name!r} has shape {tuple(t.shape)}, expected {want}")
        self.rows = {c: i for i, c in enumerate(clients)}
        self._storage = {name: t.to(self.device, dtypes[name]).clone() for name, t in tables.items()}
