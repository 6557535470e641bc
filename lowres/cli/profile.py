"""`lowres profile [options] -- CMD ARGS…`: run any command under the profiler, following its whole process
tree; print a summary table at the end and exit with the command's own exit code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lowres.errors import CommandNotFound, UsageError

MAX_INTERVAL_S = 3600.0


def _check_interval(interval: float) -> None:
    if not (0 < interval <= MAX_INTERVAL_S):
        raise UsageError(f"--interval must be more than 0 and at most {MAX_INTERVAL_S:.0f} seconds, got {interval}",
                         hint="e.g. --interval 0.1 samples at 10 Hz")


def _mlflow_run(cmd: list[str]):
    """A new MLflow run (experiment ``lowres-profile``) for this command, with lowres' standard tags — the
    machine's fingerprint and tier among them — and a name that says what ran: ``profile-python-train-host-1a2b``
    for ``python train.py`` (the program, its first argument's stem, the host, a random suffix)."""
    import platform

    from lowres.hardware import detect
    from lowres.tracking.logger import SpoolingLogger
    from lowres.tracking.runs import descriptive_run_name

    # A tracking server that is down must neither hang this command nor stop CMD from running: its /health is
    # asked with a short timeout, and everything goes to the spool for `lowres sync` when it does not answer.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    hw = detect(probe_bnb=False)  # cheap: no torch import
    what = [Path(cmd[0]).name] + [Path(a).stem for a in cmd[1:2] if not a.startswith("-")]
    return SpoolingLogger.start("lowres-profile", run_name=descriptive_run_name(
        "profile", *what, platform.node().split(".")[0][:24]), fingerprint=hw.fingerprint, tier=hw.tier,
        tags={"lowres.command": " ".join(cmd)[:5000], "lowres.kind": "profile"}, timeout_s=5.0)


def _sink_specs(jsonl: Optional[Path], prometheus_port: Optional[int], pushgateway: Optional[str],
                mlflow_run, run: str) -> list[dict]:
    specs: list[dict] = []
    if jsonl is not None:
        specs.append({"kind": "jsonl", "path": str(jsonl)})
    if prometheus_port is not None:
        if not 0 <= prometheus_port <= 65535:
            raise UsageError(f"--prometheus-port must be 0..65535 (0 = any free port), got {prometheus_port}")
        specs.append({"kind": "prometheus", "port": prometheus_port, "addr": "127.0.0.1"})
    if pushgateway is not None:
        specs.append({"kind": "pushgateway", "url": pushgateway, "job": "lowres", "grouping": {"run": run}})
    if mlflow_run is not None:
        specs.append({"kind": "mlflow", "tracking_uri": mlflow_run.tracking_uri, "run_id": mlflow_run.run_id,
                      "interval_s": 10})
    return specs


def _check_outputs(jsonl: Optional[Path], pushgateway: Optional[str], mlflow: bool) -> None:
    """Refuse (exit 2) outputs that cannot work, before the command starts."""
    from urllib.parse import urlsplit

    if jsonl is not None:
        from lowres.locks import check_output_dir

        if jsonl.is_dir():
            raise UsageError(f"--jsonl {str(jsonl)!r} is a folder", hint="give a file name, e.g. prof.jsonl")
        check_output_dir(jsonl.parent, "folder of --jsonl")
    if pushgateway is not None:
        target = pushgateway if "://" in pushgateway else f"http://{pushgateway}"
        try:
            parts = urlsplit(target)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"--pushgateway {pushgateway!r} is not HOST:PORT or an http(s) URL",
                             hint="e.g. --pushgateway 127.0.0.1:9091")
    if mlflow:
        from lowres.tracking.uri import check_tracking_uri

        check_tracking_uri(None, "MLFLOW_TRACKING_URI")


def _check_command(cmd: list[str]) -> None:
    """Fail before anything starts (a sink, an MLflow run) when there is no command to run."""
    if not cmd:
        raise UsageError("no command given", hint="usage: lowres profile [options] -- CMD ARGS…")
    if os.sep not in cmd[0] and shutil.which(cmd[0]) is None:
        raise CommandNotFound(f"command not found: {cmd[0]!r}", hint="check the spelling and your PATH")


def _own_hwm() -> int:
    """This process's VmHWM in bytes (0 where unknown)."""
    try:
        with open("/proc/self/status", "rb") as f:
            text = f.read()
        return int(text[text.index(b"VmHWM:") + 6 :].split()[0]) * 1024
    except (OSError, ValueError):
        return 0


