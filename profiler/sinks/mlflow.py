"""The MLflow sink: sample finely, write coarsely.

Every ``interval_s`` of sample time becomes one window; each window becomes one ``MlflowClient.log_batch``
with, per MLflow key, the window's mean under the key itself and its peak under ``<key>_max`` (counters: the
last, cumulative value only). Keys come from the catalog and reuse MLflow's own system-metric names
(``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``, …) so MLflow's
system-metrics view shows them; step = window index, as MLflow's own monitor does.

MLflow's own monitor spends most of its cost on a run-status read and a write per sample; this sink does
neither. Writes happen on a daemon thread, so a slow or unreachable server never delays a sampling tick.
When a write fails the window is appended to a local spool file (JSONL, one metric point per line) that
``lowres sync`` uploads later; identical points are deduplicated by MLflow's store, so a replay is harmless.
The first failure warns once, naming the spool file. Nothing here raises into the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from profiler import metric_catalog
from profiler.reading import Sample

log = logging.getLogger("profiler.sinks.mlflow")

# After a failed write, windows go straight to the spool for this long before the server is tried again:
# each attempt against a dead server can spend minutes in MLflow's own HTTP retries.
RETRY_AFTER_S = 60.0
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else a SQLite store ``mlflow.db`` in the working dir.

    The embedded default needs no server. The path is made absolute so that a later ``chdir`` (or a
    sampler process started elsewhere) still writes to the same store.
    """
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(Path.cwd() / "mlflow.db")


_SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "secret", "key", "access_token", "api_key")


def redact_uri(uri: str) -> str:
    """``uri`` as it may be shown: a password in ``user:password@`` or a secret query parameter becomes ``***``.

    Credentials belong in the environment (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN); one typed into a URI must
    still never reach a console, a log, a spool file or an MLflow tag.
    """
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable URI>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_QUERY_KEYS for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*/:")
    if netloc == parts.netloc and query == parts.query:
        return uri  # nothing secret; urlunsplit would also turn sqlite:////abs/path into sqlite://abs/path
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub(text: str, uri: str) -> str:
    """``text`` (an error message that may quote ``uri``) with ``uri``'s secrets replaced by ``***``."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return text
    secrets = [v for k, v in parse_qsl(parts.query) if k.lower() in _SECRET_QUERY_KEYS]
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        secrets.append(userinfo.split(":", 1)[1] if ":" in userinfo else userinfo)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***").replace(unquote(secret), "***")
    return text


def strip_credentials(uri: str) -> str:
    """``uri`` as it may be stored (spool files): without ``user:password@`` and secret query parameters, so
    ``lowres sync`` reaches the same server with the environment's credentials."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if k.lower() not in _SECRET_QUERY_KEYS]) if parts.query else ""
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def default_spool_path(run_id: str) -> Path:
    """Where a run's unsent MLflow points go: ``.lowres/spool/<run_id>.mlflow.jsonl`` in the working dir."""
    return Path.cwd() / ".lowres" / "spool" / f"{run_id}.mlflow.jsonl"


def append_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Append records as JSON lines with one ``write``; returns how many (the one writer of every spool).

    If the file ends in a torn line (a process killed mid-write), a newline goes first so the torn line stays
    one unreadable line instead of swallowing the first new record.
    """
    lines = [json.dumps(r, separators=(",", ":")) + "\n" for r in records]
    if not lines:
        return 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                lines.insert(0, "\n")
        f.write("".join(lines).encode())
        f.flush()
    return len(lines)


def read_spool(path: str | Path) -> list[dict]:
    """The points in a spool file: dicts with run_id, key, value, timestamp (ms), step, tracking_uri."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:  # a torn last line from a killed process
                continue
    return out


class _Window:
    """Running mean/max/last per MLflow key for one window of sample time."""

    __slots__ = ("index", "stats", "last_ts")

    def __init__(self, index: int):
        self.index = index
        self.stats: dict[str, list] = {}  # key -> [sum, count, max, last, is_counter]
        self.last_ts = 0.0

    def add(self, key: str, value: float, is_counter: bool, ts: float) -> None:
        st = self.stats.get(key)
        if st is None:
            self.stats[key] = [value, 1, value, value, is_counter]
        else:
            st[0] += value
            st[1] += 1
            st[2] = max(st[2], value)
            st[3] = value
        self.last_ts = max(self.last_ts, ts)

    def points(self, step: int) -> list[tuple[str, float, int, int]]:
        """(key, value, timestamp ms, step) for every key: mean and ``_max`` for gauges, last for counters."""
        ts_ms = int(self.last_ts * 1000)
        out = []
        for key, (total, count, peak, last, is_counter) in self.stats.items():
            if is_counter:
                out.append((key, last, ts_ms, step))
            else:
                out.append((key, total / count, ts_ms, step))
                out.append((key + "_max", peak, ts_ms, step))
        return out


