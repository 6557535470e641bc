"""Per-step metrics to MLflow, off the training thread: many steps per ``log_batch``, each step exactly once.

The training loop calls ``log(metrics, step)``, which only queues. A writer thread sends whatever has queued
every ``flush_s`` seconds in one ``log_batch`` (at most 1000 values, MLflow's limit), whole steps at a time,
so a kill loses whole steps, never half of one. A resumed run passes ``skip_through``: per key, the last
step the run already holds; the recomputed values for those steps are identical and are not sent again.
A failing store never stops training: the error is kept, counted and shown at the end.
"""

from __future__ import annotations

import threading
import time
from typing import Mapping

_MAX_PER_BATCH = 1000


class StepMetricsLogger:
    """Queue per-step metrics; a daemon thread writes them to run ``run_id`` in batches."""

    def __init__(self, run_id: str, tracking_uri: str, skip_through: Mapping[str, int] | None = None,
                 flush_s: float = 2.0):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)
        self.skip_through = dict(skip_through or {})
        self.flush_s = flush_s
        self.failures = 0
        self.last_error: str | None = None
        self._pending: list[tuple[int, dict, int]] = []
        self._cv = threading.Condition()
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="lowres-step-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` for ``step`` (cheap; never blocks on the store)."""
        keep = {k: float(v) for k, v in metrics.items() if step > self.skip_through.get(k, -1)}
        if keep:
            with self._cv:
                self._pending.append((step, keep, int(time.time() * 1000)))

    def flush(self, timeout: float = 60.0) -> None:
        """Block until everything queued so far is written (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._cv.notify_all()
            while (self._pending or self._busy) and time.monotonic() < deadline:
                self._cv.wait(0.05)
                self._cv.notify_all()

    def close(self) -> None:
        """Write what is left and stop the thread."""
        self.flush()
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from mlflow.entities import Metric

        while True:
            with self._cv:
                if not self._pending and not self._closing:
                    self._cv.wait(self.flush_s)
                if self._closing and not self._pending:
                    return
                items, self._pending = self._pending, []
                self._busy = bool(items)
            try:
                batch: list = []
                for step, metrics, ts in items:
                    points = [Metric(k, v, ts, step) for k, v in metrics.items()]
                    if len(batch) + len(points) > _MAX_PER_BATCH:
                        self.client.log_batch(self.run_id, metrics=batch)
                        batch = []
                    batch.extend(points)
                if batch:
                    self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # the store is down or refuses: training goes on, the error is reported
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
