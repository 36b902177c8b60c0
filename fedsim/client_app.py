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
carries what an algorithm keeps between its rounds (EF-signSGD's residual) and, under
``downlink = "signs"``, the global model the node holds, from which it rebuilds the next
from the server's votes (fedsim.algorithms.downlink). A client
whose partition is among the run's ``attackers`` (fedsim.attacks) applies ``attack`` to
its upload.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim import protocol
from fedsim.algorithms import REGISTRY, Algorithm, ClientStep
from fedsim.algorithms.downlink import VOTES, model_for_round
from fedsim.arrays import load_into, to_array_record
from fedsim.attacks import HONEST, SERVER_PLAYED, Attack
from fedsim.config import RunConfig
from fedsim.device import client_device, device_code
from fedsim.plan import RunPlan, client_plan, node_plan, own_data
from fedsim.runtime import evaluate, runtime
from fedsim.seeding import generator
from fedsim.validation import load_config_cached

app = ClientApp()


@dataclass(frozen=True)
class _Message:
    """What a train or evaluate message means to this node; ``own`` is a node on its own
    data (``dataset-path``), whose plan holds its data as partition 0 and whose replies
    carry no partition id (the server knows it by its node id)."""

    cfg: RunConfig
    partition_id: int
    plan: RunPlan
    device: torch.device
    task: ConfigRecord
    arrays: ArrayRecord | None  # None: a train message of the signs downlink (votes instead of the model)
    own: bool


def _read(msg: Message, context: Context) -> _Message:
    """The run config, this node's data and plan, its device and the message's records;
    ValueError or ConfigError (an error reply) saying what is missing and how to fix it."""
    cfg = load_config_cached(context.run_config)
    node = context.node_config
    task, arrays = msg.content.get(protocol.CONFIG), msg.content.get(protocol.ARRAYS)
    votes = msg.metadata.message_type == MessageType.TRAIN and isinstance(msg.content.get(VOTES), ArrayRecord)
    if not isinstance(task, ConfigRecord) or not (isinstance(arrays, ArrayRecord) or votes):
        raise ValueError(f"the message lacks ConfigRecord {protocol.CONFIG!r} or ArrayRecord {protocol.ARRAYS!r}")
    arrays = arrays if isinstance(arrays, ArrayRecord) else None
    server_device = task.get("device")
    device = client_device(cfg.device, None if server_device is None else str(server_device), str(node["device"]) if "device" in node else None)
    if own_data(cfg):
        if "dataset-path" not in node:
            raise ValueError(
                f"this run trains on each node's own data (dataset={cfg.dataset!r}, no data-dir): start the SuperNode with "
                "--node-config \"dataset-path='/path/to/its/data'\""
            )
        return _Message(cfg, 0, node_plan(cfg, str(node["dataset-path"])), device, task, arrays, own=True)
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            "this node has no partition-id/num-partitions in its node config; start the SuperNode with "
            "--node-config \"partition-id=K num-partitions=M\" (Flower's simulation sets them itself), or, on its own "
            "data, run with dataset = 'disk' (or 'imagefolder', 'npz') and no data-dir, and --node-config \"dataset-path=...\""
        )
    plan = client_plan(cfg, int(str(node["num-partitions"])))
    return _Message(cfg, int(str(node["partition-id"])), plan, device, task, arrays, own=False)


def _attack(m: _Message, node: Mapping[str, Any]) -> Attack:
    """This node's attack: the node config's ``attacker`` (true/false) wins over the run's
    seeded draw (which a node on its own data has no partition for)."""
    if "attacker" in node:
        flag = str(node["attacker"]).lower() in ("1", "true", "yes")
        if flag and m.cfg.attack in SERVER_PLAYED:
            raise ValueError(f"attack={m.cfg.attack!r} is played by the server for the run config's attackers (attackers, attacker-ids), "
                             "not by a node: remove attacker from this node's --node-config and name its partition in attacker-ids")
        return Attack.of(m.cfg) if flag else HONEST
    return HONEST if m.own else m.plan.attack_of(m.partition_id)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run this round's client step on the local data and reply with its payload and metrics."""
    m = _read(msg, context)
    name = str(m.task.get("algorithm", ""))
    if name not in REGISTRY:
        raise ValueError(f"unknown algorithm {name!r} in the train message; this client knows {sorted(REGISTRY)}")
    algorithm = REGISTRY[name]
    node = context.node_config
    setup = runtime(m.plan, m.device).client(m.plan, m.partition_id, int(str(node["batch-size"])) if "batch-size" in node else None)
    rnd = int(str(m.task["server-round"]))
    # the model itself, or under downlink = "signs" the one rebuilt from the node's own and the votes
    load_into(setup.model, model_for_round(msg.content, context.state, rnd, setup.param_names, m.cfg.lr))
    step = ClientStep(
        model=setup.model, data=setup.data, batch_size=setup.batch_size,
        generator=generator(m.cfg.seed, m.partition_id, rnd, device=setup.device), param_names=setup.param_names,
        state=context.state, server_round=rnd, attack=_attack(m, node), objective=m.plan.objective,
    )
    upload = algorithm.client_step(_hyperparams(algorithm, m.cfg), step)
    payload: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {algorithm.record: to_array_record(upload.arrays)}
    if algorithm.sends_buffers and setup.float_buffers:
        payload[protocol.BUFFERS] = to_array_record({k: v.detach().cpu().numpy() for k, v in setup.float_buffers.items()})
    payload[protocol.METRICS] = MetricRecord(
        {
            "num-examples": len(setup.data), "train-loss": upload.loss, **({} if m.own else {"partition-id": m.partition_id}),
            "batch-size": setup.batch_size, "cuda-device": device_code(setup.device),
        }
    )
    return Message(RecordDict(payload), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Federated evaluation: the global model on this client's held-out examples (its
    ``local-test-fraction`` of the partition); replies with ``num-examples``, ``loss``,
    ``partition-id`` and the task's metrics."""
    m = _read(msg, context)
    if m.plan.local_test is None:
        raise ValueError("this run holds no local test data (eval-fraction = 0): federated evaluation is off")
    if m.arrays is None:
        raise ValueError(f"the evaluate message lacks ArrayRecord {protocol.ARRAYS!r}")
    rt = runtime(m.plan, m.device)
    setup = rt.client(m.plan, m.partition_id)
    load_into(setup.model, m.arrays)
    rows = torch.tensor(m.plan.local_test[m.partition_id], dtype=torch.long, device=m.device)  # a copy: the table is read-only
    x = rt.x_train[rows]
    x = m.plan.eval_transform(x) if m.plan.eval_transform is not None else x
    loss, values = evaluate(setup.model, x, rt.y_train[rows], m.plan.objective)
    metrics = MetricRecord({"num-examples": len(rows), "loss": loss, **({} if m.own else {"partition-id": m.partition_id}), **values})
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=msg)


@functools.lru_cache(maxsize=64)
def _hyperparams(algorithm: type[Algorithm[Any, Any]], cfg: RunConfig) -> Any:
    """``algorithm.hyperparams(cfg)``, once per run config (RunConfig is frozen; a client
    parses the same config every round)."""
    return algorithm.hyperparams(cfg)
