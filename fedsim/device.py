"""Which device trains: the run config's ``device``, resolved on the server and on every
client, so that a client never trains on the CPU without saying so.

- ``device = "auto"`` (default): the server uses CUDA when it has it, else the CPU, and
  sends the device *type* it resolved to with every train message. A client whose server
  trains on CUDA must find CUDA too, else it fails its reply with ``ClientDeviceError``,
  whose message says how to give clients a GPU share (Flower's simulation gives an actor
  that requests no GPU an empty ``CUDA_VISIBLE_DEVICES``, so such a client would
  otherwise train on the CPU without a word).
- ``device = "cpu"``, ``"cuda"`` or ``"cuda:N"``: that device, on the server and the
  clients; one that is not there is an error.
- A SuperNode's own ``--node-config "device='cpu'"`` wins over both (an edge device
  without a GPU in a federation whose server has one).

Each reply reports the device it trained on (metric ``cuda-device``: the CUDA index, -1
for the CPU) and ``summary.json`` records the set (``client_devices``).
"""

from __future__ import annotations

import functools
import re

import torch

from fedsim.errors import ConfigError

DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N'"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
CPU_CODE = -1  # the reply metric ``cuda-device`` for a client that trained on the CPU


class ClientDeviceError(RuntimeError):
    """A client cannot train on the device the run asks for; the message says how to fix it."""


def valid_device_name(name: str) -> bool:
    """Whether ``name`` is one of the forms the ``device`` key takes."""
    return bool(_DEVICE_RE.match(name))


@functools.cache
def cuda_count() -> int:
    """CUDA devices this process sees (0 without CUDA), read once per process."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means in this process; ConfigError for CUDA that is not here."""
    if not valid_device_name(name):
        raise ConfigError(f"device={name!r}: choose {DEVICE_FORMS}")
    if name == "auto":
        return torch.device("cuda" if cuda_count() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    index = int(name.partition(":")[2] or 0)  # read here: torch.device keeps the index in 8 bits
    if index >= cuda_count():
        seen = f"{cuda_count()} CUDA device(s)" if cuda_count() else "no CUDA device"
        raise ConfigError(f"device={name!r}, but this process sees {seen}; use device='auto' or 'cpu'")
    return torch.device(name)


def client_device(run_device: str, server_device_type: str | None, node_device: str | None = None) -> torch.device:
    """The device a client trains on: the node config's ``device`` if set, else the run
    config's; with ``auto``, CUDA is required when the server resolved to CUDA
    (``server_device_type``, sent with each train message). Raises ClientDeviceError."""
    if node_device:
        return _on_client(node_device, "the node config's device")
    if run_device == "auto" and server_device_type == "cuda" and not cuda_count():
        raise ClientDeviceError(
            "the server trains on CUDA but this client sees no GPU, so it would train on the CPU; give each client "
            "a GPU share (flwr run: --federation-config \"client-resources-num-gpus=0.25 ...\"; fedsim run --engine "
            "flower: --gpus-per-client 0.25), or set device='cpu' in the run config to train on the CPU everywhere "
            "(a SuperNode without a GPU: --node-config \"... device='cpu'\")"
        )
    return _on_client(run_device, "the run config's device")


def _on_client(name: str, source: str) -> torch.device:
    try:
        return resolve_device(name)
    except ConfigError as err:
        raise ClientDeviceError(f"{source}: {err}") from None


def device_code(device: torch.device) -> int:
    """The reply metric ``cuda-device``: the CUDA index, or -1 for the CPU."""
    return (device.index or 0) if device.type == "cuda" else CPU_CODE


def device_label(code: int) -> str:
    """``cpu`` or ``cuda:N`` for a ``cuda-device`` metric value."""
    return "cpu" if code == CPU_CODE else f"cuda:{code}"


def default_gpu_share(num_nodes: int, cpus_per_client: float, num_cpus: int, num_gpus: int) -> float:
    """Ray GPU share per client so that every client actor that can run at once (limited by
    CPUs and nodes) fits on the GPUs: min(1, num_gpus / concurrent), rounded down to 1e-4
    (Ray's resolution for fractions), 0 without GPUs."""
    if num_gpus <= 0:
        return 0.0
    concurrent = max(1, min(num_nodes, int(num_cpus // cpus_per_client) if cpus_per_client > 0 else num_nodes))
    if num_gpus >= concurrent:
        return 1.0
    return int(num_gpus / concurrent * 10_000) / 10_000
