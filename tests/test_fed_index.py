"""The federation index on a real `mlflow server`: announce, heartbeat, list, join look-up, reports, end —
and the Federations page showing it (AppTest), with its report form."""

import json
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dash_helpers import APP
from lowres.cli.app import main
from lowres.federated import index
from lowres.federated.config import load_fed_config
from lowres.federated.deploy import make_certs
from lowres.federated.monitor import FedMonitor
from servers import mlflow_server, wait_until

REPO = Path(__file__).resolve().parents[1]


def cli(args):
    try:
        return main(args)
    except SystemExit as exc:  # main exits with the command's code on an error
        return exc.code


def _fed(tmp_path, uri, name="lab-fed", **extra):
    certs = make_certs(tmp_path / f"certs-{name}")
    over = [f"federation={name}", f"tracking.mlflow_uri={uri}", "index.announce=true",
            "index.superlink=127.0.0.1:8123", f"index.root_cert={certs / 'ca.crt'}", "index.heartbeat_s=0.3",
            *[f"{k}={v}" for k, v in extra.items()]]
    return load_fed_config(REPO / "configs/fed/tiny-deploy.yaml", over), certs


def test_index_announce_list_join_report_end_on_a_real_mlflow_server(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # join writes the CA to ~/.cache/lowres/index
    with mlflow_server() as uri:
        fed, certs = _fed(tmp_path, uri)
        monitor = FedMonitor("lab-fed", tracking_uri=uri)  # the federation's own run: the page's live figures
        monitor.round_done(1, {"central_eval_loss": 2.5, "clients_accepted": 2.0})
        monitor.flush()  # MLflow writes are queued (mlflow_writer): in the store before the page reads them
        beacon = index.Announcer(fed, monitor.run_id)
        try:
            _check(uri, beacon, certs, tmp_path, capsys, monitor.run_id, monkeypatch)
        finally:
            beacon.close("FINISHED")
            monitor.close()


def _check(uri, beacon, certs, tmp_path, capsys, fed_run_id, monkeypatch):
    first = index.lookup(uri, "lab-fed")
    assert (first.superlink, first.model, first.rounds, first.codec, first.clients_wanted, first.fed_run_id) == \
        ("127.0.0.1:8123", "tiny", 2, "int8/fp16", 2, fed_run_id)
    assert first.root_cert == (certs / "ca.crt").read_text() and "PRIVATE" not in first.root_cert
    assert first.joinable and first.state() == "running"
    wait_until(lambda: index.lookup(uri, "lab-fed").heartbeat > first.heartbeat, 20, "a second heartbeat")

    # the CLI: an unknown name lists what is joinable; a missing data path is refused before any join counts
    assert cli(["fed", "join", "nope", "--tracking-uri", uri, "--data-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no federation 'nope'" in err and "joinable now: lab-fed" in err
    assert cli(["fed", "join", "lab-fed", "--tracking-uri", uri, "--data-path", str(tmp_path / "none.jsonl")]) == 2
    assert "--data-path" in capsys.readouterr().err
    assert cli(["fed", "join", "lab-fed", "--tracking-uri", uri]) == 2
    assert "needs its data" in capsys.readouterr().err
    assert index.join_count(uri, first) == 0
    # a dry run prints the SuperNode command: the announced address, the published CA, the node's data
    assert cli(["fed", "join", "lab-fed", "--tracking-uri", uri, "--data-path", str(tmp_path), "--dry-run"]) == 0
    cmd = capsys.readouterr().out
    assert "flower-supernode --root-certificates" in cmd and "--superlink 127.0.0.1:8123" in cmd
    assert f'data-path="{tmp_path}"' in cmd
    cert_copy = cmd.split("--root-certificates ")[1].split()[0]
    assert Path(cert_copy).read_text() == (certs / "ca.crt").read_text()
    index.record_join(uri, first)
    index.record_join(uri, first)
    assert index.join_count(uri, first) == 2

    # reports: the CLI and the function both store with the entry; bad input is refused
    assert cli(["fed", "report", "lab-fed", "--category", "connection", "--text", "node 3 cannot reach the link",
                 "--tracking-uri", uri]) == 0
    assert json.loads(capsys.readouterr().out)["index_run_id"] == first.run_id
    index.report(uri, "lab-fed", "malicious", "client-02 sends huge norms")
    assert cli(["fed", "report", "lab-fed", "--category", "rumour", "--text", "x", "--tracking-uri", uri]) == 2
    assert "not one of bug, connection, malicious" in capsys.readouterr().err
    assert cli(["fed", "report", "gone", "--category", "bug", "--text", "x", "--tracking-uri", uri]) == 2
    reports = index.lookup(uri, "lab-fed").reports
    assert [(r["category"], r["text"]) for r in reports] == [
        ("connection", "node 3 cannot reach the link"), ("malicious", "client-02 sends huge norms")]

    # the Federations page: the joinable entry with its join count and live figures; a report filed in its form
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("LOWRES_PROMETHEUS_URL", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=90).run()
    at.switch_page("views/federations.py").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = next(d.value for d in at.dataframe if "joins" in d.value.columns).set_index("federation").loc["lab-fed"]
    assert (shown["state"], bool(shown["joinable"]), shown["joins"], shown["clients_wanted"], shown["rounds_done"],
            shown["eval_loss"], shown["superlink"], bool(shown["tls"])) == \
        ("running", True, 2, 2, 1, 2.5, "127.0.0.1:8123", True)
    at.selectbox(key="report_fed").set_value("lab-fed")
    at.selectbox(key="report_category").set_value("bug")
    at.text_area(key="report_text").set_value("round 2 never ends")
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert [r["text"] for r in index.lookup(uri, "lab-fed").reports][-1] == "round 2 never ends"
    page_reports = next(d.value for d in at.dataframe if "category" in d.value.columns)
    assert "round 2 never ends" in set(page_reports["text"]) and len(page_reports) == 3

    # a federation announced without TLS is joined only with an explicit --insecure
    plain = index.Announcer(load_fed_config(REPO / "configs/fed/tiny-deploy.yaml", [
        "federation=plain-fed", f"tracking.mlflow_uri={uri}", "index.announce=true",
        "index.superlink=127.0.0.1:8124"]), None)
    try:
        assert cli(["fed", "join", "plain-fed", "--tracking-uri", uri, "--data-path", str(tmp_path)]) == 2
        assert "announced without TLS" in capsys.readouterr().err
        assert cli(["fed", "join", "plain-fed", "--tracking-uri", uri, "--data-path", str(tmp_path), "--insecure",
                    "--dry-run"]) == 0
        assert "flower-supernode --insecure --superlink 127.0.0.1:8124" in capsys.readouterr().out
    finally:
        plain.close("FAILED")
    assert index.lookup(uri, "plain-fed").status == "failed"

    beacon.close("FINISHED")
    done = index.lookup(uri, "lab-fed")
    assert done.status == "finished" and not done.joinable
    from lowres.tracking.runs import client

    assert client(uri).get_run(done.run_id).info.status == "FINISHED"
    assert cli(["fed", "join", "lab-fed", "--tracking-uri", uri, "--data-path", str(tmp_path)]) == 2
    assert "is finished; it takes no new nodes" in capsys.readouterr().err


def test_a_silent_entry_is_not_joinable_and_a_key_is_never_published(tmp_path):
    e = index.Entry(run_id="r", federation="f", superlink="h:1", status="running", heartbeat=time.time() - 100,
                    heartbeat_s=30)
    assert e.state() == "silent" and not e.joinable
    e.heartbeat = time.time() - 10
    assert e.state() == "running"
    fed, certs = _fed(tmp_path, f"sqlite:///{tmp_path / 'm.db'}", **{"index.root_cert": str(tmp_path / "certs-lab-fed" / "server.key")})
    from lowres.errors import UsageError

    with pytest.raises(UsageError, match="not a certificate"):
        index.announcement_tags(fed, None)
    with pytest.raises(Exception, match="index.superlink"):
        load_fed_config(REPO / "configs/fed/tiny-deploy.yaml", ["index.announce=true"])
    # no store where the URI points: said, and no empty store created there
    with pytest.raises(UsageError, match="no MLflow store at"):
        index.report(f"sqlite:///{tmp_path / 'none.db'}", "f", "bug", "x")
    assert not (tmp_path / "none.db").exists()
