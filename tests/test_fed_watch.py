"""lowres.federated.watch on an unmodified Flower app: tests/flower_apps/quickstart_pytorch is Flower's
quickstart-pytorch template (a tiny MLP on synthetic data instead of the CNN on CIFAR-10) whose one change
is ``strategy = watch(FedAvg(...), context)``. Its ServerApp and ClientApp objects run as Flower runs them
(``app(grid, context)``, ``app(message, context)``) over lowres' in-process LocalGrid, which passes every
message through its wire form and measures the bytes on the far side: the figures in MLflow and on the
Prometheus endpoint are checked against those independent counts, and against Flower's own aggregates.
Three federations of the app run at once, each on its own series and its own MLflow parent run."""

import sys
import threading
import urllib.request
from pathlib import Path

import pytest

APP = Path(__file__).parent / "flower_apps" / "quickstart_pytorch"
ROUNDS, NODES, FAILING_NODE, FAILING_ROUND = 3, 3, 2, 2


@pytest.fixture
def flower_app(monkeypatch, tmp_path):
    """(server app, client app, run config) of the stock app; its final_model.pt goes to tmp_path."""
    from flwr.common.config import get_fused_config_from_dir

    monkeypatch.syspath_prepend(str(APP))
    monkeypatch.chdir(tmp_path)
    from pytorchexample.client_app import app as client_app
    from pytorchexample.server_app import app as server_app

    yield server_app, client_app, get_fused_config_from_dir(APP, {"num-server-rounds": ROUNDS})
    for name in [m for m in sys.modules if m.startswith("pytorchexample")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One SQLite MLflow store for the module (creating its tables is the slow part)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def scrapes(monkeypatch):
    """The exporter's last /metrics text, read over HTTP just before the federation closes it: {url: text}."""
    from profiler.sinks.prometheus import PrometheusExporter

    texts, close = {}, PrometheusExporter.close

    def scrape_then_close(self):
        if self._server is not None:
            texts[self.url] = urllib.request.urlopen(self.url, timeout=5).read().decode()
        close(self)

    monkeypatch.setattr(PrometheusExporter, "close", scrape_then_close)
    return texts


def fail_once(node_index: int, rnd: int):
    """A LocalGrid tamper: that node's train reply of that round becomes the error reply Flower's engines
    send when a ClientApp raises."""
    from flwr.app import Error, Message

    seen = {}

    def tamper(i, reply):
        if reply.metadata.message_type == "train":
            seen[i] = seen.get(i, 0) + 1
            if i == node_index and seen[i] == rnd:
                return Message(error=Error(code=2, reason="<class 'RuntimeError'>:<'injected: lost its data'>"),
                               metadata=reply.metadata)
        return reply

    return tamper


def run_app(flower_app, federation, uri, tamper=None, run_id=1):
    from flwr.app import Context, RecordDict

    from lowres.federated.local_grid import LocalGrid

    server_app, client_app, run_config = flower_app
    grid = LocalGrid(client_app, NODES, run_config=run_config, tamper=tamper, run_id=run_id)
    # the watch settings travel as run-config keys (flwr run --run-config, when the app declares them)
    ctx = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                  run_config={**run_config, "lowres-federation": federation, "lowres-tracking-uri": uri,
                              "lowres-prometheus-port": 0})
    server_app(grid, ctx)
    return grid


