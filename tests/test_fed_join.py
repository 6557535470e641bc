"""`lowres fed join NAME` for real: a SuperLink, one SuperNode and a federation announced on a real `mlflow
server`; a second node joins by name through the index, and the round cannot start without it
(robustness.min_available=2), so a finished round with two accepted updates is the joined node's work."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowres.federated import index
from lowres.federated.deploy import flower_env, superlink_command, supernode_command, wait_finished
from servers import mlflow_server
from test_fed_deployment import free_port, processes, start, wait_port  # noqa: F401  (fixture reused)

REPO = Path(__file__).resolve().parents[1]
LOWRES = [sys.executable, "-m", "lowres.cli.app"]


@pytest.mark.timeout(400)
def test_fed_join_by_name_adds_the_node_the_round_needs(tmp_path, processes):  # noqa: F811
    from lowres.tracking.runs import client

    env = flower_env(tmp_path / "bin", {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "HOME": str(tmp_path)})
    link_port = free_port()
    link = f"127.0.0.1:{link_port}"
    with mlflow_server() as uri:
        start(superlink_command(link_port), env, tmp_path / "link.log", processes)
        wait_port(link_port)
        start(supernode_command(link, free_port(), {"partition-id": 0, "num-partitions": 2}), env,
              tmp_path / "node0.log", processes)
        fed_dir = tmp_path / "fed"
        sets = ["federation=join-test", "rounds=1", "local_steps=1", "robustness.min_available=2",
                "robustness.min_clients=2", "robustness.wait_nodes_s=200", "robustness.round_timeout_s=120",
                "index.heartbeat_s=5"]
        out = subprocess.run([*LOWRES, "fed", "run", "--config", str(REPO / "configs/fed/tiny-deploy.yaml"),
                              "--superlink", link, "--insecure", "--announce", "--no-wait", "--json", "-o", str(fed_dir),
                              "--tracking-uri", uri, *[a for s in sets for a in ("--set", s)]],
                             env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        run_id = json.loads(out.stdout)["flower_run_id"]

        deadline = time.time() + 150  # the ServerApp announces once it has started inside the SuperLink
        while True:
            try:
                entry = index.lookup(uri, "join-test")
                break
            except Exception:
                assert time.time() < deadline, (tmp_path / "link.log").read_text()[-3000:]
                time.sleep(1)
        assert entry.joinable and entry.superlink == link and entry.clients_wanted == 2 and entry.root_cert == ""

        # announced without TLS, so the join says --insecure (test_fed_index: refused without it)
        start([*LOWRES, "fed", "join", "join-test", "--tracking-uri", uri, "--insecure", "--partition-id", "1",
               "--num-partitions", "2", "--port", str(free_port())], env, tmp_path / "joined.log", processes)

        status = wait_finished(run_id, fed_dir / ".flwr", timeout_s=300)
        assert status["status"] == "finished:completed", (status, (tmp_path / "joined.log").read_text()[-2000:])

        c = client(uri)
        exp = c.get_experiment_by_name("lowres-fed")
        parent = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags][0]
        assert {m.step: m.value for m in c.get_metric_history(parent.info.run_id, "fed/clients_accepted")} == {1: 2.0}
        children = {r.data.tags["lowres.client"] for r in c.search_runs([exp.experiment_id])
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert children == {"client-00", "client-01"}  # client-01: partition 1, the node that joined by name
        done = index.lookup(uri, "join-test")
        assert done.status == "finished" and done.fed_run_id == parent.info.run_id
        assert index.join_count(uri, done) == 1
        assert c.get_run(done.run_id).info.status == "FINISHED"
