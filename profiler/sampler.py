"""The sampling loop: every ``interval`` seconds it reads each sampler, folds the samples into the summary and
hands them to every sink; between ticks it takes control messages (phase edges, recorded values, stop).

The same loop runs in the sampler process (``python -m profiler``) and in thread mode. It keeps an absolute
schedule, so a late tick is counted as missed rather than pushing every later one back.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Callable, Sequence

from profiler.reading import Sample
from profiler.summary import Aggregator, Summary

log = logging.getLogger("profiler")

# A sampler that fails this many ticks in a row is dropped (and reported), so a broken device cannot cost
# a traceback per tick for hours.
MAX_CONSECUTIVE_FAILURES = 5


def build_samplers(pid: int, torch_in_process: bool = False,
                   exclude: frozenset[int] = frozenset()) -> tuple[list, dict[str, str]]:
    """Every sampler this machine supports for watching ``pid``'s tree (less the ``exclude`` pids: the
    sampler process itself), and why the others are missing."""
    from profiler.cpu import CpuSampler
    from profiler.io import IoSampler
    from profiler.memory import MemorySampler
    from profiler.nvml import NvmlSampler
    from profiler.process_tree import ProcessTreeSampler, SamplerUnavailable
    from profiler.torch_allocator import TorchCudaSampler

    samplers, unavailable = [], {}
    tree = None
    factories: list[tuple[str, Callable]] = [
        ("process_tree", lambda: ProcessTreeSampler(pid, exclude=exclude)),
        ("cpu", CpuSampler),
        ("memory", MemorySampler),
        ("io", IoSampler),
        ("nvml", lambda: NvmlSampler(tree.pids if tree else None)),
    ]
    if torch_in_process:
        factories.append(("torch_cuda", TorchCudaSampler))
    for name, make in factories:
        try:
            s = make()
        except SamplerUnavailable as exc:
            unavailable[name] = str(exc)
            continue
        except Exception as exc:  # a device that is present but failing: report it, profile the rest
            unavailable[name] = f"{type(exc).__name__}: {exc}"
            continue
        samplers.append(s)
        if name == "process_tree":
            tree = s
    return samplers, unavailable


def build_sinks(specs: Sequence) -> list:
    """Sink objects from specs (dicts, built by ``profiler.sinks.build``) or ready-made Sink objects."""
    out = []
    for spec in specs:
        if isinstance(spec, dict):
            from profiler.sinks import build

            out.append(build(spec))
        else:
            out.append(spec)
    return out


def describe(sink) -> dict:
    """A sink's own description, or its class name."""
    try:
        return dict(sink.describe())
    except Exception:
        return {"kind": type(sink).__name__}


