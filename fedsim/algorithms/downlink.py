"""The sign votes' 1-bit downlink (run config ``downlink = "signs"``): instead of the model,
a node that holds the previous global model is sent the vote that turns it into this
round's model, and rebuilds that model itself.

The sign votes' server update is x^t = x^{t-1} - delta * U^t (``descend``), U^t in
{-1, 0, +1}^N (a tie gives 0). A node holding x^{t-1} bit for bit rebuilds x^t bit for bit
by running the same ``descend`` on it. The vote sent is the one the two models show,
U'_n = sign(x^{t-1}_n - x^t_n) (``vote_between``): U^t wherever the step moved the
coordinate, 0 where it did not (a tie, or a step lost to rounding where |x| >> delta),
which rebuilds the same x^t; the server checks that it does before it sends it. The
model's other entries (float buffers such as BatchNorm's running statistics, which the
server averages, and integer ones) cannot be derived from signs: they travel in full
beside the vote (ArrayRecord ``"buffers"``; the digits and MNIST models have none).

Messages (a train message of round t stands for the global model after round t - 1):

- full model: ArrayRecord ``"arrays"`` and ConfigRecord ``"config"`` with
  ``downlink = "signs"``: the node keeps the model in its ``context.state``;
- votes: ArrayRecord ``"votes"`` (for each round r with a nonzero vote after the node's
  model: ``"r/packed"``, the 1-bit signs with 0 sent as +1, and where the vote has ties the
  ternary code's ``"r/zeros"`` (uint32 indices) or ``"r/nonzero"`` (1-bit mask), whichever
  is smaller (fedsim.core.signs.encode_ternary), or instead ``"r/trits"`` alone (base 3, 5
  coordinates per byte) where that is smaller still), ``"buffers"`` where the model has other
  entries, and ``"config"`` with ``downlink = "signs"``, ``base-round`` (the round of the
  model the node must hold) and ``model-digest`` (``state_digest`` of the model to rebuild).

Server (``DownlinkServer``): per node, the round of the model it holds, as far as the
server knows: set when the node replies without an error to a message (it then holds the
message's model), dropped when it does not reply or replies with an error. A node holding
the model of round t - 1 gets the last vote; one holding an older model gets the votes it
missed while they take fewer bytes than the full model; every other node (first contact,
too many missed rounds, a run resumed from a checkpoint, whose bookkeeping starts empty)
gets the full model. The server keeps the recent votes while their bytes stay below the
model's, one digest, and one round number per node.

Client (``model_for_round``): a votes message is checked like any untrusted input (record
names, dtypes, shapes, rounds); a node that holds no model, or another round's, or whose
rebuilt model does not have the server's digest, refuses to train (``DownlinkMismatch``: an
error reply, one line in the server's log) and the server sends it the full model next
time. Memory: each node keeps one model (its state_dict's bytes) in its ``context.state``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedsim.algorithms.base import descend
from fedsim.arrays import decode_exact, from_flwr_array, to_flwr_array, to_state
from fedsim.config import DOWNLINKS
from fedsim.core.model_vector import flatten
from fedsim.core.signs import (
    NONZERO,
    PACKED,
    TRITS,
    ZEROS,
    decode_ternary,
    encode_ternary,
    pack_trits,
    packed_size,
    trits_size,
    unpack_signs,
    unpack_trits,
)
from fedsim.protocol import ARRAYS, BUFFERS, CONFIG, ModelSpec, content_bytes

MODEL, SIGNS = DOWNLINKS  # the run config's ``downlink`` values
MODE = "downlink"  # config key: "signs" in both kinds of message of the signs downlink
BASE_ROUND = "base-round"  # config key: the round of the model the votes start from
MODEL_DIGEST = "model-digest"  # config key: state_digest of the model the votes rebuild
VOTES = "votes"  # ArrayRecord of the votes
HELD = "downlink-model"  # node state: ArrayRecord of the model the node holds
HELD_ROUND = "downlink-round"  # node state: ConfigRecord {"round": the round of that model}
_VOTE_KEY = re.compile(r"(0|[1-9][0-9]{0,9})/(packed|zeros|nonzero|trits)")


class DownlinkMismatch(ValueError):
    """A votes message that does not fit the model this node holds: it must not train."""


def state_digest(arrays: ArrayRecord) -> str:
    """A cheap digest of a model: BLAKE2b (8 bytes, hex) of every entry's key, dtype, shape and
    bytes, in key order."""
    h = hashlib.blake2b(digest_size=8)
    for key in sorted(arrays.keys()):
        a = np.ascontiguousarray(from_flwr_array(arrays[key]))
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def same_bits(a: ArrayRecord, b: ArrayRecord, keys: Sequence[str]) -> bool:
    """Whether entries ``keys`` of a and b have the same dtype, shape and bytes."""
    for key in keys:
        x, y = from_flwr_array(a[key]), from_flwr_array(b[key])
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(_bits(x), _bits(y)):
            return False
    return True


def _bits(a: np.ndarray) -> np.ndarray:
    """The array's bytes as uint8 (for bitwise comparison: -0.0 and 0.0 differ there)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def vote_between(old: ArrayRecord, new: ArrayRecord, keys: Sequence[str], lr: float) -> torch.Tensor | None:
    """U = sign(x_old - x_new) in {-1, 0, +1}^N (int8) over the trainable entries ``keys``, if
    descend(old, keys, U, lr) gives new's entries bit for bit; else None (no sign step joins them)."""
    x_old = flatten(to_state(old, copy=False), keys)
    x_new = flatten(to_state(new, copy=False), keys)
    u = torch.sign(x_old.double() - x_new.double()).to(torch.int8)
    return u if same_bits(descend(old, tuple(keys), u, lr), new, keys) else None


