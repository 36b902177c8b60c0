"""fedsim's ClientApp: run the client step of the algorithm the server names.

The message's config names the algorithm (``algorithm``, a key of
fedsim.algorithms.REGISTRY); its hyperparameters come from the run config. The client's
partition comes from the node config (``partition-id``, ``num-partitions``, set by
Flower's simulation or by ``flower-supernode --node-config``); its batch size from the
node config's ``batch-size`` if given, else from the run config (``batch-size``,
``batch-sizes`` or ``batch-mode``); its device from the node config's ``device`` if given,
else from the run config's, never silently the CPU where the server trains on CUDA
(fedsim.device). Each reply reports the device it trained on (``cuda-device``). Data and
models come from this process's runtime (fedsim.runtime); the node's ``context.state``
carries what an algorithm keeps between its rounds (EF-signSGD's residual). A client
whose partition is among the run's ``attackers`` (fedsim.attacks) applies ``attack`` to
its upload.
"""

from __future__ import annotations

import functools
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim import protocol
from fedsim.algorithms import REGISTRY, ClientStep
from fedsim.attacks import HONEST, Attack, attacker_ids
from fedsim.arrays import load_into, to_array_record
from fedsim.config import RunConfig
from fedsim.device import client_device, device_code
from fedsim.runtime import runtime
from fedsim.seeding import generator

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run this round's client step on the local data and reply with its payload and metrics."""
    cfg = RunConfig.cached(context.run_config)
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            "this node has no partition-id/num-partitions in its node config; start the SuperNode with "
            "--node-config \"partition-id=K num-partitions=M\" (Flower's simulation sets them itself)"
        )
    pid, num = int(node["partition-id"]), int(node["num-partitions"])
    task_cfg = msg.content[protocol.CONFIG]
    name = str(task_cfg.get("algorithm", ""))
    if name not in REGISTRY:
        raise ValueError(f"unknown algorithm {name!r} in the train message; this client knows {sorted(REGISTRY)}")
    algorithm = REGISTRY[name]
    device = client_device(cfg.device, task_cfg.get("device"), str(node["device"]) if "device" in node else None)
    setup = runtime(cfg.dataset, cfg.data_dir, device).client(
        cfg, pid, num, int(node["batch-size"]) if "batch-size" in node else None
    )
    rnd = int(task_cfg["server-round"])
    load_into(setup.model, msg.content[protocol.ARRAYS])
    step = ClientStep(
        model=setup.model, data=setup.data, batch_size=setup.batch_size,
        generator=generator(cfg.seed, pid, rnd, device=setup.device),
        param_names=setup.param_names, state=context.state, server_round=rnd, attack=_attack(cfg, pid, num),
    )
    upload = algorithm.client_step(_hyperparams(algorithm, cfg), step)
    payload = {algorithm.record: to_array_record(upload.arrays)}
    if algorithm.sends_buffers and setup.float_buffers:
        payload[protocol.BUFFERS] = to_array_record({k: v.detach().cpu().numpy() for k, v in setup.float_buffers.items()})
    metrics = MetricRecord(
        {
            "num-examples": len(setup.data), "train-loss": upload.loss, "partition-id": pid, "batch-size": setup.batch_size,
            "cuda-device": device_code(setup.device),
        }
    )
    return Message(RecordDict({**payload, protocol.METRICS: metrics}), reply_to=msg)


@functools.lru_cache(maxsize=64)
def _hyperparams(algorithm: type, cfg: RunConfig) -> Any:
    """``algorithm.hyperparams(cfg)``, once per run config (RunConfig is frozen; a client
    parses the same config every round)."""
    return algorithm.hyperparams(cfg)


def _attack(cfg: RunConfig, partition_id: int, num_partitions: int) -> Attack:
    """This client's attack if its partition is one of the run's attackers, else HONEST."""
    if cfg.attackers == 0 or partition_id not in attacker_ids(cfg.seed, num_partitions, min(cfg.attackers, num_partitions)):
        return HONEST
    return Attack(cfg.attack, cfg.attack_scale, cfg.attack_noise)
