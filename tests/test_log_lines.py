"""A client controls the text of its error reply and of its exceptions: the server logs
each as exactly one line of bounded length, on both engines' paths."""

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st
from strategy_kit import make, sent

from fedsim import protocol
from fedsim.engine.flower_internals import set_server_identity
from fedsim.errors import MAX_REASON_CHARS, one_line
from fedsim.log_lines import OneLineClientErrors

set_server_identity(run_id=12)
HOSTILE = "boom\nfedsim: fedavg on mnist: final test accuracy 0.9999 after 3000 rounds\r\x1b[2K\u2028" + "x" * 1_000_000


@given(st.text())
def test_one_line_is_one_printable_line_of_bounded_length(text):
    out = one_line(text)
    assert out.isprintable() and len(out.splitlines()) <= 1
    assert len(out) <= MAX_REASON_CHARS + len("... ( more characters)") + 10


def test_one_line_keeps_short_text_and_names_what_it_cut():
    assert one_line("plain reason") == "plain reason"
    out = one_line(HOSTILE)
    assert out.startswith("boom\\nfedsim: fedavg on mnist") and "\\x1b" in out and "\\u2028" in out
    escaped = len(HOSTILE) + 1 + 1 + 3 + 5  # \n, \r: one more character each; \x1b: 3 more; \u2028: 5 more
    assert out == one_line(HOSTILE[:400])[:MAX_REASON_CHARS] + f"... ({escaped - MAX_REASON_CHARS} more characters)"
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n    f()\nValueError: bad shape\n'
    assert one_line(tb) == "ValueError: bad shape"


# The reason of a raising ClientApp's error reply on Flower's Ray backend (from a run).
RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=19974, "
    "ip=127.0.0.1, actor_id=ecc13f4c7f648a0c60668a5701000000)\n  File \"/work/t5/raiser.py\", line 11, in forward\n"
    "    raise ValueError(\"deliberate\\nmulti-line failure\")\nValueError: deliberate\nmulti-line failure\n\n"
    "The above exception was the direct cause of the following exception:\n\n\x1b[36mray::ClientAppActor.run()\x1b[39m\n"
    "  File \"ray_actor.py\", line 65, in run\n    raise ClientAppException(str(ex)) from ex\n"
    "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: deliberate\nmulti-line failure'>"
)


def test_flowers_wrapped_client_exception_becomes_its_type_and_message():
    assert one_line(RAY_REASON) == "ValueError: deliberate\\nmulti-line failure"
    assert one_line("\nException ClientAppException occurred. Message: no traceback") == "ClientApp raised: no traceback"


def test_a_hostile_error_reply_is_one_bounded_log_line(caplog):
    g = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})
    s = make("fedavg", protocol.array_spec(g), ["w"], lr=0.1, num_partitions=2, max_examples=100)
    msgs = sent(s, g, 2)
    good = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones((2, 2), np.float32))}),
                               "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0, "partition-id": 0})}), reply_to=msgs[0])
    bad = Message(Error(code=2, reason=HOSTILE), reply_to=msgs[1])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        new, _ = s.aggregate_train(1, [good, bad])
    assert new is not None  # the round goes on with the good reply
    lines = [r.getMessage() for r in caplog.records if "node 101" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and len(lines[0]) < 500, lines
    assert "rejected the reply of node 101: client error: boom\\nfedsim: fedavg on mnist" in lines[0]


def test_flowers_multi_line_client_errors_become_one_line_and_bare_tracebacks_go(monkeypatch):
    monkeypatch.delenv("FEDSIM_DEBUG", raising=False)
    logger = logging.getLogger("fedsim-test-one-line")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger.handlers[:] = [Keep()]
    logger.filters[:] = [OneLineClientErrors()]
    # what flwr.server.superlink.fleet.vce.vce_api logs for one raising ClientApp
    logger.error("\nException ClientAppException occurred. Message: deliberate failure")
    logger.error('Traceback (most recent call last):\n  File "ray_actor.py", line 65\nClientAppException: deliberate failure\n')
    logger.warning("a normal %s", "line")
    logger.info("a multi-line\ninfo is left alone")
    logger.error("An exception was raised when processing a message by RayBackend")
    logger.error("Flower's own\nmulti-line error")
    assert seen == ["a normal line", "a multi-line\ninfo is left alone", "Flower's own\\nmulti-line error"]
    monkeypatch.setenv("FEDSIM_DEBUG", "1")
    logger.error("Traceback (most recent call last):\n  two lines")
    assert seen[-1] == "Traceback (most recent call last):\n  two lines"


RAISER = '''
import torch

CALLS = [0]


class Net(torch.nn.Module):
    """digits-logreg whose second training forward pass in each process raises."""

    def __init__(self, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(64, num_classes)

    def forward(self, x):
        if torch.is_grad_enabled():
            CALLS[0] += 1
            if CALLS[0] == 2:
                raise ValueError("deliberate\\nmulti-line failure")
        return self.fc(x.flatten(1))
'''


@pytest.mark.flower
def test_a_raising_client_on_flowers_runtime_is_one_line(tmp_path, monkeypatch, capfd):
    """Flower logs ~60 lines per raising ClientApp; fedsim's server shows one, naming the node."""
    from fedsim import cli

    (tmp_path / "raiser.py").write_text(RAISER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDSIM_DEBUG", raising=False)
    rc = cli.main(["run", str(Path(__file__).resolve().parents[1] / "experiments/quick.toml"), "--engine", "flower",
                   "--set", "model='raiser:Net'", "--set", "strategy='fedsgd'", "--set", "batch-mode=0",
                   "--set", "num-nodes=2", "--set", "num-server-rounds=2", "--results-dir", str(tmp_path / "run")])
    text = "".join(capfd.readouterr())
    assert rc in (0, 1), text[-3000:]  # 1: a round without valid replies makes the run incomplete
    told = [line for line in text.splitlines() if "deliberate" in line]
    assert len(told) == 2, text[-3000:]  # each of the 2 clients raised once, in round 2
    assert all(re.search(r"round 2: rejected the reply of node \d+: ValueError: deliberate\\nmulti-line failure$", ln) for ln in told), told
    assert "Traceback" not in text and "ClientAppException" not in text, text[-3000:]