def encode_vote(server_round: int, u: torch.Tensor) -> dict[str, Array]:
    """A round's vote as the votes record's arrays: ``"r/packed"`` (1 bit per coordinate)
    and, where U has zeros, the ternary code's smaller part (``"r/zeros"`` or
    ``"r/nonzero"``), or ``"r/trits"`` alone (base 3, 1.6 bits) where that is smaller."""
    code = encode_ternary(u)
    if ZEROS in code and code[ZEROS].size == 0:
        del code[ZEROS]
    arrays = {f"{server_round}/{name}": to_flwr_array(arr) for name, arr in code.items()}
    if len(code) == 1:
        return arrays
    trits = {f"{server_round}/{TRITS}": to_flwr_array(pack_trits(u))}
    return trits if _nbytes(trits) < _nbytes(arrays) else arrays


def _nbytes(arrays: dict[str, Array]) -> int:
    """What the arrays add to a message (Flower's ArrayRecord.count_bytes)."""
    return sum(len(a.data) + len(k) for k, a in arrays.items())


@dataclass(frozen=True)
class _Vote:
    """One round's vote as sent, and the bytes it adds to a message."""

    round: int
    arrays: dict[str, Array]
    nbytes: int


class DownlinkServer:
    """The server's half of the signs downlink (module docstring): what each node holds, the
    recent votes, and the train message each chosen node gets."""

    def __init__(self, model: ModelSpec, lr: float) -> None:
        """``model``: the model's entries and trainable keys; ``lr``: delta, the votes' step."""
        self.keys = model.param_keys
        self.rest = tuple(k for k in model.arrays if k not in model.param_keys)
        self.lr = lr
        self.held: dict[int, int] = {}  # node id -> the round of the model it holds
        self._sent: dict[int, int] = {}  # node id -> the round of the model its last message stands for
        self._votes: list[_Vote] = []  # the nonzero votes of rounds after self._since, oldest first
        self._since = -1  # a node holding the model of this round or later can be caught up
        self._last: tuple[int, ArrayRecord] | None = None  # (round, global model after it)
        self._digest = ""

    def messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, nodes: Sequence[int]) -> dict[int, RecordDict]:
        """Each node's round-``server_round`` train message for the global model ``arrays`` (of
        round server_round - 1) with the task ``config``: the votes it missed, or the model."""
        version = server_round - 1
        self._advance(version, arrays)
        full = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({**config, MODE: SIGNS})})
        limit = content_bytes(full)
        by_base: dict[int, RecordDict] = {}
        out: dict[int, RecordDict] = {}
        for node in nodes:
            base = self.held.get(node)
            if base is not None and base not in by_base:
                by_base[base] = self._catch_up(base, version, arrays, config, limit) or full
            out[node] = full if base is None else by_base[base]
        self._sent = {node: version for node in nodes}
        return out

    def settle(self, replies: Sequence[Message]) -> None:
        """After a round: a node that replied without an error holds its message's model; any
        other node sent to gets the full model next time."""
        ok = {m.metadata.src_node_id for m in replies if not m.has_error()}
        for node, version in self._sent.items():
            if node in ok:
                self.held[node] = version
            else:
                self.held.pop(node, None)
        self._sent = {}

    def _catch_up(self, base: int, version: int, arrays: ArrayRecord, config: ConfigRecord, limit: int) -> RecordDict | None:
        """The votes message from the model of round ``base`` to that of ``version``, if the
        votes are all kept and the message is smaller than ``limit`` (the full model's)."""
        if not self._since <= base < version:
            return None
        votes = ArrayRecord({k: a for v in self._votes if v.round > base for k, a in v.arrays.items()})
        task = ConfigRecord({**config, MODE: SIGNS, BASE_ROUND: base, MODEL_DIGEST: self._digest})
        record = RecordDict({VOTES: votes, CONFIG: task})
        if self.rest:
            record[BUFFERS] = ArrayRecord({k: arrays[k] for k in self.rest})
        return record if content_bytes(record) < limit else None

    def _advance(self, version: int, arrays: ArrayRecord) -> None:
        """Learn the global model of round ``version``: keep the vote from the previous round's
        model to it (none if it did not change), or forget every vote if none joins them."""
        last = self._last
        if last is not None and last[0] == version and last[1] is arrays:
            return
        u = vote_between(last[1], arrays, self.keys, self.lr) if last is not None and last[0] == version - 1 else None
        if u is None:
            self._votes, self._since = [], version
        elif bool(u.any()):
            encoded = encode_vote(version, u)
            self._votes.append(_Vote(version, encoded, _nbytes(encoded)))
        self._last, self._digest = (version, arrays), state_digest(arrays)
        model_bytes = sum(len(arrays[k].data) for k in self.keys)
        while self._votes and sum(v.nbytes for v in self._votes) > model_bytes:
            self._since = self._votes.pop(0).round  # a node holding an older model gets the full one


