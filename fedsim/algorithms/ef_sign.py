"""EF-signSGD: signSGD with error feedback (Karimireddy et al., ICML 2019, "Error Feedback
Fixes SignSGD and other Gradient Compression Schemes"), one worker per client.

Client m keeps the residual e_m of its compressed updates (zero at the start) and, at
round t, with g_m its minibatch gradient at x^t and gamma the run config's ``lr``:

    p_m = gamma * g_m + e_m
    Delta_m = (||p_m||_1 / N) * sign(p_m)     (scaled sign: 1 bit per coordinate + 1 float)
    e_m <- p_m - Delta_m

and uploads sign(p_m) packed (zero sent as +1, as in fedsim.core.signs; the residual is
computed with the same convention, so e_m is exactly what the server did not get) and
the scale ||p_m||_1 / N. Server: x^{t+1} = x^t - (1/M) sum_m Delta_m, the plain mean over
the M valid replies (each client one worker, as in the distributed EF-signSGD variants).

Plausibility bound: a reply's scale s must satisfy s <= MAX_SCALE_RATIO * max(1, ||x||_1 / N)
for the round's global model x (N trainable coordinates): one reply moves every coordinate
by s / M, and an honest s = ||lr g + e||_1 / N is one step's mean size, far below a
thousand times the model's mean weight (or 1000 where weights are below 1). A finite but
absurd scale (3e38 is a valid float32) would otherwise take the model to -inf in two
rounds; it is rejected like any bad reply instead.

The residual lives in the node's ``context.state`` (a node that is not sampled keeps
it): EF-signSGD is the one algorithm here whose clients keep state between rounds. It is not in fedsim's checkpoints: a run resumed from a checkpoint restarts every
residual at zero, so it is not bit-identical to an uninterrupted run (the only
algorithm here for which that holds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fedsim.algorithms.base import Algorithm, ClientStep, Upload, descend
from fedsim.arrays import to_array_record, to_state
from fedsim.attacks import SIGN_ATTACKS
from fedsim.clients.tasks import flat_gradient
from fedsim.core.aggregate import weighted_mean
from fedsim.core.model_vector import flatten
from fedsim.core.signs import pack_signs, packed_size, unpack_signs
from fedsim.protocol import PACKED, ArraySpec, BadReply, Reply, checked_arrays

RECORD = "scaled-signs"
SCALE = "scale"
RESIDUAL = "ef-residual"  # the node state's ArrayRecord holding e_m
MAX_SCALE_RATIO = 1e3  # the plausibility bound: scale <= MAX_SCALE_RATIO * max(1, mean |x_i|)


@dataclass(frozen=True)
class EFParams:
    """gamma: the clients' step size (the run config's ``lr``)."""

    lr: float


def scaled_sign(p: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(sign(p) with sign(0) = +1, ||p||_1 / N): the compressor C(p) = scale * sign(p)."""
    signs = torch.where(p >= 0, 1.0, -1.0).to(p.dtype)
    return signs, float(p.abs().sum() / max(p.numel(), 1))


def error_feedback_step(gradient: torch.Tensor, residual: torch.Tensor, lr: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """One client step: p = lr * g + e; returns (sign(p), scale, the new residual p - scale * sign(p))."""
    p = lr * gradient + residual
    signs, scale = scaled_sign(p)
    return signs, scale, p - scale * signs


ScaledSigns = tuple[np.ndarray, float]  # (packed signs, scale)


class EFSignSGD(Algorithm[EFParams, ScaledSigns]):
    """EF-signSGD: scaled signs up, the clients' residuals fed back into their next round."""

    name = "ef-sign"
    record = RECORD
    params = EFParams
    attacks = SIGN_ATTACKS

    @classmethod
    def client_step(cls, hp: EFParams, step: ClientStep) -> Upload:
        g, loss, _ = flat_gradient(step.model, step.data, step.batch_size, step.generator, step.objective)
        g = step.attack.gradient(g)
        kept = step.state.get(RESIDUAL)
        residual = torch.zeros_like(g)
        if isinstance(kept, ArrayRecord) and "e" in kept:
            residual = torch.from_numpy(kept["e"].numpy()).to(g.device, g.dtype).reshape(g.shape)
        signs, scale, residual = error_feedback_step(g, residual, hp.lr)
        step.state[RESIDUAL] = to_array_record({"e": residual.detach().cpu().numpy()})
        arrays = step.attack.signs({PACKED: pack_signs(signs)}, g.numel(), step.generator)
        return Upload({**arrays, SCALE: np.array([scale], np.float32)}, loss)

    def parse(self, msg: Message) -> ScaledSigns:
        spec: ArraySpec = {PACKED: ((packed_size(self.model.num_params),), np.dtype(np.uint8)), SCALE: ((1,), np.dtype(np.float32))}
        arrays = checked_arrays(msg, RECORD, spec)  # finite scale, exact byte count
        scale = float(arrays[SCALE][0])
        if scale < 0:
            raise BadReply(f"{RECORD}[{SCALE!r}] is {scale}, a scale ||p||_1 / N is >= 0")
        return arrays[PACKED], scale

    def plausibility_rule(self, current: ArrayRecord) -> Callable[[Any], str | None]:
        """Payload -> why its scale s exceeds MAX_SCALE_RATIO * max(1, ||x||_1 / N) for the
        round's global model x (module docstring), else None."""
        x = flatten(to_state(current, copy=False), self.model.param_keys).to(torch.float64)
        limit = MAX_SCALE_RATIO * max(1.0, float(x.abs().mean()))

        def implausible(payload: ScaledSigns) -> str | None:
            scale = payload[1]
            if scale <= limit:
                return None
            return (f"{RECORD}[{SCALE!r}] is {scale:.3g}, above the plausibility bound {limit:.3g} "
                    f"({MAX_SCALE_RATIO:g} x max(1, the model's mean |weight|)): one reply would move every weight that far")

        return implausible

    def sample_upload(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        signs = torch.from_numpy(rng.choice([-1.0, 1.0], size=self.model.num_params).astype(np.float32))
        return {PACKED: pack_signs(signs), SCALE: np.array([rng.uniform(0, 1)], np.float32)}

    def server_rule(self, server_round: int, current: ArrayRecord, replies: list[Reply[ScaledSigns]]) -> ArrayRecord:
        n = self.model.num_params
        updates = [scale * unpack_signs(packed, n).to(torch.float32) for packed, scale in (r.payload for r in replies)]
        delta = weighted_mean(updates, [1.0] * len(updates))  # (1/M) sum_m Delta_m, summed in float64
        return descend(current, self.model.param_keys, delta)
