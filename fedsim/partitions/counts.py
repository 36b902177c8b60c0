"""Label counts per client: the matrix, a printable table, a stacked-bar PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fedsim.partitions.table import IndexTable


def label_counts(labels: np.ndarray, partitions: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Counts[i, c]: how many examples of label c client i holds (int64, rows sum to sizes).

    An ``IndexTable`` is counted in one pass (``bincount`` of client x C + label), any N."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    labels = labels.astype(np.int64, copy=False)
    if isinstance(partitions, IndexTable):
        keys = partitions.owners() * num_classes + labels[partitions.flat]
        return np.bincount(keys, minlength=len(partitions) * num_classes).reshape(len(partitions), num_classes)
    counts = np.zeros((len(partitions), num_classes), dtype=np.int64)
    for i, idx in enumerate(partitions):
        counts[i] = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=num_classes)
    return counts


def format_label_counts(counts: np.ndarray) -> str:
    """One row per client: its count of each label ("." for none), total, distinct labels."""
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be 2-D [clients, classes], got shape {counts.shape}")
    num_clients, num_classes = counts.shape
    width = max(len(str(int(counts.max()))) if counts.size else 1, len(str(num_classes - 1)), 1)
    totals = counts.sum(axis=1)
    twidth = max(len("total"), len(str(int(totals.max()))) if totals.size else 1)
    cwidth = max(len("client"), len(str(num_clients - 1)))
    header = (
        f"{'client':>{cwidth}} | "
        + " ".join(f"{c:>{width}}" for c in range(num_classes))
        + f" | {'total':>{twidth}} | labels"
    )
    lines = [header, "-" * len(header)]
    for i, row in enumerate(counts):
        cells = " ".join(f"{int(v):>{width}}" if v else f"{'.':>{width}}" for v in row)
        lines.append(f"{i:>{cwidth}} | {cells} | {int(totals[i]):>{twidth}} | {int(np.count_nonzero(row)):>6}")
    return "\n".join(lines)


def plot_label_counts(counts: np.ndarray, path: str | os.PathLike, *, title: str = "Label counts per client") -> None:
    """Write a PNG: one stacked bar per client, one colour per label (matplotlib, Agg).

    flwr_datasets.visualization.plot_label_distributions needs a partitioner, not
    counts, so this is plain matplotlib. No pyplot: the global backend is untouched.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be 2-D [clients, classes], got shape {counts.shape}")
    num_clients, num_classes = counts.shape
    fig = Figure(figsize=(min(max(6.0, 0.15 * num_clients + 2.0), 40.0), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if num_classes <= 20:
        cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
        colors = [cmap(c) for c in range(num_classes)]
    else:
        colors = [matplotlib.colormaps["viridis"](c / (num_classes - 1)) for c in range(num_classes)]
    x = np.arange(num_clients)
    bottom = np.zeros(num_clients)
    for c in range(num_classes):
        ax.bar(x, counts[:, c], bottom=bottom, width=0.85, color=colors[c], label=str(c), linewidth=0)
        bottom += counts[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.set_xlim(-0.6, num_clients - 0.4)
    if num_classes <= 20:
        ax.legend(title="label", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    fig.savefig(os.fspath(path), format="png", dpi=100)
