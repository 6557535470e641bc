"""Is a federation server alive? Heartbeat and end-marker tags, one classification, and ending crashed runs.

A federation's server (lowres.federated.monitor.FedMonitor, used by lowres' own round loop and by the wrapper
around stock Flower strategies) writes, on its MLflow parent run:

- at start: ``lowres.fed.status=running``, where it runs (``lowres.fed.server_host`` / ``_boot`` / ``_pid`` /
  ``_pid_started`` / ``_pid_ns``) and its thresholds (``lowres.fed.heartbeat_s``, ``crashed_after_s``, ``stalled_after_s``);
- every ``heartbeat_s`` (default 30 s): ``lowres.fed.heartbeat`` and ``lowres.fed.progress`` (Unix seconds of
  the beat and of the last round progress: a round started or finished, a reply or a failure recorded), in one
  ``log_batch`` of two tags — tags overwrite, so a long federation does not grow the store;
- at the end, the end marker: ``lowres.fed.status=finished`` (clean) or ``failed`` (a handled error) and
  ``lowres.fed.ended``, before the run is ended FINISHED / FAILED.

A server killed with SIGKILL (or a machine that dies) writes no end marker. ``classify`` tells the states
apart, in this order:

- ``finished`` / ``failed``: the end marker (or, for runs without one, MLflow's status FINISHED / other);
- ``crashed``: the run is still RUNNING, no end marker, and either its server process is gone (only judged on
  the server's own machine: same host name, boot time and pid namespace — a container on the same kernel may
  share the first two —; the pid's start time guards against a reused pid)
  or its heartbeat is older than ``crashed_after_s`` (default 120 s: four missed 30 s heartbeats);
- ``stalled``: the heartbeat is fresh but there was no round progress for ``stalled_after_s`` (default 900 s,
  above the default 600 s round timeout: a round may legitimately wait that long for its slowest reply);
- ``running``: otherwise.

A run without heartbeat tags (logged by an older lowres) is judged by its newest metric or its start, with
``stalled_after_s`` as the silence that means crashed (it never beat, so silence alone is weaker evidence).

Whoever notices a crash ends the run FAILED, tagged ``lowres.fed.status=crashed``, ``lowres.fed.crash_noticed``
(when, UTC), ``lowres.fed.crash_noticed_by`` and ``lowres.fed.crash_reason``: ``lowres fed run`` and
``lowres fed status`` (``scan``: one search of the experiment's RUNNING federation runs) and the dashboard's
Federations page. Nothing stays RUNNING. A server that was only slow to beat (a network cut longer than
``crashed_after_s``) still ends its run with its own marker and status when it finishes.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

TAG_STATUS = "lowres.fed.status"  # running | finished | failed | crashed
TAG_HEARTBEAT = "lowres.fed.heartbeat"
TAG_PROGRESS = "lowres.fed.progress"
TAG_ENDED = "lowres.fed.ended"
TAG_HOST, TAG_BOOT, TAG_PID, TAG_PID_STARTED = ("lowres.fed.server_host", "lowres.fed.server_boot",
                                                "lowres.fed.server_pid", "lowres.fed.server_pid_started")
TAG_PID_NS = "lowres.fed.server_pid_ns"  # containers on one kernel share host name and boot time, not pids
TAG_HEARTBEAT_S, TAG_CRASHED_AFTER_S, TAG_STALLED_AFTER_S = ("lowres.fed.heartbeat_s", "lowres.fed.crashed_after_s",
                                                             "lowres.fed.stalled_after_s")
TAG_NOTICED, TAG_NOTICED_BY, TAG_REASON = ("lowres.fed.crash_noticed", "lowres.fed.crash_noticed_by",
                                           "lowres.fed.crash_reason")

HEARTBEAT_S = 30.0  # one MLflow write of two tags per beat: ~120 a hour
CRASHED_AFTER_S = 120.0  # four missed beats: a busy server or a slow store does not look dead
STALLED_AFTER_S = 900.0  # above the default round timeout (600 s)

STATES = ("running", "stalled", "crashed", "finished", "failed")
# Prometheus' lowres_fed_server_status{status=…}: what the server itself can say (crashed it cannot)
SERVER_STATES = ("running", "finished", "failed")


@dataclass(frozen=True)
class Health:
    """A federation's state, why, and the ages it was judged by (None: unknown)."""

    state: str
    reason: str
    heartbeat_age_s: float | None = None
    progress_age_s: float | None = None


