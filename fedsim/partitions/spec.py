"""The partitioning spec: a scheme name and its one optional parameter."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEMES: tuple[str, ...] = ("iid", "shards", "dirichlet", "labels", "full", "sample", "natural")

# The parameter each scheme takes (None: takes none) and its default.
DEFAULT_PARAMS: dict[str, float | None] = {
    "iid": None,
    "shards": 2.0,  # shards per client
    "dirichlet": 0.5,  # concentration alpha
    "labels": 2.0,  # labels per client
    "full": None,
    "sample": 100.0,  # examples per client
    "natural": None,  # takes a column name instead (``column``)
}

VALID_FORMS = (
    "iid, shards[:S], dirichlet[:ALPHA], labels[:K], full, sample[:K], natural:<column> "
    "(e.g. 'shards:2', 'dirichlet:0.3', 'labels:2', 'sample:600', 'natural:writer_id')"
)


@dataclass(frozen=True)
class PartitionSpec:
    """Which scheme splits the training set, with its parameter.

    ``param`` is the shards per client for "shards" (default 2), the Dirichlet
    concentration alpha for "dirichlet" (default 0.5), the labels per client for
    "labels" (default 2), the examples per client for "sample" (default 100); "iid" and
    "full" take none. None means the default.
    "natural" takes the name of a data column (``column``) whose values say which
    client holds each example (flwr-datasets' NaturalIdPartitioner).
    """

    scheme: str
    param: float | None = None
    column: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown partitioning scheme {self.scheme!r}; valid forms: {VALID_FORMS}")
        if (self.scheme == "natural") != bool(self.column):
            raise ValueError(f"partitioning 'natural' needs a column name and only it takes one: 'natural:<column>'; valid forms: {VALID_FORMS}")
        if self.param is None:
            return
        if DEFAULT_PARAMS[self.scheme] is None:
            raise ValueError(
                f"partitioning {self.scheme!r} takes no parameter (got {self.param!r}); valid forms: {VALID_FORMS}"
            )
        value = float(self.param)
        if self.scheme == "dirichlet":
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"dirichlet alpha must be a finite number > 0, got {self.param!r}; e.g. 'dirichlet:0.5'"
                )
        elif not (value.is_integer() and value >= 1):
            what = {"shards": "shards per client", "labels": "labels per client"}.get(self.scheme, "examples per client")
            raise ValueError(
                f"{self.scheme}: {what} must be an integer >= 1, got {self.param!r}; e.g. '{self.scheme}:2'"
            )

    @property
    def value(self) -> float | None:
        """The parameter in effect: ``param``, or the scheme's default when None."""
        return DEFAULT_PARAMS[self.scheme] if self.param is None else float(self.param)

    def __str__(self) -> str:
        """Canonical text, defaults filled in: "iid", "shards:2", "dirichlet:0.5", "natural:writer"."""
        if self.column:
            return f"{self.scheme}:{self.column}"
        value = self.value
        if value is None:
            return self.scheme
        return f"{self.scheme}:{value:.12g}"

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """Parse "iid", "shards", "shards:2", "dirichlet:0.3", "labels:2", "full"."""
        if not isinstance(text, str):
            raise ValueError(f"partitioning must be a string, got {text!r}; valid forms: {VALID_FORMS}")
        scheme, sep, arg = text.strip().partition(":")
        scheme, arg = scheme.strip().lower(), arg.strip()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown partitioning {text!r}; valid forms: {VALID_FORMS}")
        if scheme == "natural":
            return cls(scheme, column=arg or None)
        if not sep:
            return cls(scheme)
        try:
            param = float(arg)
        except ValueError:
            raise ValueError(
                f"invalid partitioning {text!r}: {arg!r} is not a number; valid forms: {VALID_FORMS}"
            ) from None
        try:
            return cls(scheme, param)
        except ValueError as err:
            raise ValueError(f"invalid partitioning {text!r}: {err}") from None
