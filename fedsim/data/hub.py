"""The Hugging Face hub as a fallback source, with a bounded-time reachability check.

Offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, or the hub not answering within
``PROBE_TIMEOUT_S``) fails fast with a DataError instead of hanging in retries.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import numpy as np

from fedsim.data.errors import DataError

if TYPE_CHECKING:
    import datasets

REPOS = {"mnist": "ylecun/mnist", "fashion-mnist": "zalando-datasets/fashion_mnist", "cifar10": "uoft-cs/cifar10"}
PROBE_TIMEOUT_S = 5.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_env() -> str | None:
    """The offline variable that is set, if any."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").upper() in _TRUE:
            return var
    return None


def probe(repo: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers for ``repo`` within ``timeout`` seconds, else why not.

    Runs in a daemon thread so that a slow DNS lookup cannot stretch the wait.
    """
    outcome: list[str | None] = []

    def ask() -> None:
        try:
            from huggingface_hub import HfApi

            HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).dataset_info(repo, timeout=timeout)
            outcome.append(None)
        except Exception as exc:
            outcome.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "))

    thread = threading.Thread(target=ask, name="fedsim-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0] if outcome else f"no answer within {timeout:.0f} s"


def load_hub_arrays(name: str, how_to: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images uint8 [n, H, W(, 3)], labels int64 [n]), "test": ...} from the hub."""
    repo = REPOS[name]
    no_local = f"no local copy of {name} was given (data_dir is empty and $FEDSIM_DATA_DIR/{name} does not exist)"
    import datasets as hf

    var = offline_env()
    reason: str | None
    if var is not None and not hf.config.HF_HUB_OFFLINE:
        # Set after `datasets` was imported: the library would still go online, so stop here.
        reason = f"{var} is set"
    elif var is None:
        reason = probe(repo)
    else:
        reason = None  # the library is offline itself: only its local cache is tried
    if reason is not None:
        raise DataError(
            f"{no_local} and the Hugging Face hub is unreachable ({reason}), so {repo} cannot be fetched. {how_to}"
        )
    try:
        splits = hf.load_dataset(repo)
        return {split: hub_split_arrays(splits[split]) for split in ("train", "test")}
    except Exception as exc:
        raise DataError(f"{no_local} and loading {repo} from the Hugging Face hub failed ({exc}). {how_to}") from exc


def hub_split_arrays(split: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The split's one Image column and one ClassLabel column as numpy arrays."""
    import datasets as hf

    image = next((k for k, f in split.features.items() if isinstance(f, hf.Image)), None)
    label = next((k for k, f in split.features.items() if isinstance(f, hf.ClassLabel)), None)
    if image is None or label is None:
        raise DataError(f"hub split has no Image and ClassLabel columns: {dict(split.features)}")
    columns = split.with_format("numpy")[:]
    return np.asarray(columns[image], dtype=np.uint8), np.asarray(columns[label], dtype=np.int64)