# ---------------------------------------------------------------------------------------------- the server side
def server_tags(heartbeat_s: float, crashed_after_s: float, stalled_after_s: float) -> dict[str, str]:
    """The tags a server sets when it starts: where it runs, its thresholds, status running, a first beat."""
    import psutil

    now = time.time()
    me = psutil.Process()
    return {TAG_STATUS: "running", TAG_HEARTBEAT: f"{now:.1f}", TAG_PROGRESS: f"{now:.1f}",
            TAG_HOST: socket.gethostname(), TAG_BOOT: f"{psutil.boot_time():.0f}", TAG_PID: str(me.pid),
            TAG_PID_STARTED: f"{me.create_time():.2f}", TAG_HEARTBEAT_S: f"{heartbeat_s:g}",
            TAG_CRASHED_AFTER_S: f"{crashed_after_s:g}", TAG_STALLED_AFTER_S: f"{stalled_after_s:g}",
            TAG_PID_NS: _pid_namespace()}


def _pid_namespace() -> str:
    """This process's pid namespace (Linux: the inode of /proc/self/ns/pid), "" where there is none."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def beat_tags(now: float, progress: float) -> dict[str, str]:
    """One heartbeat: two tags, about 60 bytes of payload."""
    return {TAG_HEARTBEAT: f"{now:.1f}", TAG_PROGRESS: f"{progress:.1f}"}


def end_tags(status: str) -> dict[str, str]:
    """The end marker for MLflow's ``FINISHED`` (→ finished) or any other end status (→ failed)."""
    return {TAG_STATUS: "finished" if status == "FINISHED" else "failed", TAG_ENDED: f"{time.time():.1f}"}