def series(text, name, **labels):
    """{labels dict: value} of the samples of ``name`` whose labels include ``labels``."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            body, value = line[len(name) + 1:].rsplit("} ", 1)
            lab = dict(part.split("=", 1) for part in body.split(","))
            lab = {k: v.strip('"') for k, v in lab.items()}
            if all(lab.get(k) == v for k, v in labels.items()):
                out[tuple(sorted(lab.items()))] = float(value)
    return out


def parent_and_children(uri, federation):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("lowres-fed")
    runs = c.search_runs([exp.experiment_id], f"tags.`lowres.federation` = '{federation}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = {r.data.tags["lowres.client"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")
                == parents[0].info.run_id}
    return c, parents[0], children


def history(c, run, key):
    return {m.step: m.value for m in c.get_metric_history(run.info.run_id, key)}


def test_unmodified_flower_app_reports_rounds_bytes_failures_and_metrics(flower_app, scrapes, uri):
    grid = run_app(flower_app, "quickstart", uri, tamper=fail_once(FAILING_NODE, FAILING_ROUND))
    bad = f"node-{grid.nodes[FAILING_NODE]}"

    # bytes each way per client, as measured on the far side of LocalGrid's wire
    down, up = {}, {}
    for _, node, n in grid.down:
        down[f"node-{node}"] = down.get(f"node-{node}", 0) + n
    for _, node, n in grid.up:
        up[f"node-{node}"] = up.get(f"node-{node}", 0) + n
    assert set(down) == {f"node-{n}" for n in grid.nodes} and all(v > 10_000 for v in down.values())

    # ---- MLflow: the parent run per federation, a child per client
    c, parent, children = parent_and_children(uri, "quickstart")
    assert parent.info.status == "FINISHED" and set(children) == set(down)
    assert parent.data.params["strategy"] == "FedAvg" and parent.data.params["num_rounds"] == str(ROUNDS)
    m = parent.data.metrics
    assert m["fed/bytes_sent_total"] == sum(down.values())
    assert m["fed/bytes_received_total"] == sum(up.values())
    assert sum(history(c, parent, "fed/bytes_down").values()) == sum(down.values())
    assert sum(history(c, parent, "fed/bytes_up").values()) == sum(up.values())
    assert sorted(history(c, parent, "fed/round_seconds")) == [1, 2, 3]
    round_s, watch_s = history(c, parent, "fed/round_seconds"), history(c, parent, "fed/watch_seconds")
    assert all(0 < watch_s[r] < round_s[r] for r in round_s)
    assert history(c, parent, "fed/clients_sampled") == {1: 3.0, 2: 3.0, 3: 3.0}  # FedAvg: all of 3 nodes
    assert history(c, parent, "fed/clients_replied") == {1: 3.0, 2: 2.0, 3: 3.0}
    assert history(c, parent, "fed/clients_failed") == {1: 0.0, 2: 1.0, 3: 0.0}
    # fraction-evaluate 0.5 of 3 nodes is 1, raised to FedAvg's min_evaluate_nodes=2
    assert history(c, parent, "fed/evaluate_sampled") == {1: 2.0, 2: 2.0, 3: 2.0}
    # the strategy's own aggregates: Flower's weighted means of what its clients reported
    train_loss = history(c, parent, "fed/train_loss")
    assert sorted(train_loss) == [1, 2, 3] and train_loss[3] < train_loss[1]
    assert sorted(history(c, parent, "fed/federated_eval_acc")) == [1, 2, 3]
    central = history(c, parent, "fed/central_eval_accuracy")
    assert sorted(central) == [0, 1, 2, 3] and central[3] > central[0]
    per_client_up = {k: sum(history(c, r, "fed/client/bytes_up").values())
                     + sum(history(c, r, "fed/client/evaluate/bytes_up").values()) for k, r in children.items()}
    assert per_client_up == {k: float(up.get(k, 0)) for k in down}
    assert history(c, children[bad], "fed/client/failed") == {FAILING_ROUND: 1.0}
    assert sorted(history(c, children[bad], "fed/client/train_loss")) == [1, 3]
    # the round's train_loss is the num-examples-weighted mean of the clients' (equal partitions: plain mean)
    losses = [history(c, r, "fed/client/train_loss")[1] for r in children.values()]
    assert train_loss[1] == pytest.approx(sum(losses) / len(losses), rel=1e-6)

    # ---- Prometheus: the same figures on the exporter's /metrics, labelled with the federation
    (text,) = scrapes.values()
    sent = series(text, "lowres_fed_bytes_sent_total", federation="quickstart")
    assert {dict(k)["client"]: v for k, v in sent.items()} == {k: float(v) for k, v in down.items()}
    got = series(text, "lowres_fed_bytes_received_total", federation="quickstart")
    assert {dict(k)["client"]: v for k, v in got.items()} == {k: float(v) for k, v in up.items()}
    fails = series(text, "lowres_fed_client_failures_total", federation="quickstart")
    assert {dict(k)["client"]: v for k, v in fails.items()} == {bad: 1.0}
    assert list(series(text, "lowres_fed_round", federation="quickstart").values()) == [ROUNDS]
    assert list(series(text, "lowres_fed_round_seconds", federation="quickstart").values())[0] > 0
    strat = series(text, "lowres_fed_strategy_metric", federation="quickstart")
    strat = {(dict(k)["phase"], dict(k)["metric"]): v for k, v in strat.items()}
    assert strat[("train", "train_loss")] == pytest.approx(train_loss[3])
    assert strat[("central", "accuracy")] == pytest.approx(central[3])
    assert ("evaluate", "eval_acc") in strat


def test_three_federations_at_once_each_on_its_own_series_and_run(flower_app, scrapes, uri):
    names = ["alpha", "beta", "gamma"]
    grids, errors = {}, []

    def one(i, name):
        try:
            grids[name] = run_app(flower_app, name, uri, run_id=100 + i)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(scrapes) == 3  # three exporters, one per federation
    for name in names:
        grid = grids[name]
        sent = sum(n for _, _, n in grid.down)
        c, parent, children = parent_and_children(uri, name)
        assert parent.info.status == "FINISHED" and len(children) == NODES
        assert parent.data.metrics["fed/bytes_sent_total"] == sent
        assert sorted(history(c, parent, "fed/train_loss")) == [1, 2, 3]
        (text,) = [t for t in scrapes.values() if f'federation="{name}"' in t]
        assert f'federation="{name}"' in text and not any(f'federation="{o}"' in text for o in names if o != name)
        assert sum(series(text, "lowres_fed_bytes_sent_total").values()) == sent
        assert list(series(text, "lowres_fed_round").values()) == [ROUNDS]
    # … and one row each on the dashboard's Federations page
    from dash_helpers import load_queries

    feds, clients = load_queries().federations(uri)
    rows = feds.set_index("federation").loc[names]
    assert list(rows["rounds"]) == [ROUNDS] * 3 and list(rows["status"]) == ["FINISHED"] * 3
    assert list(rows["bytes_sent"]) == [sum(n for _, _, n in grids[name].down) for name in names]


def test_a_silent_node_is_a_failure_and_prometheus_alone_works(flower_app, scrapes):
    """A node that stops replying (killed) from round 2: each later train message to it is a recorded failure
    and its bytes count as sent, unanswered; no client evaluation (fraction-evaluate 0); no MLflow at all."""
    from flwr.app import Context, RecordDict

    from lowres.federated.local_grid import LocalGrid

    server_app, client_app, run_config = flower_app
    run_config = {**run_config, "fraction-evaluate": 0.0}
    grid = LocalGrid(client_app, NODES, run_config=run_config, drop={1: 2})
    server_app(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(),
                             run_config={**run_config, "lowres-mlflow": False, "lowres-prometheus-port": 0}))
    (text,) = scrapes.values()
    name = "flower-run-7"  # no name given: the Flower run's id names it
    fails = series(text, "lowres_fed_client_failures_total", federation=name)
    assert {dict(k)["client"]: v for k, v in fails.items()} == {f"node-{grid.nodes[1]}": float(ROUNDS - 1)}
    sent = {dict(k)["client"]: v for k, v in series(text, "lowres_fed_bytes_sent_total", federation=name).items()}
    delivered = sum(n for _, node, n in grid.down if node == grid.nodes[1])
    assert sent[f"node-{grid.nodes[1]}"] == delivered * ROUNDS  # one model each round; 2 never arrived
    assert ("evaluate", "eval_loss") not in {(dict(k)["phase"], dict(k)["metric"])
                                             for k in series(text, "lowres_fed_strategy_metric")}


def test_wrong_inputs_are_refused_in_one_line(monkeypatch):
    from flwr.serverapp.strategy import FedAvg

    from lowres.federated.watch import watch

    class OwnLoop(FedAvg):
        def start(self, *args, **kwargs):
            return super().start(*args, **kwargs)

    with pytest.raises(TypeError, match="OwnLoop overrides start"):
        watch(OwnLoop(), federation="x", mlflow=False)
    with pytest.raises(TypeError, match="takes a Flower strategy"):
        watch(object(), federation="x", mlflow=False)
    monkeypatch.setenv("LOWRES_FED_PROMETHEUS_PORT", "nine")
    with pytest.raises(ValueError, match="LOWRES_FED_PROMETHEUS_PORT='nine' is not a port number"):
        watch(FedAvg(), federation="x", mlflow=False)
