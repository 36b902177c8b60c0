"""fedsim's ClientApp: one train handler that does what the strategy's config asks.

- ``local-epochs`` (FedAvg): E epochs of SGD from the received model, reply the model;
- ``gradient`` (FedSGD): one gradient over B examples (B = 0: the whole local set);
- ``sign`` (signSGD-MV / -FV): the sign of one minibatch gradient, packed 1 bit/coordinate.

The client's partition comes from the node config (``partition-id``, ``num-partitions``,
set by Flower's simulation or by ``flower-supernode --node-config``); its batch size from
the node config's ``batch-size`` if given, else from the run config (``batch-size``,
``batch-sizes`` or ``batch-mode``); its device from the node config's ``device`` if given,
else from the run config's, never silently the CPU where the server trains on CUDA
(fedsim.device). Each reply reports the device it trained on (``cuda-device``). Heavy modules (datasets, models) load lazily and are
cached per process.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim import protocol
from fedsim.arrays import to_array_record
from fedsim.clients.setup import client_setup
from fedsim.clients.tasks import flat_gradient, local_epochs, minibatch_gradient
from fedsim.config import RunConfig
from fedsim.device import client_device, device_code
from fedsim.seeding import generator
from fedsim.strategies.model_vector import load_into
from fedsim.strategies.signs import pack_signs

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run this round's task on the local data and reply with its payload and metrics."""
    cfg = RunConfig.cached(context.run_config)
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            "this node has no partition-id/num-partitions in its node config; start the SuperNode with "
            "--node-config \"partition-id=K num-partitions=M\" (Flower's simulation sets them itself)"
        )
    pid, num = int(node["partition-id"]), int(node["num-partitions"])
    task_cfg = msg.content[protocol.CONFIG]
    device = client_device(cfg.device, task_cfg.get("device"), str(node["device"]) if "device" in node else None)
    setup = client_setup(cfg, pid, num, int(node["batch-size"]) if "batch-size" in node else None, device)
    task, rnd = str(task_cfg["task"]), int(task_cfg["server-round"])

    model = setup.model
    load_into(model, msg.content[protocol.ARRAYS])
    g = generator(cfg.seed, pid, rnd, device=setup.device)

    if task == protocol.TASK_LOCAL_EPOCHS:
        loss, _ = local_epochs(model, setup.data, int(task_cfg["local-epochs"]), setup.batch_size, float(task_cfg["lr"]), g)
        payload = {protocol.ARRAYS: to_array_record(_numpy(model.state_dict()))}
    elif task == protocol.TASK_GRADIENT:
        grads, loss, _ = minibatch_gradient(model, setup.data, setup.batch_size, g)
        payload = {protocol.GRADS: to_array_record(_numpy(dict(zip(setup.param_names, grads, strict=True))))}
    elif task == protocol.TASK_SIGN:
        vec, loss, _ = flat_gradient(model, setup.data, setup.batch_size, g)
        payload = {protocol.SIGNS: to_array_record({protocol.PACKED: pack_signs(vec)})}
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {protocol.TASKS}")

    if task != protocol.TASK_LOCAL_EPOCHS:
        buffers = setup.float_buffers
        if buffers:
            payload[protocol.BUFFERS] = to_array_record(_numpy(buffers))
    metrics = MetricRecord(
        {
            "num-examples": len(setup.data), "train-loss": loss, "partition-id": pid, "batch-size": setup.batch_size,
            "cuda-device": device_code(setup.device),
        }
    )
    return Message(RecordDict({**payload, protocol.METRICS: metrics}), reply_to=msg)


def _numpy(tensors: dict) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}