# ---------------------------------------------------------------------------------------------- classification
def _float(tags: Mapping[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None


def process_gone(tags: Mapping[str, str]) -> str | None:
    """Why the server process is known to be gone, or None (alive, or on another machine: cannot tell)."""
    import psutil

    pid, started, boot = _float(tags, TAG_PID), _float(tags, TAG_PID_STARTED), _float(tags, TAG_BOOT)
    if pid is None or tags.get(TAG_HOST) != socket.gethostname() or boot is None \
            or abs(boot - psutil.boot_time()) > 2 or tags.get(TAG_PID_NS, "") != _pid_namespace():
        return None
    where = f"server process {int(pid)} on {tags[TAG_HOST]}"
    try:
        proc = psutil.Process(int(pid))
        if started is not None and abs(proc.create_time() - started) > 1:
            return f"{where} is gone (the pid now belongs to another process)"
        if proc.status() == psutil.STATUS_ZOMBIE:
            return f"{where} is gone (a zombie)"
    except psutil.NoSuchProcess:
        return f"{where} is gone"
    except psutil.Error:  # access denied: it exists
        return None
    return None


def classify(status: str, tags: Mapping[str, str], now: float | None = None, *,
             last_activity_s: float | None = None, crashed_after_s: float | None = None,
             stalled_after_s: float | None = None, check_process: bool = True) -> Health:
    """The state of a federation run from its MLflow ``status`` and ``tags`` (see the module docstring).
    ``last_activity_s``: Unix time of its newest metric or its start, used when it has no heartbeat tags.
    Thresholds: the arguments, else the run's own tags, else the defaults above."""
    now = time.time() if now is None else now
    marker = tags.get(TAG_STATUS)
    if marker == "crashed":
        return Health("crashed", tags.get(TAG_REASON) or "ended as crashed")
    if status != "RUNNING":
        if marker in ("finished", "failed"):
            return Health(marker, f"end marker {marker}")
        return Health("finished" if status == "FINISHED" else "failed", f"MLflow status {status}, no end marker")
    crashed_after = crashed_after_s or _float(tags, TAG_CRASHED_AFTER_S) or CRASHED_AFTER_S
    stalled_after = stalled_after_s or _float(tags, TAG_STALLED_AFTER_S) or STALLED_AFTER_S
    beat, progress = _float(tags, TAG_HEARTBEAT), _float(tags, TAG_PROGRESS)
    if beat is None:  # an older lowres: no heartbeat, judged by its metrics
        age = None if last_activity_s is None else now - last_activity_s
        if age is not None and age > stalled_after:
            return Health("crashed", f"RUNNING without heartbeat tags, nothing logged for {age:.0f} s", age, age)
        return Health("running", "no heartbeat tags (older lowres)", age, age)
    beat_age = now - beat
    progress_age = None if progress is None else now - progress
    gone = process_gone(tags) if check_process else None
    if gone:
        return Health("crashed", gone, beat_age, progress_age)
    if beat_age > crashed_after:
        return Health("crashed", f"no heartbeat for {beat_age:.0f} s (crashed after {crashed_after:g} s)",
                      beat_age, progress_age)
    if progress_age is not None and progress_age > stalled_after:
        return Health("stalled", f"heartbeat alive, no round progress for {progress_age:.0f} s "
                                 f"(stalled after {stalled_after:g} s)", beat_age, progress_age)
    return Health("running", "heartbeat alive", beat_age, progress_age)


def classify_run(run: Any, now: float | None = None, **thresholds: Any) -> Health:
    """``classify`` for an MLflow ``Run`` (its newest metric or its start is the activity of a run without
    heartbeat tags)."""
    objs = getattr(run.data, "_metric_objs", None) or []
    stamps = [m.timestamp for m in objs] + [run.info.start_time or 0]
    return classify(run.info.status, run.data.tags, now, last_activity_s=max(stamps) / 1000.0, **thresholds)


# ---------------------------------------------------------------------------------------------- noticing
def end_crashed(run_id: str, health: Health, noticed_by: str, tracking_uri: str | None = None) -> None:
    """End a crashed federation's run (and its clients' runs still RUNNING) as FAILED, tagged crashed."""
    from lowres.tracking.runs import client, end_run, set_tags

    noticed = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    c = client(tracking_uri)
    set_tags(run_id, {TAG_STATUS: "crashed", TAG_NOTICED: noticed, TAG_NOTICED_BY: noticed_by,
                      TAG_REASON: health.reason[:500]}, tracking_uri)
    run = c.get_run(run_id)
    children = c.search_runs([run.info.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'"), max_results=1000)
    for child in children:
        end_run(child.info.run_id, "FAILED", tracking_uri)
    end_run(run_id, "FAILED", tracking_uri)


def _store_reachable(uri: str) -> bool:
    """Whether a scan may touch ``uri``: a SQLite file that exists (never create one), an HTTP server that
    answers ``/health`` within 2 s (MLflow's own retries would hold a command for minutes)."""
    if uri.startswith("sqlite:///"):
        return os.path.exists(uri[len("sqlite:///"):])
    if uri.startswith(("http://", "https://")):
        from lowres.tracking.logger import server_alive

        return server_alive(uri, timeout_s=2.0)
    return True


def scan(tracking_uri: str | None = None, experiment: str = "lowres-fed", *, noticed_by: str = "lowres fed",
         end: bool = True, console: Any = None, now: float | None = None) -> list[tuple[Any, Health]]:
    """The experiment's RUNNING federation runs with their health (one search); crashed ones are ended FAILED
    when ``end``. Never raises for the store: a scan is a side task of whatever command runs it."""
    from profiler.sinks.mlflow import redact_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    try:
        if not _store_reachable(uri):
            return []
        from lowres.tracking.runs import client

        c = client(uri)
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            return []
        runs = c.search_runs([exp.experiment_id], filter_string=(
            "attributes.status = 'RUNNING' and tags.`lowres.command` = 'fed'"), max_results=1000)
        out = []
        for run in runs:
            health = classify_run(run, now)
            if health.state == "crashed" and end:
                end_crashed(run.info.run_id, health, noticed_by, uri)
                if console is not None:
                    name = run.data.tags.get("lowres.federation") or run.info.run_name
                    console.print(f"federation {name!r} (run {run.info.run_id}) crashed: {health.reason}; "
                                  "its MLflow run is now FAILED", highlight=False, soft_wrap=True)
            out.append((run, health))
        return out
    except Exception as exc:  # noqa: BLE001 — a scan never stops the command that runs it
        if console is not None:
            console.print(f"warning: could not check {redact_uri(uri)} for crashed federations: "
                          f"{type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
        return []
