#!/usr/bin/env python
"""Cost per example of one fv-mnist-cnn minibatch gradient on one CPU thread, by batch size,
as one batch ("whole") and in micro-batches ("parts", fedsim.clients.tasks.MICRO_BATCH), with
glibc's default malloc settings and with fedsim.engine.runner.keep_freed_memory.

    python benchmarks/bench_microbatch.py      # about 1 minute on 2 cores

Each setting runs in its own process (malloc settings cannot be undone); best of 5 timings.
Random inputs: the cost does not depend on the pixel values.
"""

from __future__ import annotations

import subprocess
import sys
import time

SIZES = (4, 64, 154, 904)


def measure(tuned: bool) -> str:
    """One line: microseconds per example for each batch size, whole and in parts."""
    import torch

    from fedsim.clients import tasks
    from fedsim.clients.tasks import LocalData, flat_gradient
    from fedsim.engine.runner import keep_freed_memory
    from fedsim.models import build_model
    from fedsim.seeding import generator

    torch.set_num_threads(1)
    if tuned:
        keep_freed_memory()
    model = build_model("fv-mnist-cnn", num_classes=10, seed=0)
    x, y = torch.randn(2000, 1, 28, 28), torch.randint(0, 10, (2000,))
    data = LocalData(x, y, torch.arange(2000))
    parts = tasks.MICRO_BATCH
    out = []
    for b in SIZES:
        for label, micro in (("whole", 10**9), ("parts", parts)):
            if label == "parts" and b <= parts:
                continue
            tasks.MICRO_BATCH = micro
            flat_gradient(model, data, b, generator(0, 1, 0))  # warm-up
            best = min(_timed(lambda r=r, b=b: flat_gradient(model, data, b, generator(0, 1, r))) for r in range(5))
            out.append(f"B={b} {label} {best / b * 1e6:.0f}")
    return f"{'keep_freed_memory' if tuned else 'default malloc':17s} us/example: " + ", ".join(out)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("default", "tuned"):
        print(measure(sys.argv[1] == "tuned"), flush=True)
        return 0
    for _ in range(2):  # alternate, so that drift in the machine's load hits both
        for which in ("default", "tuned"):
            subprocess.run([sys.executable, __file__, which], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
