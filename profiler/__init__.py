"""lowres' profiler: samples a process tree's CPU, memory, GPU and I/O cheaply enough to leave on.

    from profiler import Profiler
    with Profiler(interval=0.1, sinks=[{"kind": "jsonl", "path": "run.jsonl"}]) as prof:
        with prof.phase("forward"):
            ...
        prof.record("lowres_train_loss", 2.31)
    print(prof.summary.to_dict())

By default the sampling happens in a separate small process (``python -m profiler``), because a sampler
thread inside a Python-heavy program waits for the GIL (measured: a 2.3 ms tree sample took 1.1 s, and 8 of
80 samples were taken; out of process, 78 of 80). ``mode="thread"`` samples from a background thread instead
and also accepts ready-made Sink objects. Imports nothing heavy: torch and mlflow only where the program or a
sink has them.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import select
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from profiler import metric_catalog
from profiler.phases import PhaseTracker
from profiler.reading import Sample
from profiler.summary import Summary

__all__ = ["Profiler", "Sample", "Summary", "ProfilerStartError"]

log = logging.getLogger("profiler")

START_TIMEOUT_S = 60.0  # building an MLflow sink imports mlflow: seconds on a slow laptop
STOP_TIMEOUT_S = 60.0  # closing sinks flushes the last MLflow batch


class ProfilerStartError(RuntimeError):
    """A sink could not be built (e.g. a port that is taken); the message is the sink's own."""


