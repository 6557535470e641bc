"""Phase markers, run in the watched (training) process: cheap timestamps and high-water marks only.

Per phase: wall time, CPU time of this process (all its threads, so torch's intra-op threads count), and the
peak RSS of this process within the phase: the kernel's high-water mark (VmHWM) is reset to the current RSS
by writing "5" to /proc/self/clear_refs when the phase begins and read when it ends — exact, not sampled.
When torch has a CUDA context, its peak-allocated statistics are reset and read the same way.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from profiler.torch_allocator import cuda_torch, peak_allocated, reset_peaks


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # not Linux, or a kernel/sandbox that forbids it: peaks fall back to sampling
        return False


class PhaseTracker:
    """Totals per phase name; ``notify(msg)`` tells the sampler about each edge."""

    def __init__(self, notify: Callable[[dict], None]):
        self.notify = notify
        self.phases: dict[str, dict] = {}
        self._hwm_ok = _can_reset_hwm()
        self._status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC) if self._hwm_ok else -1
        self._floors: list[int] = []

    def close(self) -> None:
        """Close the kept /proc/self/status."""
        if self._status >= 0:
            os.close(self._status)
            self._status = -1

    def _hwm(self) -> int:
        """This process's VmHWM in bytes."""
        text = os.pread(self._status, 4096, 0)
        i = text.find(b"VmHWM:")
        return int(text[i + 6 :].split(None, 1)[0]) * 1024 if i >= 0 else 0

    def _reset_hwm(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute what happens inside to ``name``. Phases may nest: an outer phase's peak is the larger of
        its high-water mark before an inner phase reset it and the mark at its own end."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a phase name must be a non-empty string, got {name!r}")
        torch = cuda_torch()
        before = 0
        if self._hwm_ok:
            # The mark is about to be reset: hand the peak so far to the sampler and to an outer phase.
            before = self._hwm()
            if self._floors:
                self._floors[-1] = max(self._floors[-1], before)
            self._reset_hwm()
        self._floors.append(0)
        if torch is not None:
            reset_peaks(torch)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        self.notify({"op": "begin", "name": name, "ts": time.time(), "peak_rss_bytes": before})
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            peak = max(self._floors.pop(), self._hwm() if self._hwm_ok else 0)
            ph = self.phases.setdefault(name, {"count": 0, "wall_s": 0.0, "cpu_s": 0.0, "peak_rss_bytes": 0})
            ph["count"] += 1
            ph["wall_s"] += wall
            ph["cpu_s"] += cpu
            ph["peak_rss_bytes"] = max(ph["peak_rss_bytes"], peak)
            if torch is not None:
                cuda_peak = peak_allocated(torch)
                ph["cuda_peak_allocated_bytes"] = max(ph.get("cuda_peak_allocated_bytes", 0), cuda_peak)
            self.notify({"op": "end", "name": name, "ts": time.time(), "peak_rss_bytes": peak})
