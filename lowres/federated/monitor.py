"""Live figures of a federation: MLflow (a parent run, a child run per client) and Prometheus (lowres_fed_*).

The server calls it at round edges and per reply; nothing here runs in a client. Counters are cumulative
(``lowres_fed_bytes_*_total``), exported as counters, so ``rate()`` works across scrapes. A background
thread turns a client silent for ``offline_after_s`` into ``lowres_fed_client_up 0``; the alert rules and
dashboards read that and ``lowres_fed_client_last_report_timestamp_seconds``.

Liveness of the server itself (lowres.federated.health): the same thread sets
``lowres_fed_server_heartbeat_timestamp_seconds`` every second, each round event sets
``lowres_fed_server_progress_timestamp_seconds``, and ``lowres_fed_server_status{status=running|finished|
failed}`` says what the server is doing. A second thread writes the MLflow heartbeat (two tags, every
``heartbeat_s``). ``close`` writes the end marker to both; when Prometheus has been scraping the exporter, it
waits (at most 3 scrape intervals, ≤ 30 s) for one more scrape so the marker is seen, not just a silence.

MLflow keys: ``fed/...`` on the parent run (step = round), ``fed/client/...`` on each child run. Tracking
never kills a federation (DESIGN rule 8): a failing MLflow write is counted and reported at the end.

MLflow writes are queued, not made in the caller's thread (``lowres.federated.mlflow_writer``): a writer
thread sends them as one ``log_batch`` per run at each round's end (``round_done``), every
``mlflow_flush_s`` seconds and at ``close()``, which drains the queue first; ``flush()`` waits for what is
queued. Even a client's child run is created by the writer. ``mlflow_flush_s=None`` writes synchronously,
one request per event (how it was before; ``bench/fed_watch.py`` compares the two).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from lowres.federated import health
from profiler.reading import Sample


class FedMonitor:
    """See the module docstring. ``close()`` ends the runs and stops the exporter."""

    def __init__(self, federation: str, *, mlflow: bool = True, tracking_uri: str | None = None,
                 experiment: str = "lowres-fed", prometheus_port: int | None = None, offline_after_s: float = 120.0,
                 params: dict | None = None, console: Any = None, heartbeat_s: float = health.HEARTBEAT_S,
                 crashed_after_s: float = health.CRASHED_AFTER_S, stalled_after_s: float = health.STALLED_AFTER_S,
                 mlflow_flush_s: float | None = 2.0):
        self.federation, self.offline_after_s, self.console = federation, offline_after_s, console
        self.heartbeat_s, self._thresholds = heartbeat_s, (heartbeat_s, crashed_after_s, stalled_after_s)
        self._progress = time.time()
        self._scrapes: list[float] = []
        self.failures = 0  # failed tracking writes
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._last_report: dict[str, float] = {}
        self._counters: dict[tuple[str, str], float] = {}
        self.children: dict[str, str] = {}
        self.run_id = self.tracking_uri = None
        self.exporter = None
        if prometheus_port is not None:
            from profiler.sinks.prometheus import PrometheusExporter

            self.exporter = PrometheusExporter(prometheus_port, labels={"federation": federation})
            self.exporter.registry.register(_ScrapeClock(self._scrapes))
            self._status("running")
            self._write("lowres_fed_server_heartbeat_timestamp_seconds", self._progress)
            self._write("lowres_fed_server_progress_timestamp_seconds", self._progress)
        if mlflow:
            self._safe(self._start_parent, experiment, tracking_uri, params or {})
        self._writer = None
        if self.run_id is not None and mlflow_flush_s is not None:
            from lowres.federated.mlflow_writer import BatchWriter

            self._writer = BatchWriter(self.tracking_uri, self._resolve, self._write_failed, flush_s=mlflow_flush_s)
        self._write("lowres_fed_server_heartbeat_timestamp_seconds", time.time())  # MLflow's start may be slow
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_offline, name="fed-offline", daemon=True)
        self._watch.start()
        self._beat = threading.Thread(target=self._mlflow_heartbeat, name="fed-heartbeat", daemon=True)
        if self.run_id is not None:
            self._beat.start()

    # ------------------------------------------------------------------ MLflow
    def _start_parent(self, experiment: str, tracking_uri: str | None, params: dict) -> None:
        from lowres.tracking import log_params, start_run

        try:  # the server's machine, tagged like training runs so federations of two lab machines compare
            from lowres.hardware import detect

            hw = detect()
            fingerprint, tier = hw.fingerprint, hw.tier
        except Exception:  # a profile that cannot be read never keeps the run from starting
            fingerprint = tier = None
        handle = start_run(experiment, run_name=self.federation, tracking_uri=tracking_uri, config=params,
                           fingerprint=fingerprint, tier=tier,
                           tags={"lowres.command": "fed", "lowres.federation": self.federation,
                                 **health.server_tags(*self._thresholds)})
        self.run_id, self.tracking_uri = handle.run_id, handle.tracking_uri
        self.experiment = experiment
        log_params(self.run_id, params, self.tracking_uri)

    def _child(self, client: str) -> str | None:
        if self.run_id is None:
            return None
        if client not in self.children:
            from lowres.tracking import start_run

            handle = start_run(self.experiment, run_name=f"{self.federation}/{client}", tracking_uri=self.tracking_uri,
                               tags={"mlflow.parentRunId": self.run_id, "lowres.command": "fed-client",
                                     "lowres.federation": self.federation, "lowres.client": client})
            self.children[client] = handle.run_id
        return self.children[client]

    def _log(self, run_id: str | None, metrics: dict[str, float], step: int) -> None:
        if run_id is None or not metrics:
            return
        from lowres.tracking import log_metrics

        log_metrics(run_id, metrics, step, tracking_uri=self.tracking_uri)

    def _record(self, client: str | None, metrics: dict[str, float], step: int) -> None:
        """``metrics`` at ``step`` on the parent run (``client`` None) or the client's child run: queued for
        the writer thread, or written now when there is none (``mlflow_flush_s=None``)."""
        if self.run_id is None or not metrics:
            return
        if self._writer is not None:
            self._safe(self._writer.metrics, client, metrics, step)
            return
        run_id = self.run_id if client is None else self._safe(self._child, client)
        self._safe(self._log, run_id, metrics, step)

    def _resolve(self, client: str | None) -> str | None:
        """The writer's run id for a key: the parent run, or the client's child run (created on first use)."""
        return self.run_id if client is None else self._child(client)

    def _write_failed(self, count: int, exc: Exception) -> None:
        with self._lock:
            self.failures += count
            self.last_error = f"{type(exc).__name__}: {exc}"

    def flush(self) -> None:
        """Wait until every MLflow write queued so far is written (or failed and counted)."""
        if self._writer is not None:
            self._writer.flush()

    def _safe(self, fn, *args) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # instrumentation never kills a run; counted, reported at close
            self._write_failed(1, exc)
            return None

    # ------------------------------------------------------------------ Prometheus
    def _write(self, name: str, value: float, client: str | None = None, labels: tuple = ()) -> None:
        if self.exporter is None:
            return
        labels = (("client", client),) if client else labels
        self._safe(self.exporter.write, [Sample(time.time(), name, float(value), labels)])

    def _add(self, name: str, client: str, amount: float) -> float:
        with self._lock:
            total = self._counters[(name, client)] = self._counters.get((name, client), 0.0) + amount
        self._write(name, total, client)
        return total

    def _status(self, status: str) -> None:
        for s in health.SERVER_STATES:
            self._write("lowres_fed_server_status", 1.0 if s == status else 0.0, labels=(("status", s),))

    def _mark_progress(self) -> None:
        self._progress = time.time()
        self._write("lowres_fed_server_progress_timestamp_seconds", self._progress)

    def _mlflow_heartbeat(self) -> None:
        """Two tags every ``heartbeat_s``; its own thread, since a slow store may hold a write for minutes."""
        from lowres.tracking.runs import set_tags

        while not self._stop.wait(self.heartbeat_s):
            self._safe(set_tags, self.run_id, health.beat_tags(time.time(), self._progress), self.tracking_uri)

    def _watch_offline(self) -> None:
        while not self._stop.wait(1.0):
            now = time.time()
            self._write("lowres_fed_server_heartbeat_timestamp_seconds", now)
            with self._lock:
                seen = dict(self._last_report)
            for client, ts in seen.items():
                self._write("lowres_fed_client_up", 1.0 if now - ts < self.offline_after_s else 0.0, client)

    def is_up(self, client: str) -> bool:
        """Whether ``client`` replied within the offline timeout."""
        with self._lock:
            ts = self._last_report.get(client)
        return ts is not None and time.time() - ts < self.offline_after_s

    # ------------------------------------------------------------------ events
    def round_started(self, rnd: int) -> None:
        self._mark_progress()
        self._write("lowres_fed_round", rnd)

    def sent(self, client: str, nbytes: int) -> None:
        self._add("lowres_fed_bytes_sent_total", client, nbytes)

    def unanswered(self, client: str, nbytes: int) -> None:
        """Bytes sent to a client that never replied: the node may never have pulled them, so a link-level
        counter (Flower's per-run traffic) can be lower by up to this much."""
        with self._lock:
            key = ("unanswered", client)
            self._counters[key] = self._counters.get(key, 0.0) + nbytes

    def received(self, client: str, nbytes: int) -> None:
        """Bytes of a small control reply (the identity query), counted but not a round's report."""
        self._add("lowres_fed_bytes_received_total", client, nbytes)

    def reply(self, rnd: int, client: str, nbytes: int, metrics: dict[str, float], kind: str = "train",
              prefix: str | None = None) -> None:
        """A client's reply arrived: its bytes, its figures, its liveness. ``kind="evaluate"`` (the final
        federated eval) logs under ``fed/client/final_*`` so it does not mix with the round's train figures;
        ``prefix`` names another MLflow prefix (a watched Flower app's per-round evaluation)."""
        now = time.time()
        self._mark_progress()
        with self._lock:
            self._last_report[client] = now
        self._add("lowres_fed_bytes_received_total", client, nbytes)
        self._write("lowres_fed_client_last_report_timestamp_seconds", now, client)
        self._write("lowres_fed_client_up", 1.0, client)
        for key, name in (("train_seconds", "lowres_fed_client_train_seconds"),
                          ("peak_rss_bytes", "lowres_fed_client_peak_memory_bytes"),
                          ("cpu_utilization_ratio", "lowres_fed_client_cpu_utilization_ratio")):
            if key in metrics:
                self._write(name, metrics[key], client)
        prefix = prefix or ("fed/client/" if kind == "train" else "fed/client/final_")
        self._record(client, {f"{prefix}{k}": v for k, v in metrics.items()} | {f"{prefix}bytes_up": nbytes}, rnd)

    def failure(self, rnd: int, client: str, reason: str, rejected: bool = False) -> None:
        """A client failed this round (error, timeout) or its update was rejected."""
        self._mark_progress()
        self._add("lowres_fed_client_failures_total", client, 1)
        if rejected:
            self._add("lowres_fed_updates_rejected_total", client, 1)
        self._record(client, {"fed/client/failed": 1.0, "fed/client/rejected": float(rejected)}, rnd)
        if self.console is not None:
            self.console.print(f"round {rnd}: {client} {'rejected' if rejected else 'failed'}: {reason}",
                               highlight=False)

    def round_done(self, rnd: int, figures: dict[str, float]) -> None:
        """The round's figures (``fed/...`` in MLflow; the gauges in Prometheus)."""
        self._mark_progress()
        for key, name in (("round_seconds", "lowres_fed_round_seconds"), ("clients_accepted", "lowres_fed_clients_accepted"),
                          ("central_eval_loss", "lowres_fed_eval_loss"),
                          ("federated_eval_loss", "lowres_fed_federated_eval_loss"),
                          ("central_eval_accuracy", "lowres_fed_eval_accuracy_ratio"),
                          ("federated_eval_accuracy", "lowres_fed_federated_eval_accuracy_ratio")):
            if key in figures:
                self._write(name, figures[key])
        self._record(None, {f"fed/{k}": v for k, v in figures.items()}, rnd)
        if self._writer is not None:
            self._writer.kick()  # a round's end: its writes go out now, not after flush_s

    def strategy_metrics(self, phase: str, metrics: dict[str, float]) -> None:
        """A watched Flower strategy's aggregated metrics of the last round (``lowres.federated.watch``) as
        ``lowres_fed_strategy_metric{phase, metric}``; MLflow gets them through ``round_done``."""
        if self.exporter is None:
            return
        now = time.time()
        self._safe(self.exporter.write, [Sample(now, "lowres_fed_strategy_metric", float(v),
                                                (("phase", phase), ("metric", str(k))))
                                         for k, v in metrics.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)])

    def _await_scrape(self) -> None:
        """When Prometheus has scraped us at least twice, wait for one scrape after the end marker (at most
        three of its intervals, ≤ 30 s), so the alert rules see "finished" rather than a silent server."""
        seen = list(self._scrapes)
        if len(seen) < 2:
            return
        interval = min(10.0, max(0.1, (seen[-1] - seen[0]) / (len(seen) - 1)))
        deadline, since = time.time() + 3 * interval, time.time()
        while time.time() < deadline and not (self._scrapes and self._scrapes[-1] > since):
            time.sleep(0.05)

    def totals(self) -> dict[str, float]:
        """Bytes sent and received over the whole federation, all clients and message kinds, and the part of
        the sent bytes that went to clients which never answered."""
        with self._lock:
            items = list(self._counters.items())
        return {"bytes_sent_total": sum(v for (n, _), v in items if n == "lowres_fed_bytes_sent_total"),
                "bytes_received_total": sum(v for (n, _), v in items if n == "lowres_fed_bytes_received_total"),
                "bytes_sent_unanswered_total": sum(v for (n, _), v in items if n == "unanswered")}

    def close(self, status: str = "FINISHED", step: int = 0) -> None:
        """Log the byte totals (``fed/bytes_*_total`` at ``step``), write the end marker (finished when
        ``status`` is FINISHED, else failed), end the runs, stop the exporter."""
        self._stop.set()
        self._watch.join(timeout=2)
        if self._beat.is_alive():
            self._beat.join(timeout=2)
        self._record(None, {f"fed/{k}": v for k, v in self.totals().items()}, step)
        marker = health.end_tags(status)
        if self.exporter is not None:
            self._write("lowres_fed_server_heartbeat_timestamp_seconds", time.time())
            self._status(marker[health.TAG_STATUS])
            self._await_scrape()
        if self.run_id is not None:
            from lowres.tracking import end_run
            from lowres.tracking.runs import set_tags

            if self._writer is not None:  # the end marker rides with the last batch; drained before the runs end
                self._safe(self._writer.tags, None, marker)
                self._writer.close()
            else:
                self._safe(set_tags, self.run_id, marker, self.tracking_uri)
            for child in self.children.values():
                self._safe(end_run, child, status, self.tracking_uri)
            self._safe(end_run, self.run_id, status, self.tracking_uri)
        if self.exporter is not None:
            self.exporter.close()
        if self.failures and self.console is not None:
            self.console.print(f"warning: {self.failures} tracking writes failed (last: {self.last_error})",
                               highlight=False)


class _ScrapeClock:
    """A collector that yields nothing and remembers when the exporter was scraped (the last 20 times)."""

    def __init__(self, times: list[float]):
        self.times = times

    def collect(self):
        self.times.append(time.time())
        del self.times[:-20]
        return iter(())
