"""Real servers for tests: Prometheus, Pushgateway and ``mlflow server``, each a subprocess on a free loopback
port in a temp dir, stopped when the ``with`` block ends — also when the test fails.

Tests import it as ``from servers import ...`` (tests/ has no ``__init__.py``). A server that does not come
up raises with the tail of its log, so a failing start says why.
"""

from __future__ import annotations

import contextlib
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


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    """Poll ``check()`` until it returns something truthy, or fail the test naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
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
def _process(cmd: Sequence[str], workdir: Path, ready_url: str, name: str, timeout: float) -> Iterator[None]:
    """Run ``cmd`` in its own process group, wait for ``ready_url`` to answer 200, stop it on exit."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        # A new session, so stopping it reaches the workers it forks (mlflow server runs uvicorn workers).
        proc = subprocess.Popen(list(cmd), cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{_tail(log_path)}")
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
def mlflow_server(backend_uri: str | None = None, timeout: float = 90.0) -> Iterator[str]:
    """A real ``mlflow server`` subprocess (one worker) on a free port; yields its tracking URI.

    ``backend_uri`` defaults to a SQLite file in the server's temp dir; artifacts go there too.
    """
    with tempfile.TemporaryDirectory(prefix="lowres-mlflow-") as tmp:
        work = Path(tmp)
        port = free_port()
        backend = backend_uri or f"sqlite:///{work / 'mlflow.db'}"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(port),
               "--workers", "1", "--backend-store-uri", backend,
               "--artifacts-destination", str(work / "mlartifacts")]
        base = f"http://{LOOPBACK}:{port}"
        with _process(cmd, work, base + "/health", "mlflow-server", timeout):
            yield base


def prometheus_query(base: str, promql: str) -> list[dict]:
    """The result vector of an instant PromQL query through Prometheus' HTTP API."""
    import json
    import urllib.parse

    status, body = http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    data = json.loads(body)
    if status != 200 or data.get("status") != "success":
        raise AssertionError(f"query {promql!r} failed ({status}): {body[:500]!r}")
    return data["data"]["result"]