def _spawn(cmd: list[str]) -> subprocess.Popen:
    try:
        return subprocess.Popen(cmd)
    except FileNotFoundError:
        raise CommandNotFound(f"command not found: {cmd[0]!r}", hint="check the spelling and your PATH") from None
    except PermissionError:
        raise CommandNotFound(f"{cmd[0]!r} is not executable", hint=f"chmod +x {cmd[0]}") from None


def _wait(child: subprocess.Popen, spawner_hwm: int) -> tuple[int, float, int]:
    """Reap the child with wait4: its exit code (128+N when killed by signal N, as shells report), and the
    kernel's exact CPU seconds and peak RSS for it and the descendants it waited for.

    The kernel keeps the high-water mark of the memory image a process had before exec — with vfork, ours —
    so ru_maxrss is the child's own peak only where it exceeds ``spawner_hwm``; otherwise 0 (unknown, and
    the sampled high-water marks stand)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child; we report after
    forward = signal.signal(signal.SIGTERM, lambda sig, frame: child.send_signal(sig))
    try:
        _, status, ru = os.wait4(child.pid, 0)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, forward)
    code = os.waitstatus_to_exitcode(status)
    child.returncode = code  # Popen must not try to reap it again
    maxrss = ru.ru_maxrss * 1024
    return (128 - code if code < 0 else code), ru.ru_utime + ru.ru_stime, maxrss if maxrss > spawner_hwm else 0


def profile(
    ctx: typer.Context,
    interval: float = typer.Option(1.0, "--interval", help="seconds between samples (0.1 = 10 Hz)"),
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", help="append every sample to this JSONL file"),
    prometheus_port: Optional[int] = typer.Option(None, "--prometheus-port",
                                                  help="serve /metrics on 127.0.0.1:PORT (0 = a free port)"),
    pushgateway: Optional[str] = typer.Option(None, "--pushgateway", help="push to a Pushgateway at HOST:PORT"),
    mlflow: bool = typer.Option(False, "--mlflow/--no-mlflow", help="log system metrics to an MLflow run"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout"),
) -> None:
    """Run CMD under the profiler (its whole process tree) and print what it cost the machine."""
    from profiler import Profiler

    _check_interval(interval)
    run = uuid.uuid4().hex[:8]
    cmd = list(ctx.args)
    err = Console(stderr=True)
    _check_command(cmd)
    _check_outputs(jsonl, pushgateway, mlflow)
    mlflow_run = _mlflow_run(cmd) if mlflow else None
    specs = _sink_specs(jsonl, prometheus_port, pushgateway, mlflow_run, run)
    spawner_hwm = _own_hwm()
    child = _spawn(cmd)
    # Thread mode: this process only waits, so a sampler thread has the GIL to itself.
    prof = Profiler(interval=interval, sinks=specs, mode="thread", pid=child.pid, labels={"run": run})
    try:
        prof.start()
    except BaseException as exc:
        child.kill()
        child.wait()
        if type(exc).__name__ == "PortInUse" and isinstance(exc, OSError):  # profiler.sinks.PortInUse
            raise UsageError(f"--prometheus-port {prometheus_port} is already in use",
                            hint="pick another port, or 0 for any free one") from None
        raise
    for info in prof.sinks_info:
        if info.get("url"):
            err.print(f"[dim]profiler: {info.get('kind', 'sink')} at {info['url']}[/]", highlight=False)
    code = 1
    try:
        code, cpu_s, maxrss = _wait(child, spawner_hwm)
        prof.account_exit(child.pid, cpu_s, maxrss)
    finally:
        summary = prof.stop()
        if mlflow_run is not None:
            import tempfile

            # the summary printed below, kept with the run as `lowres train` keeps its own
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "profile_summary.json"
                path.write_text(json.dumps({"command": cmd, "exit_code": code, **summary.to_dict()}, indent=2,
                                           default=str))
                mlflow_run.log_artifact(path)
            mlflow_run.end("FINISHED" if code == 0 else "FAILED")
            if mlflow_run.spooled:
                err.print(f"MLflow at {mlflow_run.shown_uri} did not take run {mlflow_run.run_id}: its figures are "
                          f"spooled in {mlflow_run.spool_dir} — run `lowres sync` when the server is back",
                          highlight=False)
    if as_json:
        print(json.dumps({"command": cmd, "exit_code": code, **summary.to_dict()}))
    else:
        err.print(summary.table())
        if summary.unavailable:
            err.print("[dim]not sampled: " + "; ".join(f"{k} ({v})" for k, v in summary.unavailable.items()) + "[/]",
                      highlight=False)
    sys.exit(code)


profile.context_settings = {"allow_extra_args": True, "ignore_unknown_options": True}
profile.options_metavar = "[OPTIONS] -- CMD ARGS…"
