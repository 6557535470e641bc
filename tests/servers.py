"""Real servers for tests: Prometheus, Pushgateway, PostgreSQL and ``mlflow server``, each a subprocess on a free
loopback port in a temp dir, stopped when the ``with`` block ends — also when the test fails.

Tests import it as ``from servers import ...`` (tests/ has no ``__init__.py``). A server that does not come
up raises with the tail of its log, so a failing start says why.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pytest

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTP errors return their status instead of raising."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class ServerExited(AssertionError):
    """A server process died while we waited for it: fail at once instead of polling to the timeout."""


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    """Poll ``check()`` until it returns something truthy, or fail the test naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except ServerExited:
            raise
        except Exception as exc:  # the server may not be listening yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_exc!r})")


def _require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/bin/{binary}" if os.path.exists(f"/usr/bin/{binary}") else None)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package; .ci/setup installs it)")
    return path


@contextlib.contextmanager
def _process(cmd: Sequence[str], workdir: Path, ready_url: str, name: str, timeout: float,
             env: dict[str, str] | None = None) -> Iterator[None]:
    """Run ``cmd`` in its own process group, wait for ``ready_url`` to answer 200, stop it on exit.

    ``env`` is added to this process's environment (secrets travel this way, never on the command line).
    """
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:  # appended: a restarted server keeps the earlier log for failures
        # A new session, so stopping it reaches the workers it forks (mlflow server runs uvicorn workers).
        proc = subprocess.Popen(list(cmd), cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **env} if env else None)
    try:
        def ready():
            if proc.poll() is not None:
                raise ServerExited(f"{name} exited with {proc.returncode}")
            return http_get(ready_url, timeout=2)[0] == 200
        try:
            wait_until(ready, timeout, f"{name} at {ready_url}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {name} log ---\n{_tail(log_path)}") from None
        yield
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    else:
        # The leader is gone but its workers may not be: the group still names them.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def prometheus_server(scrape_targets: Sequence[str] = (), scrape_interval: str = "1s",
                      timeout: float = 30.0) -> Iterator[str]:
    """A real Prometheus scraping ``host:port`` targets (job ``lowres``); yields its base URL."""
    binary = _require("prometheus")
    with tempfile.TemporaryDirectory(prefix="lowres-prom-") as tmp:
        work = Path(tmp)
        targets = ", ".join(f"'{t}'" for t in scrape_targets)
        (work / "prometheus.yml").write_text(
            "global:\n"
            f"  scrape_interval: {scrape_interval}\n"
            f"  evaluation_interval: {scrape_interval}\n"
            "scrape_configs:\n"
            "  - job_name: lowres\n"
            f"    scrape_interval: {scrape_interval}\n"
            f"    static_configs:\n      - targets: [{targets}]\n")
        port = free_port()
        cmd = [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
               f"--web.listen-address={LOOPBACK}:{port}", "--log.level=warn"]
        base = f"http://{LOOPBACK}:{port}"
        with _process(cmd, work, base + "/-/ready", "prometheus", timeout):
            yield base


@contextlib.contextmanager
def pushgateway_server(timeout: float = 20.0) -> Iterator[str]:
    """A real Pushgateway (in-memory, no persistence file); yields its base URL."""
    binary = _require("prometheus-pushgateway")
    with tempfile.TemporaryDirectory(prefix="lowres-pgw-") as tmp:
        work = Path(tmp)
        port = free_port()
        # The Debian default persistence file is under /var/lib; a test must not touch it.
        cmd = [binary, f"--web.listen-address={LOOPBACK}:{port}", f"--persistence.file={work / 'pgw.data'}",
               "--log.level=warn"]
        base = f"http://{LOOPBACK}:{port}"
        with _process(cmd, work, base + "/-/ready", "pushgateway", timeout):
            yield base