# --- the client's half ---------------------------------------------------------------------


def model_for_round(content: RecordDict, state: RecordDict, server_round: int, keys: Sequence[str], lr: float) -> ArrayRecord:
    """The global model a round's train message stands for (that of round server_round - 1):
    its ``arrays``, or under the signs downlink the model rebuilt from the node's own
    (``state``) and the votes; under the signs downlink the node keeps it in ``state``.
    DownlinkMismatch (ValueError) when the message does not fit what this node holds."""
    task = content[CONFIG]
    assert isinstance(task, ConfigRecord)
    mode = task.get(MODE, MODEL)
    if mode not in DOWNLINKS:
        raise ValueError(f"config {MODE!r} is {mode!r}, expected one of {list(DOWNLINKS)}")
    arrays = content.get(ARRAYS)
    if isinstance(arrays, ArrayRecord):
        if mode == SIGNS:
            keep(state, server_round - 1, arrays)
        return arrays
    if mode != SIGNS or not isinstance(content.get(VOTES), ArrayRecord):
        raise ValueError(f"the train message carries neither ArrayRecord {ARRAYS!r} nor the signs downlink's {VOTES!r}")
    model = rebuild(content, state, server_round, keys, lr)
    keep(state, server_round - 1, model)
    return model


def keep(state: RecordDict, model_round: int, arrays: ArrayRecord) -> None:
    """Hold ``arrays``, the global model of round ``model_round``, in the node's state."""
    state[HELD] = arrays
    state[HELD_ROUND] = ConfigRecord({"round": model_round})


def held_model(state: RecordDict) -> tuple[ArrayRecord, int] | None:
    """(the model this node holds, its round), or None if it holds none."""
    arrays, meta = state.get(HELD), state.get(HELD_ROUND)
    if not isinstance(arrays, ArrayRecord) or not isinstance(meta, ConfigRecord) or not isinstance(meta.get("round"), int):
        return None
    return arrays, int(meta["round"])  # type: ignore[arg-type]


