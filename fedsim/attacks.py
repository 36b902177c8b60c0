"""Byzantine clients: which clients attack, and what an attacker does to its upload.

The attackers are the partition ids ``attacker-ids`` names, else ``attackers`` (k) clients
drawn from the run's seed (``attacker_ids``) among ``num-nodes``: ``run_attackers`` derives
them from the run config alone, so the server (whatever number of nodes connected) and
every client (whatever ``num-partitions`` its node config says) agree on them. They run
the same ClientApp as everyone else, on every engine; the algorithm's client step calls
the attack at two points, before and after encoding:

- ``sign-flip``: the gradient g (or FedAvg's update x_k - x) is negated before encoding,
  so a sign vote gets sign(-g); under zero-sign "plus" an exactly zero coordinate is still
  sent as +1, as by an honest client (the convention issue #12 is about).
- ``bit-flip``: the 1-bit signs are inverted after encoding (every coordinate, zeros too);
  an abstaining coordinate stays abstaining.
- ``random``: fair random signs from the client's seeded stream, on every coordinate.
- ``scale``: the update u (FedSGD's gradient, FedAvg's x_k - x) is sent as -c u
  (c = ``attack-scale``).
- ``noise``: u + N(0, sigma^2) per coordinate (sigma = ``attack-noise``).
- ``stochastic``: each coordinate flipped independently with probability p
  (``attack-prob``), drawn from the client's seeded stream: a sign upload's sent bits
  (after encoding, as ``bit-flip``: p = 1 is ``bit-flip``, p = 1/2 sends fair coins like
  ``random``), a real-valued update's coordinates negated (E[sent] = (1 - 2p) u).
- ``gauss``: the update u replaced by N(0, sigma^2) per coordinate (sigma =
  ``attack-noise``), for real-valued uploads only: the signs of such a payload are fair
  coins, which ``random`` already sends.
- ``lie`` ("A Little Is Enough", Baruch et al., NeurIPS 2019): the attackers collude and
  send mu - z sigma per coordinate, mu and sigma the mean and standard deviation of the
  honest clients' payloads of the round, z = ``alie_z(n, f)``. In simulation the attackers
  may read the honest uploads of the round; the one place that has them, on every engine
  and whatever the order replies arrive in or the number of workers, is the server. So the
  attacker's client sends its honest upload (``Attack.of`` is HONEST for it) and the
  strategy replaces the payloads of the run's attackers (``run_attackers``, from the run
  config: no mark a client sends is trusted) by the algorithm's ``lie`` payload before
  aggregating (fedsim.strategies.base). Real-valued payloads (FedSGD's gradients, FedAvg's
  models: mu - z sigma of the models is x + mu - z sigma of the updates) get the vector
  itself; the sign votes get sign(mu - z sigma) of the honest signs (what the server sees
  of them; an exact 0 is sent as +1, or abstains under zero-sign "abstain"); EF-signSGD's
  scaled signs have no lie.

An algorithm declares which of these apply to its upload (``Algorithm.attacks``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedsim.config import RunConfig, parse_attacker_ids
from fedsim.core.signs import NONZERO, PACKED, ZEROS

ATTACKS = ("sign-flip", "bit-flip", "random", "scale", "noise", "stochastic", "gauss", "lie")
SIGN_ATTACKS = ("sign-flip", "bit-flip", "random", "stochastic")  # for uploads of packed signs
UPDATE_ATTACKS = ("sign-flip", "scale", "noise", "stochastic", "gauss", "lie")  # for uploads of real-valued updates
SERVER_PLAYED = ("lie",)  # attacks the strategy plays for the attackers (their clients send honest uploads)


def attacker_ids(seed: int, num_partitions: int, k: int) -> list[int]:
    """The partition ids of the k attackers: k distinct ids drawn uniformly from the seed."""
    if not 0 <= k <= num_partitions:
        raise ValueError(f"attackers={k}: must be in 0..{num_partitions} (the number of clients)")
    rng = np.random.default_rng([seed, 0xA77AC])
    return sorted(int(i) for i in rng.choice(num_partitions, size=k, replace=False))


def run_attackers(cfg: RunConfig) -> tuple[int, ...]:
    """The run's attackers, sorted: ``attacker-ids`` if given, else ``attackers`` drawn from
    the seed among ``num-nodes`` partitions (the run config's number, never a count of
    connected nodes or a node's ``num-partitions``: both sides must get the same set)."""
    named = parse_attacker_ids(cfg.attacker_ids)
    return named if named else tuple(attacker_ids(cfg.seed, cfg.num_nodes, cfg.attackers))


def alie_z(n: int, f: int) -> float:
    """ALIE's z_max for n clients of which f attack (Baruch et al. 2019, Algorithm 3):
    s = floor(n/2 + 1) - f, the honest clients the attackers need on their side for a
    majority, and z = Phi^{-1}((n - s) / n), Phi the standard normal CDF. With f > n/2 the
    formula's s <= 0 (no honest client needed); s is taken as at least 1, so z stays finite.
    (The formula as issue #24 states it and as we read the paper's Algorithm 3; the paper's
    text was not at hand to check it again when this was written.)"""
    if not 1 <= f < n:
        raise ValueError(f"alie_z: need 1 <= f < n, got n={n}, f={f}")
    s = max(n // 2 + 1 - f, 1)
    return float(torch.special.ndtri(torch.tensor((n - s) / n, dtype=torch.float64)))


def alie_vector(honest: torch.Tensor, z: float) -> torch.Tensor:
    """mu - z sigma per coordinate of the honest updates ``honest`` [M, ...], in float64:
    mu their mean, sigma their sample standard deviation (M - 1 in the denominator; 0 for
    M = 1)."""
    x = honest.to(torch.float64)
    sigma = x.std(dim=0, correction=1) if len(x) > 1 else torch.zeros_like(x[0])
    return x.mean(dim=0) - z * sigma


def alie_arrays(honest: list[Mapping[str, np.ndarray]], z: float) -> dict[str, np.ndarray]:
    """The ALIE payload of real-valued uploads: ``alie_vector`` of each entry over the
    honest payloads, in each entry's dtype (integer entries rounded)."""
    out: dict[str, np.ndarray] = {}
    for key, first in honest[0].items():
        v = alie_vector(torch.from_numpy(np.stack([np.asarray(p[key], np.float64) for p in honest])), z)
        out[key] = (v if np.issubdtype(first.dtype, np.floating) else v.round()).numpy().astype(first.dtype)
    return out


def alie_signs(honest: torch.Tensor, z: float, abstain: bool) -> torch.Tensor:
    """The ALIE payload of sign uploads: sign(mu - z sigma) of the honest signs [M, N] as
    int8; an exact 0 becomes +1 unless ``abstain`` (a ternary code may send 0)."""
    s = torch.sign(alie_vector(honest, z)).to(torch.int8)
    return s if abstain else torch.where(s == 0, torch.ones_like(s), s)


@dataclass(frozen=True)
class Attack:
    """What one client does to its upload; ``kind`` "none" is an honest client."""

    kind: str = "none"
    scale: float = 10.0
    noise: float = 1.0
    prob: float = 0.5

    @classmethod
    def of(cls, cfg: RunConfig) -> Attack:
        """What an attacker's client of this run does: the run config's ``attack`` with its
        settings; nothing (HONEST) for an attack the server plays (``lie``)."""
        if cfg.attack in SERVER_PLAYED:
            return HONEST
        return cls(cfg.attack, cfg.attack_scale, cfg.attack_noise, cfg.attack_prob)

    def gradient(self, g: torch.Tensor) -> torch.Tensor:
        """Before a sign code: -g for sign-flip, else g."""
        return -g if self.kind == "sign-flip" else g

    def update(self, u: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A real-valued update as sent: -u (sign-flip), -c u (scale), u + sigma z (noise),
        u with each coordinate negated with probability p (stochastic), sigma z (gauss);
        z ~ N(0, 1) per coordinate."""
        if self.kind == "sign-flip":
            return -u
        if self.kind == "scale":
            return -self.scale * u
        if self.kind in ("noise", "gauss"):
            z = torch.randn(u.shape, generator=generator, device=u.device, dtype=torch.float32).to(u.dtype)
            return u + self.noise * z if self.kind == "noise" else self.noise * z
        if self.kind == "stochastic":
            return torch.where(self.flips(u.numel(), generator).to(u.device).reshape(u.shape), -u, u)
        return u

    def flips(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n independent Bernoulli(p) draws (bool) from the client's stream: which
        coordinates ``stochastic`` flips."""
        return torch.rand(n, generator=generator, device=generator.device) < self.prob

    def signs(self, arrays: Mapping[str, np.ndarray], n: int, generator: torch.Generator) -> dict[str, np.ndarray]:
        """A sign code's arrays as sent (``PACKED`` 1-bit signs of n coordinates, and the
        ternary code's ``NONZERO`` or ``ZEROS``): inverted bits (bit-flip), each bit inverted
        with probability p (stochastic; an abstaining coordinate stays abstaining) or fair
        random signs on every coordinate (random)."""
        out = dict(arrays)
        if self.kind == "bit-flip":
            out[PACKED] = np.bitwise_not(out[PACKED]) & _valid_bits(n)
        elif self.kind == "stochastic":
            out[PACKED] = np.bitwise_xor(out[PACKED], np.packbits(self.flips(n, generator).cpu().numpy()))
        elif self.kind == "random":
            bits = torch.randint(0, 2, (n,), generator=generator, device=generator.device).cpu().numpy().astype(np.uint8)
            out[PACKED] = np.packbits(bits)
            if NONZERO in out:
                out[NONZERO] = np.packbits(np.ones(n, np.uint8))
            if ZEROS in out:
                out[ZEROS] = np.zeros(0, np.uint32)
        return out


HONEST = Attack()


def _valid_bits(n: int) -> np.ndarray:
    """Byte masks that keep the padding bits of the last byte 0, as pack_signs writes them."""
    mask = np.full((n + 7) // 8, 0xFF, np.uint8)
    if n % 8:
        mask[-1] = (0xFF << (8 - n % 8)) & 0xFF
    return mask
