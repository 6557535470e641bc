"""Prometheus sinks: an HTTP ``/metrics`` exporter (pull) and a Pushgateway pusher (short jobs).

Both keep only the latest value of each (metric, labels) series; ``write`` is a dict update and the
exposition is built at scrape (or push) time, as prometheus client_python does for its own collectors.
Counters are exported as counters, never as rates: Prometheus' ``rate()`` does that better, across restarts.
Each sink has its own ``CollectorRegistry`` so that two profilers in one process never collide and the
process's default metrics are not mixed in.
"""

from __future__ import annotations

import errno
import logging
import threading
import warnings
from typing import Iterator, Sequence

from prometheus_client import CollectorRegistry, push_to_gateway, start_http_server
from prometheus_client.metrics_core import Metric

from profiler import metric_catalog
from profiler.reading import Sample
from profiler.sinks import ALLOWED_LABELS, PortInUse

log = logging.getLogger("profiler.sinks.prometheus")


class LatestValues:
    """A custom Collector over the latest value of each (metric, bounded labels) series.

    Labels outside ``ALLOWED_LABELS`` are dropped, so a stray high-cardinality label cannot create a series
    per sample. ``labels`` are constant labels added to every series (a sample's own value wins).
    """

    def __init__(self, labels: dict[str, str] | None = None):
        self._const = dict(labels or {})
        self._lock = threading.Lock()
        self._latest: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}

    def update(self, batch: Sequence[Sample]) -> None:
        """Keep each sample's value as its series' latest. A metric not in the catalog is our bug: KeyError."""
        unknown = set()
        with self._lock:
            for s in batch:
                if s.name not in metric_catalog.CATALOG:
                    unknown.add(s.name)
                    continue
                key = tuple((k, v) for k, v in s.labels if k in ALLOWED_LABELS)
                self._latest.setdefault(s.name, {})[key] = s.value
        if unknown:
            # The known ones are stored above; raising still makes the caller count the bug.
            metric_catalog.get(sorted(unknown)[0])

    def series_count(self) -> int:
        """How many series a scrape would return."""
        with self._lock:
            return sum(len(v) for v in self._latest.values())

    def collect(self) -> Iterator[Metric]:
        """Called by the registry at scrape time: one family per metric, from the catalog's name/help/kind."""
        with self._lock:
            snapshot = {name: dict(series) for name, series in self._latest.items()}
        for name in sorted(snapshot):
            entry = metric_catalog.get(name)
            if entry.kind == "counter":
                # The text format names the family without ``_total`` and the sample with it.
                base = name[: -len("_total")] if name.endswith("_total") else name
                family, sample_name = Metric(base, entry.help, "counter"), base + "_total"
            else:
                family, sample_name = Metric(name, entry.help, "gauge"), name
            for labels, value in snapshot[name].items():
                # Series of one metric may carry different label sets (e.g. with and without ``phase``),
                # which the *MetricFamily helpers cannot express; plain samples can.
                family.add_sample(sample_name, {**self._const, **dict(labels)}, value)
            yield family


class PrometheusExporter:
    """Serves ``/metrics`` on ``addr:port`` (port 0: a free one, see ``describe()``) from a daemon thread."""

    def __init__(self, port: int, addr: str = "127.0.0.1", labels: dict[str, str] | None = None):
        self.collector = LatestValues(labels)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(port, addr) from exc
            raise
        self.addr = addr
        self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def write(self, batch: Sequence[Sample]) -> None:
        """Remember the latest values; nothing is formatted until Prometheus scrapes."""
        self.collector.update(batch)

    def close(self) -> None:
        """Stop serving and free the port; safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def describe(self) -> dict:
        """Where to scrape."""
        return {"kind": "prometheus", "url": self.url, "port": self.port}


class PushgatewaySink:
    """Pushes the latest values to a Pushgateway every ``push_interval_s`` and once more at close.

    Pushing happens on a daemon thread so a slow or absent gateway never delays a sampling tick. Failures
    are counted and warned about once; they never raise into the run.
    """

    def __init__(self, url: str, job: str = "lowres", grouping: dict[str, str] | None = None,
                 push_interval_s: float = 10.0, labels: dict[str, str] | None = None, timeout_s: float = 5.0):
        self.url = url
        self.job = job
        self.grouping = dict(grouping or {})
        self.timeout_s = timeout_s
        self.collector = LatestValues(labels)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.pushes = 0
        self.failures = 0
        self.last_error: str | None = None
        self._warned = False
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._push_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, args=(push_interval_s,),
                                        name="lowres-pushgateway", daemon=True)
        self._thread.start()

    def write(self, batch: Sequence[Sample]) -> None:
        """Remember the latest values; the next push sends them."""
        self.collector.update(batch)
        if batch:
            self._dirty.set()

    def push(self) -> bool:
        """Push now (replacing this job's group on the gateway); True on success."""
        with self._push_lock:
            self._dirty.clear()
            try:
                push_to_gateway(self.url, job=self.job, registry=self.registry, grouping_key=self.grouping,
                                timeout=self.timeout_s)
            except Exception as exc:  # an unreachable gateway must not stop the run
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if not self._warned:
                    self._warned = True
                    msg = (f"lowres: cannot push metrics to the Pushgateway at {self.url} ({self.last_error}); "
                           "the run goes on and later pushes will retry")
                    log.warning(msg)
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                return False
            self.pushes += 1
            return True

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if self._dirty.is_set():
                self.push()

    def close(self) -> None:
        """Stop the pusher and push the final values once."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 1)
        if self.collector.series_count():
            self.push()

    def describe(self) -> dict:
        """Where the values went, and how many pushes failed."""
        return {"kind": "pushgateway", "url": self.url, "job": self.job, "grouping": self.grouping,
                "pushes": self.pushes, "failures": self.failures}