def rebuild(content: RecordDict, state: RecordDict, server_round: int, keys: Sequence[str], lr: float) -> ArrayRecord:
    """x^{server_round - 1} from the held model x^{base}: descend by each vote in round order,
    then the other entries from ``buffers``; its digest must be the message's ``model-digest``."""
    task = content[CONFIG]
    assert isinstance(task, ConfigRecord)
    base, digest = task.get(BASE_ROUND), task.get(MODEL_DIGEST)
    if isinstance(base, bool) or not isinstance(base, int) or not isinstance(digest, str):
        raise ValueError(f"a votes message needs an integer {BASE_ROUND!r} and a string {MODEL_DIGEST!r} in its config")
    fix = "it refuses this round, and the server sends it the full model next time"
    held = held_model(state)
    if held is None:
        raise DownlinkMismatch(
            f"downlink: the round-{server_round} message carries the votes since the model of round {base}, but this node "
            f"holds no model (a new or restarted device); {fix}"
        )
    model, held_round = held
    if held_round != base or not set(keys) <= set(model.keys()):
        raise DownlinkMismatch(
            f"downlink: the round-{server_round} message carries the votes since the model of round {base}, but this node "
            f"holds the model of round {held_round}{'' if set(keys) <= set(model.keys()) else ' without all its parameters'}; {fix}"
        )
    n = sum(int(np.prod(model[k].shape)) for k in keys)
    for u in checked_votes(content[VOTES], base, server_round - 1, n):  # type: ignore[arg-type]
        model = descend(model, tuple(keys), u, lr)
    model = with_rest(model, content.get(BUFFERS), keys)
    if state_digest(model) != digest:
        raise DownlinkMismatch(
            f"downlink: the model rebuilt from the round-{base} model this node holds and the votes has digest "
            f"{state_digest(model)}, the server's has {digest}; {fix}"
        )
    return model


def checked_votes(record: ArrayRecord, base: int, last: int, n: int) -> list[torch.Tensor]:
    """The votes record's votes (int8 {-1, 0, +1}^n) in round order; ValueError unless every key
    is ``r/packed``, ``r/zeros``, ``r/nonzero`` or ``r/trits`` with base < r <= last, each
    round has ``trits`` alone or ``packed`` and at most one of ``zeros`` and ``nonzero``,
    and each array has its code's dtype and size."""
    parts: dict[int, dict[str, np.ndarray]] = {}
    for key in record.keys():
        match = _VOTE_KEY.fullmatch(key)
        if match is None or not base < int(match.group(1)) <= last:
            raise ValueError(f"votes[{key!r}]: expected 'ROUND/packed', 'ROUND/zeros', 'ROUND/nonzero' or 'ROUND/trits' with {base} < ROUND <= {last}")
        try:
            arr = decode_exact(record[key])
        except ValueError as err:
            raise ValueError(f"votes[{key!r}] cannot be decoded: {err}") from None
        name = match.group(2)
        size = trits_size(n) if name == TRITS else packed_size(n)
        dtype, fits = (np.uint32, arr.ndim == 1 and arr.size <= n) if name == ZEROS else (np.uint8, arr.shape == (size,))
        if arr.dtype != dtype or not fits:
            raise ValueError(f"votes[{key!r}] has dtype {arr.dtype} and shape {arr.shape}, not the code of {n} signs")
        parts.setdefault(int(match.group(1)), {})[name] = arr
    out = []
    for rnd in sorted(parts):
        code = parts[rnd]
        if list(code) == [TRITS]:
            out.append(unpack_trits(code[TRITS], n))
            continue
        if PACKED not in code or len(code) > 2 or TRITS in code:
            raise ValueError(f"the vote of round {rnd} has parts {sorted(code)}: expected {PACKED!r} and at most one of {ZEROS!r}, "
                             f"{NONZERO!r}, or {TRITS!r} alone")
        out.append(decode_ternary(code, n) if len(code) == 2 else unpack_signs(code[PACKED], n))
    return out


def with_rest(model: ArrayRecord, rest: object, keys: Sequence[str]) -> ArrayRecord:
    """``model`` with its entries other than ``keys`` replaced by the message's ``buffers``
    (same keys, dtypes and shapes as the held model's; floats finite); ValueError otherwise."""
    others = [k for k in model.keys() if k not in keys]
    if not others and rest is None:
        return model
    if not isinstance(rest, ArrayRecord) or sorted(rest.keys()) != sorted(others):
        got = sorted(rest.keys()) if isinstance(rest, ArrayRecord) else None
        raise ValueError(f"ArrayRecord {BUFFERS!r} must hold the model's entries {others} beside the votes, has {got}")
    out = ArrayRecord()
    for key in model.keys():
        if key not in others:
            out[key] = model[key]
            continue
        ref, arr = from_flwr_array(model[key]), decode_exact(rest[key])
        if arr.dtype != ref.dtype or arr.shape != ref.shape or (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
            raise ValueError(f"{BUFFERS}[{key!r}] has dtype {arr.dtype} and shape {arr.shape}, expected finite {ref.dtype} {ref.shape}")
        out[key] = rest[key]
    return out

