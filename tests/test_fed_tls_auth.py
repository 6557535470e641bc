"""TLS and SuperNode authentication on loopback: a SuperLink with a self-signed CA and --enable-supernode-auth;
a registered node with the CA comes online, an unregistered one and a plain-HTTP one never do."""

import os
import time

import pytest

from lowres.federated.deploy import (flower_env, list_nodes, make_certs, make_node_key, register_node,
                                     superlink_command, supernode_command, write_connection)
from test_fed_deployment import free_port, processes, start, wait_port  # noqa: F401  (fixture reused)


@pytest.mark.timeout(120)
def test_tls_and_supernode_auth(tmp_path, processes):  # noqa: F811
    certs = make_certs(tmp_path / "certs")
    good, bad = make_node_key(tmp_path / "good.key"), make_node_key(tmp_path / "bad.key")
    home = tmp_path / "flwr"
    env = flower_env(tmp_path / "bin", {**os.environ, "FLWR_HOME": str(home)})
    port = free_port()
    start(superlink_command(port, certs, supernode_auth=True), env, tmp_path / "link.log", processes)
    wait_port(port)
    write_connection(home, "lowres", f"127.0.0.1:{port}", str(certs / "ca.crt"))
    node_id = register_node(f"{good}.pub", home)["node-id"]
    link = f"127.0.0.1:{port}"
    start(supernode_command(link, free_port(), {}, str(certs / "ca.crt"), str(good)), env, tmp_path / "good.log",
          processes)
    start(supernode_command(link, free_port(), {}, str(certs / "ca.crt"), str(bad)), env, tmp_path / "bad.log",
          processes)
    start(supernode_command(link, free_port(), {}), env, tmp_path / "plain.log", processes)  # --insecure
    deadline = time.time() + 60
    while time.time() < deadline:
        nodes = list_nodes(home)
        if any(n["status"] == "online" for n in nodes):
            break
        time.sleep(1)
    time.sleep(3)  # give the refused ones time to (fail to) register too
    nodes = list_nodes(home)
    assert [(str(n["node-id"]), n["status"]) for n in nodes] == [(str(node_id), "online")]
