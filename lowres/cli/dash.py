"""`lowres dash`: start the Streamlit dashboard (dashboards/streamlit_app.py) on 127.0.0.1. Parse and exec only."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

import lowres


def dashboards_dir() -> Path:
    """``$LOWRES_DASHBOARDS`` if set, else ``<repo root>/dashboards`` beside the package (a source checkout)."""
    override = os.environ.get("LOWRES_DASHBOARDS")
    if override:
        return Path(override).expanduser()
    return Path(lowres.__file__).resolve().parents[1] / "dashboards"


def streamlit_command(app: Path, port: int, address: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line: loopback, headless (no browser opened, no e-mail prompt), no telemetry."""
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", address,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "viewer"]  # no "Deploy" button: this app runs where its data is


def dash(
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1 to serve on.")] = 8501,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", metavar="URI", help="MLflow tracking URI "
                                                     "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here; "
                                                     "the dashboard never creates that file).")] = None,
    prometheus: Annotated[str | None, typer.Option("--prometheus", metavar="URL", help="Prometheus base URL for the "
                                                   "Live and Federations pages (default: $LOWRES_PROMETHEUS_URL; "
                                                   "none: read the run's profile.jsonl).")] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Folder searched for runs' profile.jsonl files.")]
    = Path("runs"),
    regression_threshold: Annotated[float, typer.Option("--regression-threshold", metavar="FRACTION", help=
                                                        "Regressions page: the relative change that counts, as "
                                                        "`lowres regress --threshold` (0.05 = 5 %).")] = 0.05,
    mlflow_uri: Annotated[str | None, typer.Option("--mlflow-uri", hidden=True)] = None,  # before --tracking-uri
    port_old: Annotated[int | None, typer.Option("-p", hidden=True)] = None,  # -p is --prompt (generate) now
) -> None:
    """Open the dashboard: Advisor, Live, Compare, Regressions and Federations pages, served on 127.0.0.1."""
    from lowres.errors import UsageError
    from profiler.sinks import PortInUse

    port = port if port_old is None else port_old
    app = dashboards_dir() / "streamlit_app.py"
    if not app.is_file():
        raise UsageError(f"the dashboard app is not at {app}",
                         hint="run from a source checkout, or set LOWRES_DASHBOARDS to the dashboards folder")
    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {port}")
    if not 0 <= regression_threshold < 1:
        raise UsageError(f"--regression-threshold must be a fraction in [0, 1), got {regression_threshold}",
                         hint="0.05 flags a run 5 % slower than its baseline, as lowres regress --threshold")
    if prometheus and not _is_http_url(prometheus):
        raise UsageError(f"--prometheus {prometheus!r} is not an http(s) URL",
                         hint="give Prometheus' base URL, e.g. http://127.0.0.1:9090")
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UsageError(f"--runs-dir {str(runs_dir)!r} is a file, not a folder", hint="give the runs folder")
    from lowres.tracking.uri import check_tracking_uri

    check_tracking_uri(tracking_uri or mlflow_uri, "--tracking-uri")
    _check_free(port, PortInUse)
    env = dict(os.environ)
    from profiler.sinks.mlflow import resolve_tracking_uri

    # Resolved here, to an absolute path for a SQLite store, so the pages read the store this folder meant
    # (and say so when it does not exist, rather than creating an empty mlflow.db wherever Streamlit runs).
    uri = resolve_tracking_uri(tracking_uri or mlflow_uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    env["MLFLOW_TRACKING_URI"] = uri
    if prometheus:
        env["LOWRES_PROMETHEUS_URL"] = prometheus
    env["LOWRES_RUNS_DIR"] = str(runs_dir.expanduser().resolve())
    env["LOWRES_REGRESSION_THRESHOLD"] = str(regression_threshold)
    from profiler.sinks.mlflow import redact_uri

    typer.echo(f"lowres dash: http://127.0.0.1:{port} · MLflow {redact_uri(uri)} (Ctrl+C stops it)", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: a SIGTERM to `lowres dash` (a service manager, a container stop) then reaches Streamlit
    # itself instead of leaving it serving behind a dead parent
    cmd = streamlit_command(app, port)
    os.execve(cmd[0], cmd, env)


def _is_http_url(url: str) -> bool:
    """http(s) with a host: the only URLs the pages may fetch (a file:// URL would read local files)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _check_free(port: int, port_in_use: type) -> None:
    # Streamlit would otherwise print its own long message and exit 1; say it in lowres's words (exit 2).
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as Streamlit's server binds: connections of a dashboard just stopped (TIME_WAIT) do not block a
        # restart; a server listening there still does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise port_in_use(port, "127.0.0.1") from None


dash.context_settings = {"help_option_names": ["-h", "--help"]}
