"""The README's tables say what the code has: every registered algorithm has a row in the
strategy table, and every run-config key a row in the key table (no more, no fewer)."""

from __future__ import annotations

import re
from pathlib import Path

from fedsim.algorithms import REGISTRY
from fedsim.validation import load_config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def table_after(heading: str) -> list[str]:
    """The first column of the first Markdown table after ``heading``."""
    section = README.split(f"\n{heading}\n", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    start = section.splitlines().index(rows[0])
    lines = section.splitlines()[start:]
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append(line.split("|")[1].strip())
    return table[2:]  # below the header and the |---| line


def test_the_strategy_table_lists_the_registry():
    names = [re.fullmatch(r"`([^`]+)`", cell).group(1) for cell in table_after("## Strategies")]
    assert sorted(names) == sorted(REGISTRY)


def test_the_key_table_lists_every_run_config_key():
    keys = [k for cell in table_after("## Run-config keys") for k in re.findall(r"`([a-z0-9-]+)`", cell)]
    assert len(keys) == len(set(keys)), "a key has two rows"
    assert sorted(keys) == sorted(load_config({}).to_mapping())
