"""Prometheus config, rules and Grafana dashboards under dashboards/, checked against the real tools.

The live test runs every PromQL expression of the Grafana dashboards and the rules against a real Prometheus
that loaded the shipped prometheus.yml and rules (targets pointed at loopback) and scraped a real profiled
process. The test plays the recipe's part for ``lowres_train_*`` (``Profiler.record``, as the recipe does),
and pushes through a real Pushgateway what this CPU-only machine and this test cannot produce: GPU readings,
a throughput baseline, a federation server's ``lowres_fed_*`` series, a machine under memory pressure.
Pushed series carry ``job="lowres-test-push"`` and, apart from the baseline and the federation that the real
process joins as client ``c1``, ``host``/``run``/``fingerprint`` = ``pushed-by-test``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

import servers
from profiler import metric_catalog
from servers import free_port, http_get, prometheus_query, pushgateway_server, wait_until

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "dashboards" / "prometheus"
GRAFANA_DIR = ROOT / "dashboards" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
DATASOURCE_UID = "lowres-prometheus"

# Names the rules and dashboards rely on that the profiler's catalog does not hold (yet): the federation
# server emits the lowres_fed_* ones (labels federation, client), a baseline recorder the last one (labels
# fingerprint[, config]). dashboards/README.md documents them; a name here that the catalog gains is fine.
EXPECTED_ELSEWHERE = {
    "lowres_fed_round_seconds",
    "lowres_fed_eval_loss",
    "lowres_fed_bytes_sent_total",
    "lowres_fed_bytes_received_total",
    "lowres_fed_client_failures_total",
    "lowres_fed_client_last_report_timestamp_seconds",
    "lowres_train_tokens_per_second_baseline",
}

PUSHED = "pushed-by-test"
FEDERATION = "test-fed"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/setup installs it)")
    return path


# -- reading the shipped files -----------------------------------------------------------------------------
def _panels(dashboard: dict):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every target of every panel of every shipped dashboard."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in _panels(board):
            for target in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']} [{target['refId']}]", target["expr"]))
    return out


def rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def rule_exprs() -> list[tuple[str, str]]:
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for r in rules()]


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard, variable name, query) of every templating variable."""
    return [(path.name, v["name"], v["query"] if isinstance(v["query"], str) else v["query"]["query"])
            for path in DASHBOARDS for v in json.loads(path.read_text())["templating"]["list"]]


# Grafana's forms: $var, ${var}, ${var:format}, [[var]]. Built-ins get values a 1 s scrape interval makes
# sensible: $__rate_interval must span several scrapes, as Grafana makes it do.
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
BUILTINS = {"__rate_interval": "10s", "__interval": "2s", "__range": "5m", "__range_s": "300"}


