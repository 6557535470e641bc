"""``SpoolingLogger``: run-level logging that never loses a figure and never stops training.

Each call tries the tracking server once, with a short timeout and no retries, and on any failure appends
the same data to the spool (``lowres.tracking.spool``) for ``lowres sync``. After a failure it spools straight
away for ``retry_after_s`` before trying the server again, so a dead server costs the training loop one
timeout per window, not one per step.

Why not ``MlflowClient`` for HTTP servers: its requests retry with exponential back-off (minutes against a
dead server), configured only through process-wide environment variables that the profiler sink and everything
else share. Here each request goes through MLflow's own ``http_request`` with ``max_retries=0`` and
``timeout=timeout_s`` and MLflow's own credentials (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` / ``_TOKEN``),
and bodies are built from MLflow's protos exactly as its REST store builds them. Local stores (``sqlite:``,
files) have no network to wait for and use ``MlflowClient``.

Artifacts over HTTP check ``/health`` first (short timeout), then upload with ``MlflowClient``: its retries
apply only if the server dies during that upload, and artifacts are logged rarely (config, adapter).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from lowres.tracking import runs, spool
from profiler.sinks.mlflow import redact_uri, resolve_tracking_uri, scrub, strip_credentials

log = logging.getLogger("lowres.tracking")


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_alive(tracking_uri: str, timeout_s: float = 2.0) -> bool:
    """True when an HTTP tracking server answers ``/health`` (unauthenticated) within ``timeout_s``."""
    import urllib.request

    try:
        url = strip_credentials(tracking_uri).split("?", 1)[0].rstrip("/") + "/health"  # /health needs no login
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except Exception:  # refused, timed out, DNS, TLS: all mean "not now"
        return False


class SpoolingLogger:
    """Logs metrics, params, tags and artifacts of one run; what the server cannot take goes to the spool.

    Methods return True when the server took the data and False when it was spooled; none raises for an
    unreachable, slow or refusing server (a bug in the caller — a non-numeric metric — still raises).
    A run with a local id (see :meth:`start`) is spooled only: the server has no such run until sync.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None, *, spool_dir: str | Path | None = None,
                 timeout_s: float = 5.0, retry_after_s: float = 30.0):
        self.run_id = run_id
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.stored_uri = strip_credentials(self.tracking_uri)  # what spool records carry: no secrets
        self.shown_uri = redact_uri(self.tracking_uri)  # what messages show
        self.spool_dir = Path(spool_dir) if spool_dir else spool.default_spool_dir()
        self.spool_path = self.spool_dir / f"{run_id}{spool.LOWRES_SUFFIX}"
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.sent = 0
        self.spooled = 0
        self.failures = 0
        self.last_error: str | None = None
        self.warning: str | None = None
        self._retry_at = 0.0
        self._lock = threading.Lock()

    @property
    def pending(self) -> bool:
        """True when the run exists only in the spool (created while the server was down)."""
        return spool.is_local_run_id(self.run_id)

    @classmethod
    def start(cls, experiment: str = "lowres", *, run_name: str | None = None, tracking_uri: str | None = None,
              spool_dir: str | Path | None = None, timeout_s: float = 5.0, retry_after_s: float = 30.0,
              fingerprint: str | None = None,
              tier: str | None = None, config: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None) -> "SpoolingLogger":
        """Start a run on the server (``runs.start_run``, standard tags) or, if it cannot be reached, a pending
        run with a local id whose tags and start time wait in the spool for ``lowres sync``."""
        uri = resolve_tracking_uri(tracking_uri)
        sdir = Path(spool_dir) if spool_dir else spool.default_spool_dir()
        error = None
        if not _is_http(uri) or server_alive(uri, timeout_s):
            try:
                handle = runs.start_run(experiment, run_name=run_name, tracking_uri=uri, fingerprint=fingerprint,
                                        tier=tier, config=config, tags=tags)
                return cls(handle.run_id, uri, spool_dir=sdir, timeout_s=timeout_s, retry_after_s=retry_after_s)
            except Exception as exc:  # refused (auth), server error: the run goes on locally
                error = f"{type(exc).__name__}: {scrub(str(exc), uri)[:300]}"
        all_tags = {**runs.standard_tags(fingerprint=fingerprint, tier=tier, config=config), **(tags or {})}
        run_id = spool.new_local_run_id()
        spool.write_pending_run(sdir, run_id, experiment=experiment, run_name=run_name, tags=all_tags,
                                tracking_uri=strip_credentials(uri))
        logger = cls(run_id, uri, spool_dir=sdir, timeout_s=timeout_s, retry_after_s=retry_after_s)
        logger._warn(error or "no answer from /health")
        return logger

    # -- logging ---------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> bool:
        """Log ``{key: value}`` at ``step`` in one request (MLflow takes up to 1000 per batch)."""
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        return self.log_points([(k, v, ts, step) for k, v in metrics.items()])

    def log_points(self, points: Sequence[tuple[str, float, int, int]]) -> bool:
        """Log ``(key, value, timestamp ms, step)`` points of any number of steps in one request (at most 1000,
        MLflow's limit): the recipe's metrics thread sends many steps at once this way."""
        points = [(k, float(v), int(t), int(s)) for k, v, t, s in points]
        records = [spool.metric_record(self.run_id, k, v, t, s, self.stored_uri) for k, v, t, s in points]
        return self._deliver(records, lambda: self._log_batch(metrics=points))

    def log_params(self, params: Mapping[str, Any]) -> bool:
        """Log a (nested) dict of params, flattened to dotted keys as ``runs.log_params`` does."""
        flat = runs.flatten(params)
        records = [{"kind": spool.PARAM, "run_id": self.run_id, "key": k, "value": v,
                    "tracking_uri": self.stored_uri} for k, v in flat.items()]
        return self._deliver(records, lambda: self._log_batch(params=list(flat.items())))

    def set_tags(self, tags: Mapping[str, Any]) -> bool:
        """Set tags (overwriting equal keys, so a replay is harmless)."""
        items = [(k, str(v)) for k, v in tags.items()]
        records = [{"kind": spool.TAG, "run_id": self.run_id, "key": k, "value": v,
                    "tracking_uri": self.stored_uri} for k, v in items]
        return self._deliver(records, lambda: self._log_batch(tags=items))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> bool:
        """Upload a file; if the server cannot take it, a copy waits in the spool."""
        def send():
            if _is_http(self.tracking_uri) and not server_alive(self.tracking_uri, self.timeout_s):
                raise ConnectionError(f"{self.shown_uri}/health did not answer within {self.timeout_s} s")
            runs.client(self.tracking_uri).log_artifact(self.run_id, str(local_path), artifact_path)

        def record():
            rec = spool.spool_artifact(self.spool_dir, self.run_id, local_path, artifact_path)
            return [{**rec, "tracking_uri": self.stored_uri}]
        return self._deliver(record, send)

    def end(self, status: str = "FINISHED") -> bool:
        """Mark the run FINISHED (or FAILED / KILLED); spooled like the rest if the server is away."""
        end_time = int(time.time() * 1000)
        records = [{"kind": spool.END, "run_id": self.run_id, "status": status, "end_time": end_time,
                    "tracking_uri": self.stored_uri}]
        return self._deliver(records, lambda: self._update_run(status, end_time))

    def describe(self) -> dict:
        """What was sent and spooled, and where."""
        return {"run_id": self.run_id, "tracking_uri": self.shown_uri, "pending": self.pending,
                "sent": self.sent, "spooled": self.spooled, "failures": self.failures,
                "spool_path": str(self.spool_path), "last_error": self.last_error}

    # -- the two paths -------------------------------------------------------------------------------------
    def _deliver(self, records, send) -> bool:
        """Try ``send`` unless the run is pending or the server failed recently; spool ``records`` otherwise.

        ``records`` may be a callable, so an artifact is copied into the spool only when it is needed.
        """
        with self._lock:  # one request at a time: keeps the spool's order equal to the call order
            if not self.pending and time.monotonic() >= self._retry_at:
                try:
                    send()
                    self.sent += 1
                    return True
                except Exception as exc:  # unreachable, timed out, refused: spool and carry on
                    self.failures += 1
                    self.last_error = f"{type(exc).__name__}: {scrub(str(exc), self.tracking_uri)[:300]}"
                    self._retry_at = time.monotonic() + self.retry_after_s
                    self._warn(self.last_error)
            try:
                self.spooled += spool.append_records(self.spool_path, records() if callable(records) else records)
            except OSError as exc:  # a full or read-only disk must not kill the run either
                log.error("lowres: could not spool to %s: %s", self.spool_path, exc)
            return False

    def _warn(self, why: str) -> None:
        if self.warning is None:
            self.warning = (f"lowres: MLflow at {self.shown_uri} cannot take run {self.run_id} "
                            f"({scrub(why, self.tracking_uri)}); "
                            f"the run goes on and its figures are spooled to {self.spool_dir} — "
                            "`lowres sync` uploads them later")
            log.warning(self.warning)
            warnings.warn(self.warning, RuntimeWarning, stacklevel=3)

    def _log_batch(self, metrics=(), params=(), tags=()) -> None:
        from mlflow.entities import Metric, Param, RunTag

        ms = [Metric(k, v, ts, step) for k, v, ts, step in metrics]
        ps = [Param(k, v) for k, v in params]
        ts_ = [RunTag(k, v) for k, v in tags]
        if not _is_http(self.tracking_uri):
            runs.client(self.tracking_uri).log_batch(self.run_id, metrics=ms, params=ps, tags=ts_)
            return
        from mlflow.protos.service_pb2 import LogBatch

        body = LogBatch(run_id=self.run_id, metrics=[m.to_proto() for m in ms],
                        params=[p.to_proto() for p in ps], tags=[t.to_proto() for t in ts_])
        self._post("/api/2.0/mlflow/runs/log-batch", body)

    def _update_run(self, status: str, end_time: int) -> None:
        if not _is_http(self.tracking_uri):
            runs.client(self.tracking_uri).set_terminated(self.run_id, status=status, end_time=end_time)
            return
        from mlflow.entities import RunStatus
        from mlflow.protos.service_pb2 import UpdateRun

        self._post("/api/2.0/mlflow/runs/update",
                   UpdateRun(run_id=self.run_id, status=RunStatus.from_string(status), end_time=end_time))

    def _post(self, endpoint: str, message) -> None:
        """One POST, no retries, ``timeout_s``; raises on a connection error or a non-200 answer."""
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.proto_json_utils import message_to_json
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        resp = http_request(get_default_host_creds(self.tracking_uri), endpoint, "POST", max_retries=0,
                            backoff_factor=0, timeout=self.timeout_s, json=json.loads(message_to_json(message)))
        verify_rest_response(resp, endpoint)
