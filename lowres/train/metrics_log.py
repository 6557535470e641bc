"""Per-step metrics to MLflow, off the training thread: many steps per request, each step exactly once.

The training loop calls ``log(metrics, step)``, which only queues. A writer thread hands whatever has queued
every ``flush_s`` seconds to a :class:`~lowres.tracking.logger.SpoolingLogger` in requests of at most 1000
points (MLflow's limit), whole steps at a time, so a kill loses whole steps, never half of one. A resumed run
passes ``skip_through``: per key, the last step the run already holds; the recomputed values for those steps
are identical and are not sent again.

A failing or unreachable store never stops training and never loses a figure: the SpoolingLogger appends
what the server did not take to the local spool (``lowres sync`` uploads it later), and after a failure it
spools straight away for a while instead of waiting on a dead server once per batch.
"""

from __future__ import annotations

import threading
import time
from typing import Mapping

from lowres.tracking import spool

_MAX_PER_BATCH = 1000


class StepMetricsLogger:
    """Queue per-step metrics; a daemon thread delivers them through ``sender`` (a SpoolingLogger)."""

    def __init__(self, sender, skip_through: Mapping[str, int] | None = None, flush_s: float = 2.0):
        self.sender = sender
        self.skip_through = dict(skip_through or {})
        self.flush_s = flush_s
        self.sent_points = 0
        self.spooled_points = 0
        self._pending: list[tuple[int, dict, int]] = []
        self._cv = threading.Condition()
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="lowres-step-metrics", daemon=True)
        self._thread.start()

    @property
    def failures(self) -> int:
        """Requests the server did not take (their points were spooled)."""
        return self.sender.failures

    @property
    def last_error(self) -> str | None:
        return self.sender.last_error

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` for ``step`` (cheap; never blocks on the store)."""
        keep = {k: float(v) for k, v in metrics.items() if step > self.skip_through.get(k, -1)}
        if keep:
            with self._cv:
                self._pending.append((step, keep, int(time.time() * 1000)))

    def flush(self, timeout: float = 60.0) -> None:
        """Block until everything queued so far is on the server or in the spool (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._cv.notify_all()
            while (self._pending or self._busy) and time.monotonic() < deadline:
                self._cv.wait(0.05)
                self._cv.notify_all()

    def close(self) -> None:
        """Deliver what is left and stop the thread; anything the thread could not reach goes to the spool."""
        self.flush()
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout=10)
        with self._cv:
            left, self._pending = self._pending, []
        if left:  # the writer is stuck on a hung request: write the rest to the spool directly, never drop it
            s = self.sender
            n = spool.append_records(s.spool_path, [
                spool.metric_record(s.run_id, k, v, ts, step, s.tracking_uri) for k, v, ts, step in _points(left)])
            self.spooled_points += n
            s.spooled += n  # the sender's count is what the end-of-run message reports

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._pending and not self._closing:
                    self._cv.wait(self.flush_s)
                if self._closing and not self._pending:
                    return
                items, self._pending = self._pending, []
                self._busy = bool(items)
            try:
                for chunk in _chunks(items):
                    # The sender never raises for a server problem: it spools instead and says so.
                    if self.sender.log_points(chunk):
                        self.sent_points += len(chunk)
                    else:
                        self.spooled_points += len(chunk)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()


def _points(items: list[tuple[int, dict, int]]) -> list[tuple[str, float, int, int]]:
    return [(k, v, ts, step) for step, metrics, ts in items for k, v in metrics.items()]


def _chunks(items: list[tuple[int, dict, int]]) -> list[list[tuple[str, float, int, int]]]:
    """Points of whole steps, at most ``_MAX_PER_BATCH`` per chunk (a step larger than that gets its own)."""
    out: list[list] = []
    batch: list = []
    for item in items:
        points = _points([item])
        if batch and len(batch) + len(points) > _MAX_PER_BATCH:
            out.append(batch)
            batch = []
        batch.extend(points)
    if batch:
        out.append(batch)
    return out