def substitute(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana variables replaced; an unknown variable is a dashboard bug, so it raises."""
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in BUILTINS:
            return BUILTINS[name]
        if name not in values:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]
    return _VAR.sub(one, expr)


# -- static checks -----------------------------------------------------------------------------------------
def test_promtool_checks_config_and_rules_and_runs_the_unit_tests():
    promtool = _promtool()
    # check config also loads every rule file the config names, relative to the config's folder
    for args in (["check", "config", str(PROM_DIR / "prometheus.yml")],
                 ["check", "rules", *map(str, RULE_FILES)],
                 ["test", "rules", *map(str, sorted((PROM_DIR / "tests").glob("*.yml")))]):
        res = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"promtool {' '.join(args[:2])} failed:\n{res.stdout}{res.stderr}"
        assert "SUCCESS" in res.stdout + res.stderr


def test_every_alert_fires_in_a_unit_test():
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert {"LowresThroughputRegression", "LowresMemoryPressure", "LowresSwapGrowing", "LowresGpuHot",
            "LowresFedClientOffline", "LowresFedServerSilent", "LowresFedStalled"} <= alerts
    fired = set()
    for path in (PROM_DIR / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            fired |= {t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts <= fired, f"alerts without a firing unit test: {sorted(alerts - fired)}"


def test_metric_names_are_in_the_catalog_or_expected_from_elsewhere():
    texts = [e for _, e in dashboard_exprs() + rule_exprs()] + [q for *_, q in variable_queries()]
    # a name is lowres_ followed by word characters; recording rules (lowres:...) are checked by promtool
    used = {n for t in texts for n in re.findall(r"\blowres_\w+", t)}
    unknown = used - set(metric_catalog.CATALOG) - EXPECTED_ELSEWHERE
    assert not unknown, f"metric names neither in profiler/metric_catalog.py nor expected: {sorted(unknown)}"


def test_dashboards_use_the_provisioned_datasource_and_are_templated():
    provisioned = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert [d["uid"] for d in provisioned["datasources"]] == [DATASOURCE_UID]
    assert {p.name for p in DASHBOARDS} == {"lowres-runs.json", "lowres-federations.json"}
    variables: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        ids = [p["id"] for p in _panels(board)]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in _panels(board):
            assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == DATASOURCE_UID, (path.name, panel["title"])
        for v in board["templating"]["list"]:
            assert v["datasource"]["uid"] == DATASOURCE_UID and v["allValue"] == ".*"
        variables[path.name] = {v["name"] for v in board["templating"]["list"]}
    assert variables["lowres-runs.json"] == {"run", "host", "fingerprint"}
    assert variables["lowres-federations.json"] == {"federation", "client"}


# -- the live test -----------------------------------------------------------------------------------------
_WORKLOAD = """
import time
ballast = bytearray(64 << 20)  # resident memory the profiler must see
end = time.time() + 90  # outlives the test; the test kills it
while time.time() < end:
    sum(range(100_000))  # a few ms of CPU, then a rest: busy but light on a shared machine
    time.sleep(0.01)
"""


def _push(pgw: str, group: str, lines: list[str]) -> None:
    """PUT a group of series (text format) to the Pushgateway under job ``lowres-test-push``."""
    body = ("\n".join(lines) + "\n").encode()
    req = urllib.request.Request(f"{pgw}/metrics/job/lowres-test-push/group/{group}", data=body, method="PUT")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status in (200, 202), r.status


def _push_stand_ins(pgw: str, fingerprint: str, late: bool) -> None:
    """What this test cannot produce for real. Called twice (``late``) so rates and deltas have two points."""
    now = time.time()
    p = f'run="{PUSHED}",host="{PUSHED}",fingerprint="{PUSHED}",gpu="0"'
    _push(pgw, "gpu", [
        f"lowres_gpu_utilization_ratio{{{p}}} 0.8", f"lowres_gpu_memory_used_bytes{{{p}}} 6e9",
        f"lowres_gpu_memory_total_bytes{{{p}}} 1.2e10", f"lowres_gpu_process_memory_bytes{{{p}}} 5e9",
        f"lowres_gpu_power_watts{{{p}}} 150", f"lowres_gpu_sm_clock_hertz{{{p}}} 1.7e9",
        f"lowres_gpu_temperature_celsius{{{p}}} 91",  # hot: LowresGpuHot
    ])
    d = f'run="{PUSHED}",host="{PUSHED}",fingerprint="{PUSHED}",device="0"'
    _push(pgw, "torch", [f"lowres_torch_cuda_allocated_bytes{{{d}}} 4e9",
                         f"lowres_torch_cuda_allocated_peak_bytes{{{d}}} 4.5e9",
                         f"lowres_torch_cuda_reserved_bytes{{{d}}} 5e9"])
    h = f'run="{PUSHED}",host="{PUSHED}",fingerprint="{PUSHED}"'
    _push(pgw, "pressure", [f"lowres_system_memory_used_ratio{{{h}}} 0.95",
                            f"lowres_system_swap_used_bytes{{{h}}} {2**30 if late else 0}"])
    # Twice what the profiled process "trains" at: LowresThroughputRegression.
    _push(pgw, "baseline", [f'lowres_train_tokens_per_second_baseline{{fingerprint="{fingerprint}"}} 2000'])
    f = f'federation="{FEDERATION}"'
    n = 2 if late else 1
    _push(pgw, "federation", [
        f"lowres_fed_round{{{f}}} {n}", f"lowres_fed_round_seconds{{{f}}} 12.5",
        f"lowres_fed_eval_loss{{{f}}} {3.1 - n / 10}", f"lowres_fed_federated_eval_loss{{{f}}} {3.2 - n / 10}",
        f"lowres_fed_eval_accuracy_ratio{{{f}}} {0.1 * n}", f"lowres_fed_federated_eval_accuracy_ratio{{{f}}} {0.08 * n}",
        *(line for c in ("c1", "c2") for line in (
            f'lowres_fed_bytes_sent_total{{{f},client="{c}"}} {n * 1e6}',
            f'lowres_fed_bytes_received_total{{{f},client="{c}"}} {n * 4e5}',
            f'lowres_fed_client_failures_total{{{f},client="{c}"}} {n - 1}')),
        f'lowres_fed_client_last_report_timestamp_seconds{{{f},client="c1"}} {now}',
        f'lowres_fed_client_last_report_timestamp_seconds{{{f},client="c2"}} {now - 1000}',  # offline
        # the server beats but made no round progress for 1000 s: LowresFedStalled
        f"lowres_fed_server_heartbeat_timestamp_seconds{{{f}}} {now}",
        f"lowres_fed_server_progress_timestamp_seconds{{{f}}} {now - 1000}",
        *(f'lowres_fed_server_status{{{f},status="{s}"}} {int(s == "running")}' for s in ("running", "finished")),
    ])
    # a server killed 1000 s ago: its last pushed heartbeat stays behind (LowresFedServerSilent)
    g = f'federation="{FEDERATION}-killed"'
    _push(pgw, "federation-killed", [f"lowres_fed_server_heartbeat_timestamp_seconds{{{g}}} {now - 1000}",
                                     f"lowres_fed_server_progress_timestamp_seconds{{{g}}} {now - 1000}",
                                     f'lowres_fed_server_status{{{g},status="running"}} 1'])


def _test_config(exporter: str, pgw: str) -> str:
    """The shipped prometheus.yml with loopback targets, 1 s intervals and absolute rule paths."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert {j["job_name"] for j in cfg["scrape_configs"]} == {"lowres", "pushgateway"}, "retarget the new job here"
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM_DIR / f) for f in cfg["rule_files"]]
    for job in cfg["scrape_configs"]:
        job.pop("file_sd_configs", None)
        job["static_configs"] = [{"targets": [exporter if job["job_name"] == "lowres" else pgw]}]
    return yaml.safe_dump(cfg)


