"""No poison is committed (issue #21): a batch size no reply could report is refused before
a run starts, a checkpoint is checked as strictly as a reply, an implausible EF-signSGD
scale is rejected, a non-finite aggregate never becomes the global model, and a run that
cannot move its model stops and says so (exit 1, summary.json)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.cli import main
from fedsim.config import MAX_BATCH_SIZE

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "experiments" / "quick.toml")
TINY = {"strategy": "fedavg", "num-nodes": 4, "num-server-rounds": 4, "eval-every": 1, "lr": 0.1, "seed": 1}


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    return int(rc or 0), capsys.readouterr().err


# --- batch sizes above the reply bound ---------------------------------------------------


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ([f"batch-size={MAX_BATCH_SIZE + 1}"], f"batch-size={MAX_BATCH_SIZE + 1}: a batch size must be at most {MAX_BATCH_SIZE}"),
        (["batch-mode=0", f'batch-sizes="4,4,{MAX_BATCH_SIZE + 1},4,4,4,4,4,4,4"'], f"entry 2 (partition-id 2) is {MAX_BATCH_SIZE + 1}"),
    ],
)
def test_a_batch_size_above_the_reply_bound_is_one_line_exit_2_and_no_folder(settings, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    rc, err = _cli(["run", QUICK, *[a for s in settings for a in ("--set", s)], "--results-dir", str(results)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("fedsim: error: "), err
    assert fragment in lines[0] and "use a smaller batch size, or 0 for the whole local set" in lines[0]
    assert not results.exists() and list(tmp_path.iterdir()) == []


def test_the_largest_reportable_batch_size_is_accepted():
    from fedsim.validation import load_config

    assert load_config({"batch-size": MAX_BATCH_SIZE}).batch_size == MAX_BATCH_SIZE
    cfg = load_config({"num-nodes": 2, "batch-sizes": f"4,{MAX_BATCH_SIZE}"})
    assert cfg.batch_sizes.endswith(str(MAX_BATCH_SIZE))
