"""``fedsim split X.toml OUT``: one ``save_to_disk`` folder per device, cut from a data set
as a run of X would partition it, for trying a deployment on the devices' own data.

Device k's folder ``OUT/device-k`` holds a ``DatasetDict``: ``train`` (its partition) and,
with ``--test-fraction F > 0``, ``test`` (F of its partition, seeded per device) as the
``image`` column (float32 arrays, already normalised as fedsim normalises the data set:
run with ``normalize = "none"``) and a ``label`` column (ClassLabel). ``OUT/README.md``
says how it was made and the run-config keys a run on it needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedsim.config import ConfigError, RunConfig
from fedsim.plan import hold_out, server_plan


def split_for_devices(cfg: RunConfig, out: str | Path, test_fraction: float = 0.0) -> list[Path]:
    """Write one folder per client of ``cfg``'s partitioning (module docstring); returns them."""
    import datasets  # lazy: writing save_to_disk folders is this command's only use of it

    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"fedsim split: {root} is not empty; choose a new folder")
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"fedsim split: --test-fraction {test_fraction} must be in [0, 1)")
    plan = server_plan(cfg)
    if not plan.splits.classification:
        raise ConfigError("fedsim split writes class labels; a regression data set is not supported")
    parts, tests = plan.partitions, None
    if test_fraction > 0:
        parts, tests = hold_out(parts, test_fraction, cfg.seed)
    x, y = plan.splits.x_train.numpy(), plan.splits.y_train.numpy()
    features = datasets.Features({
        "image": datasets.Array3D(shape=x.shape[1:], dtype="float32") if x.ndim == 4 else datasets.Sequence(datasets.Value("float32")),
        "label": datasets.ClassLabel(num_classes=plan.num_classes),
    })
    folders = []
    for k, idx in enumerate(parts):
        split = {"train": datasets.Dataset.from_dict({"image": x[idx], "label": y[idx]}, features=features)}
        if tests is not None:
            split["test"] = datasets.Dataset.from_dict({"image": x[tests[k]], "label": y[tests[k]]}, features=features)
        folder = root / f"device-{k}"
        datasets.DatasetDict(split).save_to_disk(str(folder))
        folders.append(folder)
    _describe(root, cfg, plan.input_shape, plan.num_classes, [len(p) for p in parts], test_fraction)
    return folders


def _describe(root: Path, cfg: RunConfig, shape: tuple[int, ...], k: int, sizes: list[int], test_fraction: float) -> None:
    keys = {"dataset": "disk", "normalize": "none", "num-classes": k, "input-shape": ",".join(map(str, shape))}
    (root / "README.md").write_text(
        f"# Per-device data cut from {cfg.dataset}\n\n"
        f"`fedsim split` with partitioning={cfg.partitioning!r}, num-nodes={cfg.num_nodes}, seed={cfg.seed}, "
        f"test fraction {test_fraction}: training examples per device {sizes}.\n\n"
        "A run on these folders (each SuperNode with `--node-config \"dataset-path='<its folder>'\"`) needs:\n\n"
        "```toml\n" + "".join(f"{key} = {json.dumps(v)}\n" for key, v in keys.items()) + "```\n"
    )
    np.savetxt(root / "sizes.csv", np.asarray(sizes, dtype=np.int64), fmt="%d")
