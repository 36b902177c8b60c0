"""Will the server's per-client state fit? Checked before round 1.

The LLR vote and signSGD-FD keep a row of counts per client they have heard from
(``Algorithm.state_bytes_per_client``: 4 bytes per coordinate). A run can hear from at
most min(clients, rounds x clients per round) of them; while the table grows
(fedsim.core.client_table, x1.5 steps) the old and the new storage exist together, up
to 5/3 of the final size.
"""

from __future__ import annotations

import os

import torch

from fedsim.algorithms import REGISTRY
from fedsim.config import ConfigError, RunConfig

GROWTH_PEAK = 5 / 3  # old + new storage while a table grows by 1.5x


def clients_heard(cfg: RunConfig, num_clients: int) -> int:
    """The most distinct clients a run can hear from: all of them, or rounds x per round."""
    per_round = num_clients if cfg.fraction_train >= 1 else max(1, round(cfg.fraction_train * num_clients))
    return min(num_clients, cfg.num_server_rounds * per_round)


def state_clients(num_nodes: int, own_data: bool) -> int:
    """The clients the server may keep state for: the partitions, or on the nodes' own data
    4 per expected node (fedsim.strategies.build_strategy's cap)."""
    return 4 * num_nodes if own_data else num_nodes


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the GPU's free bytes, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_state_fits(cfg: RunConfig, num_params: int, num_clients: int, device: torch.device, free: int | None = None) -> int:
    """The bytes the algorithm's per-client state can reach; ConfigError (one line: the
    bytes, the law and the fixes) when that, at its growth peak, exceeds ``free`` (default:
    what ``device`` has free now)."""
    per_client = REGISTRY[cfg.strategy].state_bytes_per_client(cfg, num_params)
    clients = clients_heard(cfg, num_clients)
    need = per_client * clients
    if need == 0:
        return 0
    free = available_bytes(device) if free is None else free
    if need * GROWTH_PEAK > free:
        raise ConfigError(
            f"strategy={cfg.strategy!r} keeps {per_client:,} bytes per client ({num_params:,} coordinates x 4 bytes + its "
            f"round count), {need / 1e9:.1f} GB for the {clients:,} clients this run can hear from (up to "
            f"{need * GROWTH_PEAK / 1e9:.1f} GB while the table grows), more than the {free / 1e9:.1f} GB free on {device}; "
            f"use fewer clients (num-nodes) or rounds x fraction-train, a smaller model, or strategy 'sign-mv' (no per-client state)"
        )
    return need