@contextlib.contextmanager
def _prometheus(config: str, work: Path):
    """A real Prometheus on this config (tests/servers.py's fixture writes its own config instead)."""
    binary = servers._require("prometheus")
    (work / "prometheus.yml").write_text(config)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with servers._process(cmd, work, base + "/-/ready", "prometheus", 30):
        yield base


def _label_values(prom: str, query: str, values: dict[str, str]) -> tuple[str, set[str]]:
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    assert m, f"unsupported variable query {query!r}"
    label = m.group(2)
    return label, {r["metric"].get(label) for r in prometheus_query(prom, substitute(m.group(1), values))} - {None}


@pytest.mark.server
def test_every_dashboard_and_rule_expression_returns_data_from_a_real_profiled_run():
    from lowres.hardware.detection import this_machine_fingerprint
    from profiler import Profiler

    run, host, fingerprint = f"test-{uuid.uuid4().hex[:8]}", socket.gethostname(), this_machine_fingerprint()
    labels = {"run": run, "host": host, "fingerprint": fingerprint, "federation": FEDERATION, "client": "c1"}
    workload = subprocess.Popen([sys.executable, "-c", _WORKLOAD])
    try:
        with pushgateway_server() as pgw, tempfile.TemporaryDirectory(prefix="lowres-dash-") as tmp, \
                Profiler(interval=0.2, sinks=[{"kind": "prometheus", "port": 0}], pid=workload.pid,
                         labels=labels) as prof:
            exporter = urllib.parse.urlparse(prof.sinks_info[0]["url"]).netloc
            _push_stand_ins(pgw, fingerprint, late=False)
            with _prometheus(_test_config(exporter, pgw.removeprefix("http://")), Path(tmp)) as prom:
                step = 0

                def train_step():  # what the recipe records after each optimizer step
                    nonlocal step
                    step += 1
                    for name, value in (("lowres_train_tokens_per_second", 1000 + step % 7),
                                        ("lowres_train_loss", 4.0 / step ** 0.3),
                                        ("lowres_train_step_seconds", 0.5), ("lowres_train_mfu_ratio", 0.31),
                                        ("lowres_train_learning_rate", 2e-4), ("lowres_train_steps_total", step)):
                        prof.record(name, value)
                    return False

                def scraped_twice():
                    train_step()
                    return prometheus_query(prom, f'rate(lowres_train_steps_total{{run="{run}"}}[10s]) > 0') and \
                        prometheus_query(prom, f'lowres_system_swap_used_bytes{{host="{PUSHED}"}}')
                wait_until(scraped_twice, 40, "two scrapes of the profiled process and the Pushgateway", 0.25)
                _push_stand_ins(pgw, fingerprint, late=True)

                everything = dashboard_exprs() + rule_exprs()
                values = {"run": f"({run}|{PUSHED})", "host": f"({host}|{PUSHED})",
                          "fingerprint": f"({fingerprint}|{PUSHED})", "federation": FEDERATION, "client": ".*"}

                def all_answer():
                    train_step()
                    return not [w for w, e in everything if not prometheus_query(prom, substitute(e, values))]
                try:
                    wait_until(all_answer, 30, "every expression to return data", 0.5)
                except AssertionError:
                    empty = [f"{w}: {substitute(e, values)}" for w, e in everything
                             if not prometheus_query(prom, substitute(e, values))]
                    raise AssertionError("expressions without data:\n" + "\n".join(empty)) from None

                # The process and training figures came from scraping the real run, not from a push.
                for name in ("lowres_process_resident_memory_bytes", "lowres_process_cpu_seconds_total",
                             "lowres_system_memory_used_ratio", "lowres_train_tokens_per_second"):
                    got = prometheus_query(prom, f'{name}{{run="{run}"}}')
                    assert [r["metric"]["job"] for r in got] == ["lowres"], (name, got)
                def value(promql: str) -> float:
                    return float(prometheus_query(prom, promql)[0]["value"][1])
                rss = value(f'lowres_process_resident_memory_bytes{{run="{run}"}}')
                assert rss > 64 << 20, f"the workload holds 64 MiB of ballast, the profiler saw {rss} bytes"
                assert value(f'rate(lowres_process_cpu_seconds_total{{run="{run}"}}[10s])') > 0

                # Every variable lists the real run's value (multi-value: the union Grafana would show).
                expected = {"run": run, "host": host, "fingerprint": fingerprint, "federation": FEDERATION,
                            "client": "c1"}
                for board, name, query in variable_queries():
                    label, found = _label_values(prom, query, values)
                    assert label == name and expected[name] in found, (board, name, query, found)

                # Every rule evaluates cleanly, and every alert is at least pending from the data above.
                names = {r["alert"] for r in rules() if "alert" in r}

                def active_alerts():  # the data is there; the next evaluation (1 s) makes them pending
                    got = {a["labels"]["alertname"]: a["labels"] for a in
                           json.loads(http_get(f"{prom}/api/v1/alerts")[1])["data"]["alerts"]}
                    return got if set(got) == names else None
                alerts = wait_until(active_alerts, 10, f"alerts {sorted(names)} to be pending")
                groups = json.loads(http_get(f"{prom}/api/v1/rules")[1])["data"]["groups"]
                assert {r["health"] for g in groups for r in g["rules"]} == {"ok"}, groups
                assert alerts["LowresThroughputRegression"]["run"] == run
                assert alerts["LowresFedClientOffline"]["client"] == "c2"
                assert alerts["LowresFedStalled"]["federation"] == FEDERATION
                assert alerts["LowresFedServerSilent"]["federation"] == f"{FEDERATION}-killed"
                assert alerts["LowresMemoryPressure"]["host"] == PUSHED
    finally:
        workload.kill()
        workload.wait()
