"""A federation server's heartbeat and end marker (lowres.federated.health): a server SIGKILLed mid-run is
crashed — `lowres fed status` ends its MLflow run FAILED and the Federations page shows it crashed —, a clean
end is finished, a handled error failed, a beating server without progress stalled. The alert rules on the
same series are tested by promtool (dashboards/prometheus/tests/alerts_test.yml); the clean end of a real
federation is asserted in test_fed_simulation.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from lowres.federated import health

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module: creating MLflow's schema costs seconds, so it is done once (each test
    uses its own experiment; the killed server's is lowres fed's default, lowres-fed)."""
    from lowres.tracking.runs import client

    uri = f"sqlite:///{tmp_path_factory.mktemp('health') / 'mlflow.db'}"
    client(uri).search_experiments()  # creates the schema
    return uri


def _tags(**extra):
    now = time.time()
    return {health.TAG_STATUS: "running", health.TAG_HEARTBEAT: str(now), health.TAG_PROGRESS: str(now), **extra}


def _dead_pid_tags() -> dict[str, str]:
    """Server tags of a process of this machine that has exited."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    tags = health.server_tags(30, 120, 900)
    return {**tags, health.TAG_PID: str(proc.pid), health.TAG_PID_STARTED: f"{started:.2f}"}


def test_classification_of_heartbeat_progress_process_and_end_marker():
    now = time.time()
    assert health.classify("RUNNING", _tags(), now).state == "running"
    stalled = health.classify("RUNNING", _tags(**{health.TAG_PROGRESS: str(now - 1000)}), now)
    assert stalled.state == "stalled" and "no round progress for 1000 s" in stalled.reason
    silent = health.classify("RUNNING", _tags(**{health.TAG_HEARTBEAT: str(now - 300)}), now)
    assert silent.state == "crashed" and "no heartbeat for 300 s" in silent.reason
    # the run's own thresholds, then the caller's
    own = _tags(**{health.TAG_HEARTBEAT: str(now - 300), health.TAG_CRASHED_AFTER_S: "600"})
    assert health.classify("RUNNING", own, now).state == "running"
    assert health.classify("RUNNING", own, now, crashed_after_s=200).state == "crashed"
    # this machine, process gone: crashed at once, though its heartbeat is fresh
    gone = health.classify("RUNNING", {**_dead_pid_tags(), health.TAG_HEARTBEAT: str(now)}, now)
    assert gone.state == "crashed" and gone.reason.endswith("is gone")
    # the same pid on another machine says nothing
    elsewhere = {**_dead_pid_tags(), health.TAG_HEARTBEAT: str(now), health.TAG_HOST: "another-host"}
    assert health.classify("RUNNING", elsewhere, now).state == "running"
    other_ns = {**_dead_pid_tags(), health.TAG_HEARTBEAT: str(now), health.TAG_PID_NS: "1"}  # another container
    assert health.classify("RUNNING", other_ns, now).state == "running"
    # this process, alive: running
    assert health.classify("RUNNING", health.server_tags(30, 120, 900), now).state == "running"
    # end markers win over MLflow's status; runs of an older lowres fall back to it and to their metrics
    assert health.classify("FINISHED", {health.TAG_STATUS: "finished"}, now).state == "finished"
    assert health.classify("FAILED", {health.TAG_STATUS: "failed"}, now).state == "failed"
    assert health.classify("FAILED", {health.TAG_STATUS: "crashed"}, now).state == "crashed"
    assert health.classify("RUNNING", {}, now, last_activity_s=now - 60).state == "running"
    assert health.classify("RUNNING", {}, now, last_activity_s=now - 3600).state == "crashed"


def _scrape(url: str) -> dict[tuple[str, str], float]:
    out = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith("lowres_fed_server_"):
            name, value = line.rsplit(" ", 1)
            out[(name.split("{")[0], 'status="' in name and name.split('status="')[1].split('"')[0] or "")] = float(value)
    return out


def test_heartbeat_and_end_marker_in_prometheus_and_mlflow(store):
    from lowres.federated.monitor import FedMonitor
    from lowres.tracking.runs import client

    uri = store
    mon = FedMonitor("beating", tracking_uri=uri, experiment="health-beat", prometheus_port=0, heartbeat_s=0.2,
                     crashed_after_s=5)
    seen, stop = [], threading.Event()

    def scraper():  # Prometheus' part: scrape every 0.2 s until the exporter is gone
        while not stop.is_set():
            with contextlib.suppress(OSError):
                seen.append(_scrape(mon.exporter.url))
            time.sleep(0.2)

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    try:
        first = float(client(uri).get_run(mon.run_id).data.tags[health.TAG_HEARTBEAT])
        mon.round_started(1)
        deadline = time.time() + 20
        while float(client(uri).get_run(mon.run_id).data.tags[health.TAG_HEARTBEAT]) <= first:
            assert time.time() < deadline, "the MLflow heartbeat tag never moved"
            time.sleep(0.1)
        run = client(uri).get_run(mon.run_id)
        assert health.classify_run(run).state == "running" and run.data.tags[health.TAG_STATUS] == "running"
        while not seen or time.time() - seen[-1][("lowres_fed_server_heartbeat_timestamp_seconds", "")] > 3:
            assert time.time() < deadline, f"the heartbeat gauge is not set every second: {seen[-1:]}"
            time.sleep(0.1)
        live = seen[-1]
        assert live[("lowres_fed_server_status", "running")] == 1 and live[("lowres_fed_server_status", "finished")] == 0
        mon.close("FINISHED", step=1)  # waits for one more scrape: the scraper sees the end marker
    finally:
        stop.set()
        thread.join(timeout=5)
    assert seen[-1][("lowres_fed_server_status", "finished")] == 1
    assert seen[-1][("lowres_fed_server_status", "running")] == 0
    run = client(uri).get_run(mon.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[health.TAG_STATUS] == "finished"
    assert health.classify_run(run).state == "finished"

    failing = FedMonitor("failing", tracking_uri=uri, experiment="health-beat")
    failing.close("FAILED")  # run_federation's handled error
    run = client(uri).get_run(failing.run_id)
    assert run.info.status == "FAILED" and health.classify_run(run).state == "failed"


def _cli(*args: str) -> str:
    from lowres.cli.app import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(list(args))
    return out.getvalue()


def _federations_page(uri: str, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()  # the page's readers cache for 30 s within this process; each test reads afresh

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("LOWRES_PROMETHEUS_URL", raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "dashboards"))  # as Streamlit puts the app's folder on sys.path
    at = AppTest.from_file(str(ROOT / "dashboards" / "views" / "federations.py"), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _wait_for_round(uri: str, log: Path, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until round 1's figures are in the store. The server's MLflow writes go out on a background writer, so
    its "round 1/" line can come before them; the store is polled (its schema exists already, made by the
    ``store`` fixture, so reading it cannot race the server's set-up)."""
    from lowres.tracking.runs import client

    c, deadline = client(uri), time.time() + timeout_s
    while True:
        assert proc.poll() is None, f"`lowres fed run` exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
        assert time.time() < deadline, f"no round logged within {timeout_s} s:\n{log.read_text()[-2000:]}"
        exp = c.get_experiment_by_name("lowres-fed")
        runs = c.search_runs([exp.experiment_id], "tags.`lowres.command` = 'fed'") if exp else []
        if runs and "fed/round_seconds" in runs[0].data.metrics:
            return
        time.sleep(0.5)