class Profiler:
    """Samples ``pid``'s process tree every ``interval`` seconds into ``sinks``; see the module docstring."""

    def __init__(self, interval: float = 1.0, sinks: Sequence[Any] = (), mode: str = "process",
                 pid: int | None = None, labels: dict[str, str] | None = None):
        if not isinstance(interval, (int, float)) or not math.isfinite(interval) or interval <= 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        if mode not in ("process", "thread"):
            raise ValueError(f"mode must be 'process' or 'thread', got {mode!r}")
        if mode == "process" and not all(isinstance(s, dict) for s in sinks):
            raise TypeError("in process mode every sink must be a spec dict (built in the sampler process); "
                            "pass Sink objects with mode='thread'")
        self.interval = float(interval)
        self.sink_specs = list(sinks)
        self.mode = mode
        self.pid = os.getpid() if pid is None else int(pid)
        self.labels = dict(labels or {})
        self.sinks_info: list[dict] = []
        self.unavailable: dict[str, str] = {}
        self.summary: Summary | None = None
        self._tracker: PhaseTracker | None = None
        self._running = False
        self._lost = 0

    # -- life cycle --------------------------------------------------------------------------------------
    def start(self) -> "Profiler":
        """Begin sampling; returns once the sinks are built and ``sinks_info`` is known."""
        if self._running:
            raise RuntimeError("this Profiler is already running")
        self._lost = 0
        self.summary = None
        self._tracker = PhaseTracker(self._send)
        (self._start_thread if self.mode == "thread" else self._start_process)()
        self._running = True
        return self

    def stop(self) -> Summary:
        """Stop sampling (one last reading at the window's edge) and return the :class:`Summary`."""
        if not self._running:
            raise RuntimeError("this Profiler is not running")
        self._running = False
        summary = self._stop_thread() if self.mode == "thread" else self._stop_process()
        self._tracker.close()
        for name, figures in self._tracker.phases.items():
            summary.phases.setdefault(name, {"metrics": {}}).update(figures)
        if self._lost:
            summary.errors["messages_lost"] = self._lost
        self.summary = summary
        return summary

    def __enter__(self) -> "Profiler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __call__(self, fn):
        """Use as a decorator: each call of ``fn`` is one profiling window."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        return wrapper

    # -- marking and recording (called from the training thread: cheap) ---------------------------------
    def phase(self, name: str):
        """``with prof.phase("forward"):`` attributes wall time, CPU time and peak memory to ``name``."""
        if not self._running:
            raise RuntimeError("prof.phase() needs a running Profiler (inside `with prof:`)")
        return self._tracker.phase(name)

    def record(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        """Hand one value (a catalog metric, e.g. ``lowres_train_loss``) to the sinks with the next tick."""
        metric_catalog.get(name)  # an unknown name is our caller's bug: it raises
        if self._running:
            self._send({"op": "record", "name": name, "value": float(value), "labels": labels or {},
                        "ts": time.time()})

    def account_exit(self, pid: int, cpu_s: float, maxrss_bytes: int = 0) -> None:
        """Hand over a reaped tree member's exact totals (from ``os.wait4``'s rusage) so the last interval
        of a process that exits between ticks is not lost."""
        if self._running:
            self._send({"op": "exit", "pid": pid, "cpu_s": cpu_s, "maxrss_bytes": maxrss_bytes})

    # -- thread mode -------------------------------------------------------------------------------------
    def _start_thread(self) -> None:
        from profiler.sampler import SamplerLoop, build_samplers, build_sinks, describe

        samplers, self.unavailable = build_samplers(self.pid, torch_in_process="torch" in sys.modules)
        sinks = build_sinks(self.sink_specs)
        self.sinks_info = [describe(s) for s in sinks]
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        loop = SamplerLoop(samplers, sinks, self.interval, self.labels, self.unavailable,
                           cpu_clock=time.thread_time)
        self._result: list = []

        def wait(timeout: float) -> list[dict]:
            out = []
            try:
                out.append(self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait())
                while True:
                    out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

        def run() -> None:
            try:
                self._result.append(loop.run(wait))
            except Exception as exc:  # a bug in the loop must not take the program down with it
                log.warning("profiler loop failed: %r", exc)
                self._result.append(Summary(errors={f"loop:{type(exc).__name__}": 1}))

        self._thread = threading.Thread(target=run, name="lowres-profiler", daemon=True)
        self._thread.start()

    def _stop_thread(self) -> Summary:
        self._queue.put({"op": "stop"})
        self._thread.join()
        return self._result[0]

    # -- process mode ------------------------------------------------------------------------------------
    def _start_process(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["LOWRES_PROFILER_CONFIG"] = json.dumps({"pid": self.pid, "interval": self.interval,
                                                    "sinks": self.sink_specs, "labels": self.labels,
                                                    "ppid": os.getpid()})
        self._child = subprocess.Popen([sys.executable, "-m", "profiler"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=env, close_fds=True)
        self._out = b""
        msg = self._read_reply(START_TIMEOUT_S)
        if msg is None or msg.get("op") != "ready":
            self._child.kill()
            self._child.wait()
            if msg is not None and msg.get("op") == "error":
                raise ProfilerStartError(f"{msg['type']}: {msg['message']}")
            if self._child.returncode not in (None, -9):
                raise ProfilerStartError(f"the sampler process (python -m profiler) exited with status "
                                         f"{self._child.returncode} before it was ready; its error is above")
            raise ProfilerStartError(f"the sampler process did not start within {START_TIMEOUT_S:.0f} s")
        self.sinks_info, self.unavailable = msg["sinks"], msg["unavailable"]
        # Never block the training thread on a stalled sampler: a full pipe drops the message (counted).
        os.set_blocking(self._child.stdin.fileno(), False)

    def _read_reply(self, timeout: float) -> dict | None:
        """The next JSON line from the sampler process, or None on timeout or end of file."""
        fd, deadline = self._child.stdout.fileno(), time.monotonic() + timeout
        while b"\n" not in self._out:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._out += chunk
        line, _, self._out = self._out.partition(b"\n")
        return json.loads(line)

    def _send(self, msg: dict) -> None:
        if self.mode == "thread":
            self._queue.put(msg)
            return
        try:
            os.write(self._child.stdin.fileno(), (json.dumps(msg) + "\n").encode())
        except (BlockingIOError, BrokenPipeError, OSError):
            self._lost += 1

    def _stop_process(self) -> Summary:
        try:
            os.set_blocking(self._child.stdin.fileno(), True)  # the stop message must not be dropped
        except OSError:
            pass
        self._send({"op": "stop"})
        msg = self._read_reply(STOP_TIMEOUT_S)
        try:
            self._child.stdin.close()
        except OSError:
            pass
        try:
            self._child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
        self._child.stdout.close()
        if msg is None or msg.get("op") != "summary":
            log.warning("the sampler process ended without a summary (exit status %s)", self._child.returncode)
            return Summary(errors={"sampler_process": 1}, unavailable=self.unavailable, sinks=self.sinks_info)
        return Summary.from_dict(msg["summary"])
