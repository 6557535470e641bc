"""MLflow writes off the federation's critical path: a queue, one writer thread, ``log_batch`` per run.

``FedMonitor`` hands every metric and tag write to a ``BatchWriter`` instead of calling MLflow: the call
returns at once (the value, its step and its timestamp fixed when it was queued), and the writer thread sends
whatever is pending as one ``MlflowClient.log_batch`` per run — when ``flush()`` asks (the monitor does at
every round's end), every ``flush_s`` seconds, and at ``close()``, which drains the queue before it returns,
so a reader after ``close()`` sees everything. Queued order is kept: a run's points go out in the order they
were queued, and later tags overwrite earlier ones. A run is named by a key (``None``: the federation's
parent run; a client's name: its child run), resolved to a run id by the writer thread itself, so even
creating a client's run is not on the critical path.

Tracking never kills a federation (DESIGN rule 8): a batch that fails is dropped and each write it held is
counted through ``on_error``; nothing is retried (MLflow's client already retries a server), and a queue
grown past ``max_pending`` writes (a store that stopped answering) drops new writes, counted the same way.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Hashable, Mapping

# MLflow's limits per log_batch call (mlflow/utils/validation.py): 1000 metrics, 100 tags, 1000 entities
_MAX_METRICS = 900
_MAX_TAGS = 100


class BatchWriter:
    """See the module docstring. ``resolve(key)`` gives the run id for a key (or None: the writes are skipped)."""

    def __init__(self, tracking_uri: str | None, resolve: Callable[[Hashable], str | None],
                 on_error: Callable[[int, Exception], None], *, flush_s: float = 2.0, max_pending: int = 100_000):
        self.tracking_uri, self.resolve, self.on_error = tracking_uri, resolve, on_error
        self.flush_s, self.max_pending = flush_s, max_pending
        self.batches = 0  # log_batch calls made (for the record: one per run per flush)
        self._pending: list[tuple[Hashable, str, Any]] = []
        self._cond = threading.Condition()
        self._wanted = 0  # flush requests made
        self._done = 0  # flush requests served
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="fed-mlflow-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the caller's side
    def metrics(self, key: Hashable, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step`` for the run ``key`` names, timestamped now."""
        if metrics:
            ts = int(time.time() * 1000)
            self._put((key, "metrics", [(str(k), float(v), ts, int(step)) for k, v in metrics.items()]))

    def tags(self, key: Hashable, tags: Mapping[str, Any]) -> None:
        """Queue ``tags`` (set or overwrite) for the run ``key`` names."""
        if tags:
            self._put((key, "tags", {str(k): str(v) for k, v in tags.items()}))

    def _put(self, item: tuple) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("the MLflow writer is closed")
            if len(self._pending) >= self.max_pending:
                dropped = True
            else:
                dropped = False
                self._pending.append(item)
        if dropped:
            self.on_error(1, RuntimeError(f"{self.max_pending} MLflow writes queued and the store not taking "
                                          "them; this one was dropped"))

    def kick(self) -> None:
        """Ask for a flush now without waiting for it (a round's end)."""
        with self._cond:
            self._wanted += 1
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued so far and wait until it is written (or failed and counted)."""
        with self._cond:
            self._wanted += 1
            ticket = self._wanted
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done >= ticket or not self._thread.is_alive(), timeout)

    def close(self) -> None:
        """Drain the queue and stop the thread; later writes are refused."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        last = time.monotonic()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or self._wanted > self._done
                                    or (self._pending and time.monotonic() - last >= self.flush_s),
                                    timeout=self.flush_s)
                items, self._pending = self._pending, []
                ticket, closing = self._wanted, self._closing
            try:
                self._send(items)
            except Exception:  # _send counts its own failures; nothing may stop the writer (flush/close wait on it)
                pass
            last = time.monotonic()
            with self._cond:
                self._done = max(self._done, ticket)
                self._cond.notify_all()
                if closing and not self._pending:
                    return

    def _send(self, items: list[tuple[Hashable, str, Any]]) -> None:
        """One ``log_batch`` per run (more only past MLflow's per-call limits), runs in order of first write."""
        if not items:
            return
        from mlflow.entities import Metric, RunTag

        from lowres.tracking.runs import client

        per_run: dict[Hashable, tuple[list, dict, list]] = {}
        for key, kind, payload in items:
            points, tags, count = per_run.setdefault(key, ([], {}, [0]))
            count[0] += 1
            if kind == "metrics":
                points.extend(payload)
            else:
                tags.update(payload)
        for key, (points, tags, count) in per_run.items():
            try:
                run_id = self.resolve(key)
                if run_id is None:
                    continue
                c = client(self.tracking_uri)
                metrics = [Metric(*p) for p in points]
                tag_list = [RunTag(k, v) for k, v in tags.items()]
                while metrics or tag_list:
                    c.log_batch(run_id, metrics=metrics[:_MAX_METRICS], tags=tag_list[:_MAX_TAGS])
                    self.batches += 1
                    metrics, tag_list = metrics[_MAX_METRICS:], tag_list[_MAX_TAGS:]
            except Exception as exc:  # counted per write it held; the federation goes on
                self.on_error(count[0], exc)