@pytest.mark.timeout(300)
def test_a_server_killed_mid_run_is_crashed_on_the_cli_and_the_page(store, tmp_path, monkeypatch):
    from lowres.tracking.runs import client

    uri = store
    cmd = [sys.executable, "-m", "lowres.cli.app", "fed", "run", "--config", str(ROOT / "configs/fed/tiny-sim.yaml"),
           "--set", "clients=1", "--set", "robustness.min_available=1", "--set", "robustness.min_clients=1",
           "--set", "local_steps=1", "--set", "rounds=50", "--set", "run.train.warmup_steps=0",
           "-o", str(tmp_path / "fed"), "--tracking-uri", uri]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    # its own session: Ray's helpers join the group, and the group is what we clear away afterwards
    log = tmp_path / "server.log"
    server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                              start_new_session=True)
    try:
        _wait_for_round(uri, log, server, timeout_s=240)
        server.send_signal(signal.SIGKILL)  # the federation server dies mid-run: no end marker, no close
        server.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    c = client(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("lowres-fed").experiment_id], "tags.`lowres.command` = 'fed'")
    run_id = run.info.run_id
    assert run.info.status == "RUNNING" and run.data.metrics["fed/round_seconds"] > 0  # RUNNING for ever, alone

    rows = [json.loads(line) for line in _cli("fed", "status", "--tracking-uri", uri, "--json").splitlines()]
    assert [(r["run_id"], r["state"]) for r in rows] == [(run_id, "crashed")]
    assert f"server process {server.pid} on" in rows[0]["reason"] and rows[0]["reason"].endswith("is gone")
    run = c.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[health.TAG_STATUS] == "crashed"
    assert run.data.tags[health.TAG_NOTICED_BY] == "lowres fed status" and run.data.tags[health.TAG_NOTICED]
    children = c.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert children and {ch.info.status for ch in children} == {"FAILED"}
    assert _cli("fed", "status", "--tracking-uri", uri, "--json") == ""  # nothing RUNNING is left

    at = _federations_page(uri, monkeypatch)
    feds = at.dataframe[0].value.set_index("federation")
    assert feds.loc["tiny-sim", "health"] == "crashed" and feds.loc["tiny-sim", "status"] == "FAILED"
    assert feds.loc["tiny-sim", "rounds"] >= 1


def test_the_page_ends_a_crashed_federation_it_notices(store, monkeypatch):
    from lowres.federated.monitor import FedMonitor
    from lowres.tracking.runs import client, set_tags

    uri = store
    alive = FedMonitor("alive", tracking_uri=uri, experiment="health-page")
    alive.round_started(1)
    dead = FedMonitor("silent", tracking_uri=uri, experiment="health-page")
    dead.round_started(1)
    dead._stop.set()  # its threads stop as a killed server's would; it never closes
    set_tags(dead.run_id, {health.TAG_HEARTBEAT: str(time.time() - 600)}, uri)
    try:
        at = _federations_page(uri, monkeypatch)
        assert any("silent" in w.value and "FAILED" in w.value for w in at.warning)
        feds = at.dataframe[0].value.set_index("federation")
        assert feds.loc["silent", "health"] == "crashed" and feds.loc["silent", "status"] == "FAILED"
        assert feds.loc["alive", "health"] == "running" and feds.loc["alive", "status"] == "RUNNING"
        run = client(uri).get_run(dead.run_id)
        assert run.info.status == "FAILED" and run.data.tags[health.TAG_STATUS] == "crashed"
        assert run.data.tags[health.TAG_NOTICED_BY] == "the dashboard's Federations page"
        assert "no heartbeat for" in run.data.tags[health.TAG_REASON]
    finally:
        alive.close()
