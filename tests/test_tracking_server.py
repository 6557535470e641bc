"""The shared tracking server as a lab runs it: ``mlflow/start-server.sh`` starts a real PostgreSQL (initdb into
a temp dir, loopback, free port) and a real ``mlflow server`` with basic auth on top of it.

Checks: a wrong password is refused (401) and the right one accepted; 8 concurrent writers × 1,000 metric points
each all read back — through MLflow and counted in PostgreSQL itself — with no duplicates.
"""

import base64
import os
import secrets
import shutil
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lowres.tracking import runs
from lowres.tracking.logger import SpoolingLogger
from servers import LOOPBACK, _process, free_port

FOLDER = Path(__file__).resolve().parents[1] / "mlflow"
SCRIPT = FOLDER / "start-server.sh"
WRITERS, STEPS, KEYS = 8, 100, 10  # 100 steps x 10 keys = 1,000 points per writer, one request per step
ADMIN_PASSWORD = "lowres-test-admin-pw"  # test-only, >= 12 characters as MLflow requires


@pytest.fixture(scope="module")
def server():
    """(tracking URI, PostgreSQL port, env with PGPASSWORD) of a server started by the lab's own script."""
    if not Path("/usr/lib/postgresql").is_dir() or shutil.which("psql") is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    pytest.importorskip("psycopg", reason="psycopg[binary] is needed for MLflow's PostgreSQL store")
    # Not under pytest's tmp dir: that is root-only (0700) and PostgreSQL runs as another user.
    work = Path(tempfile.mkdtemp(prefix="lowres-mlflow-server-"))
    work.chmod(0o755)
    try:
        port, pg_port = free_port(), free_port()
        env = {"PGPASSWORD": secrets.token_urlsafe(18), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
        cmd = ["bash", str(SCRIPT), "--port", str(port), "--pg-port", str(pg_port), "--pg-data", str(work / "pg"),
               "--state-dir", str(work / "state"), "--python", sys.executable, "--workers", "2"]
        uri = f"http://{LOOPBACK}:{port}"
        with _process(cmd, work, uri + "/health", "start-server", 150, env=env):
            yield uri, pg_port, env
        log = (work / "start-server.log").read_text(errors="replace")
        for secret in env.values():  # secrets never reach the log
            assert secret not in log
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_folder_holds_no_package_and_no_secret():
    import mlflow

    assert not (FOLDER / "__init__.py").exists()  # it would shadow the real mlflow
    assert "site-packages" in mlflow.__file__
    ini = (FOLDER / "basic_auth.ini").read_text()
    assert "@AUTH_DATABASE_URI@" in ini
    assert not [line for line in ini.splitlines() if line.strip().startswith(("admin_password", "password"))]


def get_status(url: str, user: str | None, password: str | None) -> int:
    req = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.server
def test_authentication_refuses_a_wrong_password(server):
    uri, _, _ = server
    url = uri + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert get_status(url, None, None) == 401
    assert get_status(url, "admin", "wrong-password-123") == 401
    assert get_status(url, "nobody-here", ADMIN_PASSWORD) == 401
    assert get_status(url, "admin", ADMIN_PASSWORD) == 200


@pytest.mark.server
def test_eight_concurrent_writers_lose_and_duplicate_nothing(server, tmp_path, monkeypatch):
    import psycopg

    uri, pg_port, env = server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    loggers = [SpoolingLogger.start("writers", run_name=f"w{i}", tracking_uri=uri, spool_dir=tmp_path, timeout_s=30)
               for i in range(WRITERS)]
    assert not any(lg.pending for lg in loggers)
    errors: list[BaseException] = []
    go = threading.Barrier(WRITERS)

    def write(lg: SpoolingLogger) -> None:
        try:
            go.wait()  # all eight start together
            for step in range(STEPS):
                lg.log_metrics({f"bench/m{k}": step + k / 10 for k in range(KEYS)}, step)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(lg,)) for lg in loggers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and not any(t.is_alive() for t in threads)
    assert [(lg.sent, lg.spooled) for lg in loggers] == [(STEPS, 0)] * WRITERS, [lg.describe() for lg in loggers]

    c = runs.client(uri)
    total = 0
    for lg in loggers:
        for k in range(KEYS):
            points = c.get_metric_history(lg.run_id, f"bench/m{k}")
            assert sorted(m.step for m in points) == list(range(STEPS))  # every step once: none lost, none doubled
            assert all(m.value == pytest.approx(m.step + k / 10) for m in points)
            total += len(points)
    # The same count from PostgreSQL itself, not through MLflow.
    with psycopg.connect(host=LOOPBACK, port=pg_port, user="mlflow", password=env["PGPASSWORD"],
                         dbname="mlflow") as conn:
        rows, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (run_uuid, key, step)) FROM metrics WHERE run_uuid = ANY(%s)",
            ([lg.run_id for lg in loggers],)).fetchone()
    print(f"{WRITERS} writers x {STEPS * KEYS} points: {total} read back through MLflow, {rows} rows in PostgreSQL, "
          f"{distinct} distinct (run, key, step)")
    assert total == rows == distinct == WRITERS * STEPS * KEYS
