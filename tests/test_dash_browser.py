"""The dashboard in a real browser: `lowres dash` (streamlit run) on a free loopback port, headless Chromium
driven through chromedriver's WebDriver HTTP API (no Selenium needed), one PNG screenshot per page.

Screenshots land in the test's tmp dir, and are copied to $LOWRES_SCREENSHOTS when it is set."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dash_helpers import seeded_store
from servers import LOOPBACK, free_port, http_get, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# page url path → (title, text only that page shows once its data is on screen, charts it draws at least)
PAGES = {"": ("Advisor", "Predicted peak", 2), "live": ("Live", "CPU cores busy", 5),
         "compare": ("Compare", "Runs shown", 4), "regressions": ("Regressions", "Machine × config groups", 0),
         "federations": ("Federations", "Clients online", 5)}
CHARTS_JS = "return document.querySelectorAll('[data-testid=stVegaLiteChart]').length"

pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                reason="Debian chromium and chromium-driver are not installed")


class WebDriver:
    """The few W3C WebDriver calls this test needs, over plain HTTP to a chromedriver process."""

    def __init__(self, base: str, args: list[str]):
        self.base = base
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.load(r)["value"]

    def cmd(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def script(self, js: str):
        return self.cmd("POST", "/execute/sync", {"script": js, "args": []})

    def quit(self) -> None:
        self._call("DELETE", f"/session/{self.session}")


def _stop(proc: subprocess.Popen) -> None:
    # Each server runs in its own process group (start_new_session): the group holds its children too.
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_every_page_renders_in_chromium(tmp_path_factory, tmp_path):
    seeded = seeded_store(tmp_path_factory.getbasetemp())
    shots = tmp_path / "screenshots"
    shots.mkdir()
    port, driver_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("LOWRES_PROMETHEUS_URL", "MLFLOW_TRACKING_URI")}
    launch = ("from pathlib import Path; from lowres.cli.dash import dash; "
              f"dash(port={port}, tracking_uri={seeded.uri!r}, prometheus=None, runs_dir=Path({str(seeded.runs_dir)!r}), "
              "regression_threshold=0.07)")
    app_log = open(tmp_path / "dash.log", "wb")
    app = subprocess.Popen([sys.executable, "-c", launch], env=env, cwd=tmp_path, stdout=app_log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={driver_port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    browser = None
    try:
        base = f"http://{LOOPBACK}:{port}"
        wait_until(lambda: app.poll() is None and http_get(base + "/_stcore/health")[0] == 200, 90,
                   f"streamlit on {base} (log: {tmp_path / 'dash.log'})")
        wait_until(lambda: http_get(f"http://{LOOPBACK}:{driver_port}/status")[0] == 200, 30, "chromedriver")
        browser = WebDriver(f"http://{LOOPBACK}:{driver_port}", [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,1600"])
        for path, (title, marker, charts) in PAGES.items():
            browser.cmd("POST", "/url", {"url": f"{base}/{path}"})

            def rendered():
                text = browser.script("return document.body.innerText")
                running = browser.script("return !!document.querySelector('[data-testid=stStatusWidget] img, "
                                         "[data-testid=stSkeleton]')")
                return marker in text and not running and browser.script(CHARTS_JS) >= charts and text

            text = wait_until(rendered, 90, f"page {title!r} to show {marker!r}", interval=0.5)
            time.sleep(1.5)  # charts draw after their data arrives
            errors = browser.script("return document.querySelectorAll('[data-testid=stException]').length")
            text = browser.script("return document.body.innerText")
            assert errors == 0 and "Traceback" not in text, f"{title}: {text[:2000]}"
            assert browser.script("return document.querySelector('h1') && document.querySelector('h1').innerText"
                                  ).startswith(title)
            if title == "Regressions":  # `lowres dash --regression-threshold 0.07` reached the page
                assert browser.script("return document.querySelector('[data-testid=stNumberInput] input').value"
                                      ) == "0.07"
            png = base64.b64decode(browser.cmd("GET", "/screenshot"))
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a blank page compresses to far less
            (shots / f"{title.lower()}.png").write_bytes(png)
        assert sorted(p.name for p in shots.iterdir()) == sorted(f"{t.lower()}.png" for t, _, _ in PAGES.values())
        if os.environ.get("LOWRES_SCREENSHOTS"):
            dest = Path(os.environ["LOWRES_SCREENSHOTS"])
            dest.mkdir(parents=True, exist_ok=True)
            for p in shots.iterdir():
                shutil.copy(p, dest / p.name)
    finally:
        if browser is not None:
            browser.quit()
        _stop(driver)
        _stop(app)
        app_log.close()


def test_dash_options_are_checked_before_starting_streamlit(tmp_path):
    import socket

    import typer
    from typer.testing import CliRunner

    from lowres.cli.dash import dash
    from lowres.errors import UsageError
    from profiler.sinks import PortInUse

    cli = typer.Typer()
    cli.command()(dash)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(cli, ["--port", str(port), "--runs-dir", str(tmp_path)])
        assert isinstance(result.exception, PortInUse), result.output
        assert f"port {port} on 127.0.0.1 is already in use" in str(result.exception)
    result = CliRunner().invoke(cli, ["--port", str(port), "--regression-threshold", "5"])  # a percent: not any more
    assert isinstance(result.exception, UsageError) and "fraction" in str(result.exception)


def test_sigterm_to_lowres_dash_stops_streamlit_and_creates_no_store(tmp_path):
    """`lowres dash` execs Streamlit: a service manager's SIGTERM to the pid it started stops the server (a child
    process would have gone on serving); starting on a store that does not exist creates none (the pages reading
    it without creating it: test_dash_apptest's empty-store test)."""
    port = free_port()
    store = tmp_path / "nothing-here.db"
    env = {k: v for k, v in os.environ.items() if k not in ("LOWRES_PROMETHEUS_URL", "MLFLOW_TRACKING_URI")}
    log = open(tmp_path / "dash.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lowres.cli.app", "dash", "--port", str(port), "--tracking-uri",
                             f"sqlite:///{store}"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://{LOOPBACK}:{port}"
    try:
        wait_until(lambda: proc.poll() is None and http_get(base + "/_stcore/health")[0] == 200, 90,
                   f"streamlit on {base} (log: {tmp_path / 'dash.log'})")
        assert http_get(base + "/compare")[0] == 200
        proc.send_signal(signal.SIGTERM)  # the process we started, not its group
        proc.wait(30)

        def refused():
            try:
                http_get(base + "/_stcore/health", timeout=2)
            except OSError:
                return True
            return False

        wait_until(refused, 15, f"nothing serving on {base} after SIGTERM")
        assert not store.exists() and not (tmp_path / "mlflow.db").exists()
    finally:
        _stop(proc)
        log.close()