class MlflowSink:
    """Aggregates samples into windows of ``interval_s`` and logs each window with one ``log_batch``.

    ``first_step`` lets a resumed run continue after the steps it already has (see
    ``lowres.tracking.runs.max_logged_step``). With ``origin_ts`` (the run's start, epoch seconds) a window's
    step is its index counted from the run's start, not from this process's first sample, and at least
    ``first_step``: a resumed run's steps then continue after every earlier process's, whether or not the
    server could be asked which it holds (a resume while the server is away must not restart at 0, or sync
    would take its points for duplicates). ``close_timeout_s`` bounds how long ``close`` waits for the
    server before spooling what is left.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None, interval_s: float = 10.0,
                 spool_path: str | None = None, close_timeout_s: float = 10.0, first_step: int = 0,
                 origin_ts: float | None = None):
        self.run_id = run_id
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.interval_s = float(interval_s)
        self.spool_path = Path(spool_path) if spool_path else default_spool_path(run_id)
        self.close_timeout_s = close_timeout_s
        self.first_step = first_step
        self.origin_ts = origin_ts
        self.windows = 0
        self.sent_points = 0
        self.spooled_points = 0
        self.failures = 0
        self.last_error: str | None = None
        self.warning: str | None = None
        self._t0: float | None = None
        self._window: _Window | None = None
        self._client = None
        self._retry_at = 0.0
        self._cv = threading.Condition()
        self._queue: deque[list] = deque()
        self._inflight: list | None = None
        self._closing = False
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="lowres-mlflow-sink", daemon=True)
        self._thread.start()

    # -- the sampler's side: cheap, no I/O ---------------------------------------------------------------
    def write(self, batch: Sequence[Sample]) -> None:
        """Fold samples into the current window; a sample past its end closes it and queues the write."""
        unknown = set()
        for s in batch:
            metric = metric_catalog.CATALOG.get(s.name)
            if metric is None:
                unknown.add(s.name)
                continue
            key = metric_catalog.mlflow_key(metric, dict(s.labels))
            if key is None or not math.isfinite(s.value):
                continue
            if self._t0 is None:
                self._t0 = s.ts if self.origin_ts is None else self.origin_ts
            index = max(self._min_index, math.floor((s.ts - self._t0) / self.interval_s))
            if self._window is None:
                self._window = _Window(index)
            elif index > self._window.index:
                self._close_window()
                self._window = _Window(index)
            # A late sample (earlier than the open window) is folded into the open one, never reopened.
            self._window.add(key, s.value * metric.mlflow_scale, metric.kind == "counter", s.ts)
        if unknown:
            metric_catalog.get(sorted(unknown)[0])  # our own bug: raise, naming the metric

    @property
    def _min_index(self) -> int:
        return 0 if self.origin_ts is None else self.first_step

    def _close_window(self) -> None:
        w, self._window = self._window, None
        if w is None or not w.stats:
            return
        self.windows += 1
        step = w.index if self.origin_ts is not None else self.first_step + w.index
        with self._cv:
            self._queue.append(w.points(step))
            self._cv.notify_all()

    # -- the writer thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                points = self._inflight = self._queue.popleft()
            ok = time.monotonic() >= self._retry_at and self._send(points)
            with self._cv:
                if not ok and not self._abandoned:
                    self._spool(points, self.last_error or "server unreachable")
                self._inflight = None
                self._cv.notify_all()

    def _send(self, points: list) -> bool:
        try:
            if self._client is None:
                from mlflow.tracking import MlflowClient  # imported here: profiler never needs mlflow to load

                self._client = MlflowClient(self.tracking_uri)
            from mlflow.entities import Metric

            metrics = [Metric(k, v, ts, step) for k, v, ts, step in points]
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
        except Exception as exc:  # unreachable, locked, refused: spool and carry on
            if not self._abandoned:  # close() already counted a request it gave up on
                self.failures += 1
            self.last_error = f"{type(exc).__name__}: {scrub(str(exc), self.tracking_uri)[:300]}"
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            return False
        self.sent_points += len(points)
        return True

    def _spool(self, points: list, why: str) -> None:
        """Append points to the spool file (caller holds the lock); warn once, naming the file."""
        try:
            append_jsonl(self.spool_path, ({"run_id": self.run_id, "key": key, "value": value, "timestamp": ts,
                                            "step": step, "tracking_uri": strip_credentials(self.tracking_uri)}
                                           for key, value, ts, step in points))
        except OSError as exc:
            log.error("lowres: could not spool %d MLflow points to %s: %s", len(points), self.spool_path, exc)
            return
        self.spooled_points += len(points)
        if self.warning is None:
            self.warning = (f"lowres: MLflow at {redact_uri(self.tracking_uri)} is unreachable "
                            f"({scrub(why, self.tracking_uri)}); the run goes on and metrics of run {self.run_id} "
                            f"are spooled to {self.spool_path} — `lowres sync` uploads them later")
            log.warning(self.warning)
            warnings.warn(self.warning, RuntimeWarning, stacklevel=2)

    # -- ending ------------------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Close the open window and wait up to ``timeout`` s until every window is sent or spooled."""
        self._close_window()
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and self._inflight is None,
                                     self.close_timeout_s if timeout is None else timeout)

    def close(self) -> None:
        """Flush; whatever the server has not taken within ``close_timeout_s`` goes to the spool."""
        if self._closing:
            return
        done = self.flush()
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            if not done:
                # The writer is stuck in a request; take over its work so nothing is lost at exit.
                self._abandoned = True
                self.failures += 1 if self._inflight else 0
                pending = ([self._inflight] if self._inflight else []) + list(self._queue)
                self._queue.clear()
                for points in pending:
                    self._spool(points, self.last_error or f"no answer within {self.close_timeout_s} s")
        if done:
            self._thread.join(timeout=1.0)

    def describe(self) -> dict:
        """Which run, which store, and what was sent or spooled."""
        return {"kind": "mlflow", "run_id": self.run_id, "tracking_uri": redact_uri(self.tracking_uri),
                "interval_s": self.interval_s, "windows": self.windows, "sent_points": self.sent_points,
                "spooled_points": self.spooled_points, "failures": self.failures,
                "spool_path": str(self.spool_path)}
