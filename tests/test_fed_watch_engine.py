"""The unmodified Flower app (tests/flower_apps/quickstart_pytorch, whose one change is the strategy wrap) on
a real Flower engine: a ``flower-superlink --simulation`` on loopback and ``flwr run`` of the app folder, as a
Flower user runs a simulation in flwr 1.42 — the ServerApp in Flower's flwr-simulation process, the
ClientApps on Ray actors, the run config from the app's pyproject.toml plus ``--run-config``, the virtual
SuperNodes from ``--federation-config``. The wrap's settings come from the environment the SuperLink passes
on (``LOWRES_FEDERATION``, ``MLFLOW_TRACKING_URI``, ``LOWRES_FED_PROMETHEUS_PORT``). The test reads the
rounds and bytes back from MLflow and from the exporter's /metrics, scraped while the ServerApp runs."""

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from lowres.federated.deploy import flower_env, wait_finished, write_connection

APP = Path(__file__).parent / "flower_apps" / "quickstart_pytorch"
ROUNDS, NODES = 2, 2


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scraper(url, texts, stop):
    """Prometheus' part: scrape ``url`` every 0.3 s, keeping the texts (the exporter comes and goes)."""
    while not stop.is_set():
        try:
            texts.append(urllib.request.urlopen(url, timeout=2).read().decode())
        except OSError:
            pass
        time.sleep(0.3)


def per_client(text, name, federation):
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'federation="{federation}"' in line:
            client = line.split('client="', 1)[1].split('"', 1)[0]
            out[client] = float(line.rsplit(" ", 1)[1])
    return out


def gauge(text, name, federation, **labels):
    for line in text.splitlines():
        if (line.startswith(name + "{") and f'federation="{federation}"' in line
                and all(f'{k}="{v}"' in line for k, v in labels.items())):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_unmodified_app_under_flwr_run_on_the_simulation_engine(tmp_path):
    from mlflow.tracking import MlflowClient

    federation, uri, prom = "engine-sim", f"sqlite:///{tmp_path / 'mlflow.db'}", free_port()
    home = tmp_path / "flwr"
    env = flower_env(tmp_path / "bin", {**os.environ, "FLWR_HOME": str(home), "LOWRES_FEDERATION": federation,
                                        "MLFLOW_TRACKING_URI": uri, "LOWRES_FED_PROMETHEUS_PORT": str(prom)})
    port = free_port()
    link = subprocess.Popen(["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, cwd=tmp_path, start_new_session=True,
                            stdout=open(tmp_path / "link.log", "w"), stderr=subprocess.STDOUT)
    texts, stop = [], threading.Event()
    thread = threading.Thread(target=scraper, args=(f"http://127.0.0.1:{prom}/metrics", texts, stop), daemon=True)
    thread.start()
    try:
        write_connection(home, "lowres", f"127.0.0.1:{port}")
        cmd = ["flwr", "run", str(APP), "lowres", "--run-config", f"num-server-rounds={ROUNDS}",
               "--federation-config", f"num-supernodes={NODES} client-resources-num-cpus=1", "--format", "json"]
        deadline = time.time() + 60
        while True:  # the SuperLink takes a few seconds to listen
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
            out = json.loads(proc.stdout[proc.stdout.find("{"):] or "{}")
            if out.get("success") or time.time() > deadline or link.poll() is not None:
                break
            time.sleep(1)
        assert out.get("success"), proc.stdout[-1500:] + proc.stderr[-1500:]
        run_id = out["run-id"]
        status = wait_finished(run_id, home, timeout_s=240, poll_s=1.0)
        assert status["status"] == "finished:completed", (status, (tmp_path / "link.log").read_text()[-3000:])
    finally:
        stop.set()
        thread.join(timeout=5)
        if link.poll() is None:
            os.killpg(link.pid, signal.SIGTERM)
        try:
            link.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(link.pid, signal.SIGKILL)

    # ---- MLflow: the federation's parent run (Flower's FedAvg, the rounds) and one child per virtual node
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("lowres-fed").experiment_id],
                         f"tags.`lowres.federation` = '{federation}'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["lowres.client"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert parent.info.status == "FINISHED" and parent.data.params["strategy"] == "FedAvg"
    assert parent.data.params["num_rounds"] == str(ROUNDS)  # --run-config reached the stock ServerApp
    assert len(children) == NODES and all(k.startswith("node-") for k in children)

    def hist(run, key):
        return {m.step: m.value for m in c.get_metric_history(run.info.run_id, key)}

    assert sorted(hist(parent, "fed/round_seconds")) == [1, 2]
    assert hist(parent, "fed/clients_sampled") == {1: 2.0, 2: 2.0}
    assert hist(parent, "fed/clients_replied") == {1: 2.0, 2: 2.0}
    assert sorted(hist(parent, "fed/train_loss")) == [1, 2]
    assert sorted(hist(parent, "fed/central_eval_accuracy")) == [0, 1, 2]
    # every train message carries the whole model: at least its parameters' bytes (float32) per node and round
    import sys

    sys.path.insert(0, str(APP))
    try:
        from pytorchexample.task import Net
    finally:
        sys.path.remove(str(APP))
    model_bytes = sum(p.numel() * 4 for p in Net().state_dict().values())
    down = {k: sum(hist(r, "fed/client/bytes_down").values()) + sum(hist(r, "fed/client/evaluate/bytes_down").values())
            for k, r in children.items()}
    up = {k: sum(hist(r, "fed/client/bytes_up").values()) + sum(hist(r, "fed/client/evaluate/bytes_up").values())
          for k, r in children.items()}
    assert all(v > 2 * ROUNDS * model_bytes for v in down.values())  # train + evaluate each round
    assert all(v > ROUNDS * model_bytes for v in up.values())  # the trained model back each round
    assert parent.data.metrics["fed/bytes_sent_total"] == sum(down.values())
    assert parent.data.metrics["fed/bytes_received_total"] == sum(up.values())
    assert sum(hist(parent, "fed/bytes_down").values()) == sum(down.values())

    # ---- Prometheus: the same figures on the exporter of the ServerApp's process, its end marker seen
    assert len(texts) >= 2, (tmp_path / "link.log").read_text()[-3000:]
    last = texts[-1]
    assert per_client(last, "lowres_fed_bytes_sent_total", federation) == down
    assert per_client(last, "lowres_fed_bytes_received_total", federation) == up
    assert gauge(last, "lowres_fed_round", federation) == ROUNDS
    assert gauge(last, "lowres_fed_server_status", federation, status="finished") == 1
