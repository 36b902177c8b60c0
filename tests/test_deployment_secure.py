"""Real deployment, secure, on loopback: the sequence of docs/deployment.md. A TLS
SuperLink with SuperNode authentication; four registered SuperNodes: partitions 0, 1, 2
(batch sizes 4, 64, 16), bound ahead of time by ``node-partitions``, and an impostor
with the lowest node id that also claims partition 0; an unregistered
and an insecure SuperNode, which must be refused; ``flwr run`` of 2 rounds of the LLR
vote, during which the SuperNode of partition 2 is SIGKILLed after round 1.

One federation and one run serve every test here (a deployed round takes 20-60 s on 2
cores: each message starts a fresh ClientApp process). Every process is stopped by PID
and the fixture checks that none is left.
"""

from __future__ import annotations

import csv
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy import make_node_key, make_tls_files

from fedsim.engine.flower_runtime import PROJECT_ROOT, LocalSuperLink

pytestmark = pytest.mark.flower

# (name, node config); the impostor is given the lowest node id, so without node-partitions
# it would win partition 0 in round 1 (the first-claim rule) and the honest p0 would lose it
HONEST = [
    ("p0", "partition-id=0 num-partitions=3 batch-size=4"),
    ("p1", "partition-id=1 num-partitions=3 batch-size=64"),
    ("p2", "partition-id=2 num-partitions=3 batch-size=16"),  # killed after round 1
]
IMPOSTOR = "partition-id=0 num-partitions=3 batch-size=32"
# round-timeout: above the ~60 s Flower takes to mark a SIGKILLed SuperNode offline (2 missed
# 30 s heartbeats), after which the SuperLink answers its pending message with an error
RUN_CONFIG = "strategy='llr-vote' lr=0.01 llr-warmup=1 num-server-rounds=2 num-nodes=4 node-wait=60 round-timeout=120 seed=0"


@dataclass
class SecureRun:
    results: Path
    log: str  # flwr run --stream: the ServerApp's log
    node_ids: dict[str, int]  # registered SuperNodes: name -> node id
    refused: dict[str, tuple[int | None, str]]  # unregistered / insecure: exit code, log
    online: set[int]  # node ids `flwr supernode ls` listed online before the run
    left: list[int]  # processes found after stopping everything


def bound(node_ids: dict[str, int]) -> str:
    """The run config's node-partitions: each honest node id -> its partition."""
    return ",".join(f"{node_ids[name]}:{i}" for i, (name, _) in enumerate(HONEST))


def rounds_csv(results: Path) -> list[dict[str, str]]:
    with open(results / "rounds.csv") as f:
        return list(csv.DictReader(f))


def wait_for_round(results: Path, rnd: int, run: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        if (results / "rounds.csv").exists() and any(r["round"] == str(rnd) for r in rounds_csv(results)):
            return
        time.sleep(0.5)
    raise AssertionError(f"round {rnd} did not finish within {timeout:.0f} s (flwr run exit code {run.poll()})")


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory) -> SecureRun:
    tmp = tmp_path_factory.mktemp("secure")
    home, results = tmp / "flwr-home", tmp / "results"
    home.mkdir()
    tls = make_tls_files(tmp / "certs")
    keys = {name: make_node_key(tmp / "keys", name) for name in ("a", "b", "c", "d", "unregistered")}
    run: subprocess.Popen[str] | None = None
    with LocalSuperLink(home, simulation=False, tls=tls, supernode_auth=True) as link:
        try:
            registered = sorted((link.register(keys[k].public), k) for k in "abcd")
            nodes = [("impostor", IMPOSTOR), *HONEST]
            node_ids = {name: node for (node, _), (name, _) in zip(registered, nodes, strict=True)}
            for (_, key), (name, node_config) in zip(registered, nodes, strict=True):
                link.start_supernode(name, node_config, private_key=keys[key].private)
            link.start_supernode("unregistered", HONEST[1][1], private_key=keys["unregistered"].private)
            link.start_supernode("insecure", HONEST[1][1], insecure=True, extra=["--max-retries", "1"])
            refused = {}
            for name in ("unregistered", "insecure"):
                try:
                    code: int | None = link.supernodes[name].wait(timeout=60)
                except subprocess.TimeoutExpired:
                    code = None
                refused[name] = (code, link.log_text(name))
            ls = link.flwr("supernode", "ls", link.connection, "--format", "json")
            listed = json.loads(ls.stdout[ls.stdout.index("{"):])["nodes"]
            online = {int(n["node-id"]) for n in listed if n["status"] == "online"}

            run = subprocess.Popen(
                ["flwr", "run", str(PROJECT_ROOT), link.connection, "--stream",
                 "--run-config", f"{RUN_CONFIG} results-dir='{results}' node-partitions='{bound(node_ids)}'"],
                env=link.env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            wait_for_round(results, 1, run, timeout=300)
            link.kill_supernode("p2")
            out, _ = run.communicate(timeout=400)
        finally:
            if run is not None and run.poll() is None:
                run.kill()
                run.wait(timeout=30)
    (home / "flwr-run.log").write_text(out)
    assert run.returncode == 0, out[-3000:]
    return SecureRun(results, out, node_ids, refused, online, link.stragglers + link.leftovers())


def test_registered_supernodes_train_the_llr_vote_over_tls_and_results_are_written(secure_run: SecureRun) -> None:
    assert not secure_run.left, f"processes left running: {secure_run.left}"
    assert secure_run.online == set(secure_run.node_ids.values())
    rows = rounds_csv(secure_run.results)
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert (int(rows[1]["clients"]), int(rows[1]["rejected"])) == (3, 1), rows[1]  # the impostor's reply
    summary = json.loads((secure_run.results / "summary.json").read_text())
    assert summary["batch_sizes_reported"] == {"0": 4, "1": 64, "2": 16}  # from the nodes' --node-config
    assert summary["num_nodes"] == 4 and summary["failed"] is None
    assert json.loads((secure_run.results / "config.json").read_text())["strategy"] == "llr-vote"
    accuracy = [float(r["test_accuracy"]) for r in rows]
    assert accuracy[-1] > accuracy[0], accuracy


def test_an_unregistered_and_an_insecure_supernode_are_refused(secure_run: SecureRun) -> None:
    for name, (code, log) in secure_run.refused.items():
        assert code not in (None, 0), f"{name} SuperNode: exit code {code}\n{log[-2000:]}"
        assert "could not establish a connection to the SuperLink" in log, log[-2000:]
    assert "Failed to activate SuperNode" in secure_run.refused["unregistered"][1]


def test_a_killed_supernode_leaves_the_rounds_after_it_to_the_others(secure_run: SecureRun) -> None:
    rows = rounds_csv(secure_run.results)
    assert [int(r["clients"]) for r in rows[1:]] == [3, 2], rows
    assert json.loads((secure_run.results / "summary.json").read_text())["rounds"] == 2


def test_an_impostor_with_the_lowest_node_id_is_rejected_from_round_1_by_node_partitions(secure_run: SecureRun) -> None:
    honest, impostor = secure_run.node_ids["p0"], secure_run.node_ids["impostor"]
    assert impostor < honest
    for rnd in (1, 2):
        assert (
            f"round {rnd}: rejected the reply of node {impostor}: claims partition-id 0, but node {impostor} is not in "
            "node-partitions (the run config binds 3 nodes to their partitions)" in secure_run.log
        ), secure_run.log[-3000:]
    assert f"rejected the reply of node {honest}" not in secure_run.log, secure_run.log[-3000:]