class SamplerLoop:
    """Ticks, messages and the summary of one profiling window."""

    def __init__(self, samplers: list, sinks: list, interval: float, labels: dict | None = None,
                 unavailable: dict | None = None, cpu_clock: Callable[[], float] = time.process_time):
        self.samplers = list(samplers)
        self.sinks = sinks
        self.interval = interval
        self.labels = tuple(sorted((labels or {}).items()))
        self.unavailable = dict(unavailable or {})
        self.cpu_clock = cpu_clock
        self.agg = Aggregator()
        self.errors: dict[str, int] = {}
        self.active: dict[str, int] = {}
        self.pending: list[Sample] = []
        self.phase_info: dict[str, dict] = {}
        self.ticks = 0
        self._fails = {id(s): 0 for s in self.samplers}
        self._last_read: dict[int, float] = {}
        self._tree = next((s for s in self.samplers if getattr(s, "name", "") == "process_tree"), None)
        self.stopped = False

    # -- messages ---------------------------------------------------------------------------------------
    def handle(self, msg: dict) -> None:
        """Apply one control message (see ``profiler.Profiler`` for who sends which)."""
        op = msg.get("op")
        if op == "record":
            labels = tuple(sorted((msg.get("labels") or {}).items()))
            self.pending.append(Sample(msg["ts"], msg["name"], float(msg["value"]), labels))
        elif op == "begin":
            self.active[msg["name"]] = self.active.get(msg["name"], 0) + 1
            if self._tree is not None and msg.get("peak_rss_bytes"):
                self._tree.note_peak(int(msg["peak_rss_bytes"]))
        elif op == "end":
            name = msg["name"]
            if self.active.get(name, 0) > 1:
                self.active[name] -= 1
            else:
                self.active.pop(name, None)
            if self._tree is not None and msg.get("peak_rss_bytes"):
                self._tree.note_peak(int(msg["peak_rss_bytes"]))
        elif op == "exit":
            if self._tree is not None:
                self._tree.account_exit(int(msg["pid"]), float(msg["cpu_s"]), int(msg.get("maxrss_bytes", 0)))
        elif op == "stop":
            self.stopped = True

    # -- ticks -------------------------------------------------------------------------------------------
    def tick(self, force: bool = False) -> None:
        """Read every sampler that is due, fold, write to the sinks. Failures are counted, never raised."""
        now = time.time()
        mono = time.monotonic()
        batch: list[Sample] = []
        for s in list(self.samplers):
            period = getattr(s, "period", 0.0)
            if period and not force and mono - self._last_read.get(id(s), -math.inf) < period:
                continue
            try:
                batch.extend(s.read(now))
                self._last_read[id(s)] = mono
                self._fails[id(s)] = 0
            except Exception as exc:
                self._count(f"sampler:{s.name}")
                self._fails[id(s)] += 1
                if self._fails[id(s)] >= MAX_CONSECUTIVE_FAILURES:
                    self.samplers.remove(s)
                    self.unavailable[s.name] = f"dropped after {MAX_CONSECUTIVE_FAILURES} failures: {exc!r}"
        if self.pending:
            batch.extend(self.pending)
            self.pending = []
        self.agg.add(batch, self.active)
        self.ticks += 1
        if self.sinks:
            out = batch if not self.labels else [
                Sample(x.ts, x.name, x.value, tuple(sorted(x.labels + self.labels))) for x in batch]
            self._write(out)

    def _write(self, batch: list[Sample]) -> None:
        for i, sink in enumerate(self.sinks):
            try:
                sink.write(batch)
            except Exception as exc:
                self._count(f"sink:{i}:{type(sink).__name__}")
                log.debug("sink %r failed: %r", sink, exc)

    def _count(self, key: str) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, wait: Callable[[float], list[dict]], alive: Callable[[], bool] = lambda: True) -> Summary:
        """Tick on schedule until a stop message (or ``alive()`` turns false); return the summary.

        ``wait(timeout)`` blocks up to ``timeout`` seconds and returns the messages that arrived.
        """
        cpu0, t0 = self.cpu_clock(), time.monotonic()
        self.tick(force=True)
        k = 1
        while not self.stopped:
            delay = t0 + k * self.interval - time.monotonic()
            for msg in wait(max(0.0, delay)):
                self.handle(msg)
            if self.stopped or not alive():
                break
            now = time.monotonic()
            if now >= t0 + k * self.interval:
                self.tick()
                # Skip the slots this tick overran: they are missed samples, reported, not made up.
                k = max(k + 1, math.floor((time.monotonic() - t0) / self.interval) + 1)
        self.tick(force=True)  # the window's closing edge: counters read at the end
        end = time.monotonic()
        return self._summary(self.cpu_clock() - cpu0, end - t0)

    def _summary(self, sampler_cpu: float, wall: float) -> Summary:
        for s in self.samplers + self.sinks:
            try:
                close = getattr(s, "close", None)
                if close is not None:
                    close()
            except Exception:
                self._count(f"close:{type(s).__name__}")
        tree_cpu = self.agg.metrics.get("lowres_process_cpu_seconds_total")
        tree_cpu_s = tree_cpu.max if tree_cpu else 0.0
        expected = math.floor(wall / self.interval) + 2  # the opening and the closing edge
        self_cost = {
            "sampler_cpu_s": sampler_cpu,
            "ticks": self.ticks,
            "expected_ticks": expected,
            "overhead_ratio": sampler_cpu / tree_cpu_s if tree_cpu_s > 0 else math.nan,
            "ms_per_tick": 1000 * sampler_cpu / max(1, self.ticks),
            "interval_s": self.interval,
        }
        return Summary(metrics=self.agg.metric_dicts(), phases=self.agg.phase_dicts(), self_cost=self_cost,
                       errors=dict(self.errors), unavailable=self.unavailable,
                       sinks=[describe(s) for s in self.sinks], wall_s=wall)


def parent_alive(ppid: int) -> Callable[[], bool]:
    """True while the process that started us is alive: once it dies we are re-parented."""
    return lambda: os.getppid() == ppid


def stdin_messages(fd: int = 0) -> Callable[[float], list[dict]]:
    """A ``wait`` for the sampler process: JSON lines on ``fd``; end of file means stop (the parent is gone)."""
    import json
    import select

    buf = bytearray()

    def wait(timeout: float) -> list[dict]:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(fd, 65536)
        if not chunk:
            return [{"op": "stop"}]
        buf.extend(chunk)
        *lines, rest = bytes(buf).split(b"\n")
        buf[:] = rest
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                print(f"profiler: ignored a malformed control line {line[:80]!r}", file=sys.stderr)
        return out

    return wait