@contextlib.contextmanager
def mlflow_server(backend_uri: str | None = None, timeout: float = 90.0, *, app_name: str | None = None,
                  env: dict[str, str] | None = None, port: int | None = None, workdir: str | Path | None = None,
                  workers: int = 1) -> Iterator[str]:
    """A real ``mlflow server`` subprocess on a free port; yields its tracking URI.

    ``backend_uri`` defaults to a SQLite file in the server's temp dir; artifacts go there too. ``app_name``
    (``basic-auth``) and ``env`` (its config path and admin password) turn on authentication. Passing the
    ``port`` and ``workdir`` of an earlier server restarts "the same" server: same URL, same artifacts.
    """
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="lowres-mlflow-")))
        port = port or free_port()
        backend = backend_uri or f"sqlite:///{work / 'mlflow.db'}"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(port),
               "--workers", str(workers), "--backend-store-uri", backend,
               "--artifacts-destination", str(work / "mlartifacts")]
        if app_name:
            cmd += ["--app-name", app_name]
        base = f"http://{LOOPBACK}:{port}"
        with _process(cmd, work, base + "/health", "mlflow-server", timeout, env=env):
            yield base


@dataclass(frozen=True)
class Postgres:
    """A running test PostgreSQL: where it listens and how to log in (the password stays in the test)."""

    host: str
    port: int
    user: str
    password: str

    def uri(self, database: str, with_password: bool = False) -> str:
        """A SQLAlchemy URI; without the password libpq takes it from ``PGPASSWORD`` (see ``env``)."""
        auth = f"{self.user}:{self.password}" if with_password else self.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a client process: libpq reads the password from here, never from argv."""
        return {"PGPASSWORD": self.password}

    def create_database(self, name: str) -> str:
        """Create database ``name`` (if missing) and return its URI (password-free)."""
        import psycopg

        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                             dbname="postgres", autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)


def _pg_bin(name: str) -> str:
    for version_dir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (version_dir / name).exists():
            return str(version_dir / name)
    return _require(name)


@contextlib.contextmanager
def postgres_server(timeout: float = 60.0) -> Iterator[Postgres]:
    """A real PostgreSQL (Debian ``postgresql``): ``initdb`` + ``pg_ctl`` into a temp dir, listening on a free
    loopback port with password (SCRAM) authentication; stopped (``pg_ctl stop -m fast``) on exit.

    PostgreSQL refuses to run as root, so as root it runs as ``nobody`` (the temp dir is handed to it).
    """
    import secrets

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    # SQLAlchemy 2.1 reads postgresql:// as psycopg 3 (PyPI ``psycopg[binary]``)
    pytest.importorskip("psycopg", reason="psycopg[binary] is needed for MLflow's PostgreSQL store")
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    with tempfile.TemporaryDirectory(prefix="lowres-pg-") as tmp:
        work = Path(tmp)
        password = secrets.token_urlsafe(18)
        pwfile = work / "pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if as_user:
            for p in (work, pwfile):
                os.chown(p, 65534, 65534)
        data, log_path, port = work / "data", work / "postgres.log", free_port()
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=timeout)
        res = run(as_user + [initdb, "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
                             "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8",
                             "--no-instructions"])
        pwfile.unlink()
        if res.returncode != 0:
            raise AssertionError(f"initdb failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
        # Loopback only, socket in the temp dir (not /var/run/postgresql), small footprint for a test.
        opts = (f"-c listen_addresses={LOOPBACK} -c port={port} -c unix_socket_directories={work} "
                "-c max_connections=50 -c shared_buffers=32MB -c fsync=off")
        res = run(as_user + [pg_ctl, "-D", str(data), "-l", str(log_path), "-o", opts, "-w",
                             "-t", str(int(timeout)), "start"])
        try:
            if res.returncode != 0:
                raise AssertionError(f"pg_ctl start failed ({res.returncode}):\n{res.stdout}{res.stderr}"
                                     f"\n--- postgres log ---\n{_tail(log_path)}")
            yield Postgres(LOOPBACK, port, "postgres", password)
        finally:
            run(as_user + [pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"])


def prometheus_query(base: str, promql: str) -> list[dict]:
    """The result vector of an instant PromQL query through Prometheus' HTTP API."""
    import json
    import urllib.parse

    status, body = http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    data = json.loads(body)
    if status != 200 or data.get("status") != "success":
        raise AssertionError(f"query {promql!r} failed ({status}): {body[:500]!r}")
    return data["data"]["result"]
