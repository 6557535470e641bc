"""The deployment engine for real: a SuperLink and 2 SuperNodes as subprocesses on loopback, `flwr run`.

One federation of 2 rounds; one SuperNode is killed as round 2 starts: round 2 still completes with the
other, the failure is recorded, and our byte counts are cross-checked against Flower's per-run counters.
"""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from lowres.federated.deploy import flower_env, submit, superlink_command, supernode_command, wait_finished

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {port}")


@pytest.fixture
def processes():
    procs = []
    yield procs
    for p in procs:  # stop what we started, even when the test failed
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def start(cmd, env, log, procs):
    p = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                         cwd=REPO)
    procs.append(p)
    return p


@pytest.mark.timeout(400)
def test_loopback_deployment_survives_a_killed_supernode(tmp_path, processes):
    from lowres.tracking.runs import client

    env = flower_env(tmp_path / "bin", {**os.environ, "FLWR_HOME": str(tmp_path / "flwr")})
    link_port = free_port()
    start(superlink_command(link_port), env, tmp_path / "link.log", processes)
    wait_port(link_port)
    nodes = [start(supernode_command(f"127.0.0.1:{link_port}", free_port(),
                                     {"partition-id": i, "num-partitions": 2}), env, tmp_path / f"node{i}.log", processes)
             for i in range(2)]
    fed_dir, uri = tmp_path / "fed", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = submit(REPO / "configs/fed/tiny-deploy.yaml", f"127.0.0.1:{link_port}", tmp_path / "flwr",
                    overrides=[f"output_dir={fed_dir}", f"tracking.mlflow_uri={uri}", "local_steps=2",
                               "robustness.round_timeout_s=25"])

    # kill node 1 as soon as round 1's global adapter is saved: round 2 is being sent out
    deadline = time.time() + 200
    while not (fed_dir / "global" / "round-0001.safetensors").exists():
        assert time.time() < deadline, (tmp_path / "link.log").read_text()[-3000:]
        assert all(p.poll() is None for p in processes), "a Flower process died"
        time.sleep(0.2)
    os.killpg(nodes[1].pid, signal.SIGKILL)

    status = wait_finished(run_id, tmp_path / "flwr", timeout_s=200)
    assert status["status"] == "finished:completed", status
    assert (fed_dir / "global" / "round-0002.safetensors").exists()

    c = client(uri)
    exp = c.get_experiment_by_name("lowres-fed")
    parent = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags][0]
    assert parent.info.status == "FINISHED"
    hist = lambda key: {m.step: m.value for m in c.get_metric_history(parent.info.run_id, key)}  # noqa: E731
    assert hist("fed/clients_accepted") == {1: 2.0, 2: 1.0}
    assert hist("fed/clients_failed")[2] == 1.0
    children = {r.data.tags["lowres.client"]: r for r in c.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["client-00", "client-01"]
    assert children["client-01"].data.metrics["fed/client/failed"] == 1.0

    # our content bytes against Flower's per-run counters, which add message envelopes and RPC framing, leave
    # out what the killed node never pulled (at most what it never answered), and count an object identical
    # across clients (e.g. the tensor-names header of replies) once, as the SuperLink stores objects by hash
    ours_out = parent.data.metrics["fed/bytes_sent_total"]
    unanswered = parent.data.metrics["fed/bytes_sent_unanswered_total"]
    ours_in = parent.data.metrics["fed/bytes_received_total"]
    traffic = status["network-traffic"]
    assert unanswered > 0
    assert (ours_out - unanswered) * 0.97 <= traffic["outbound-bytes"] <= ours_out * 1.03 + 30_000, (ours_out, traffic)
    assert ours_in * 0.97 - 30_000 <= traffic["inbound-bytes"] <= ours_in * 1.03 + 30_000, (ours_in, traffic)
