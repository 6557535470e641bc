"""Per-step timing of the recipe's phases, honest on a device: synchronised before the clock is read."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

PHASES = ("data", "forward", "backward", "optimizer")


class PhaseTimer:
    """Wall seconds per phase of one step (device synchronised), the profiler's phase marks, and the step's
    peak RSS (VmHWM read as each phase ends; the profiler resets it as each begins, so this is per step)."""

    def __init__(self, prof: Any, device: str):
        self.prof, self.cuda = prof, device.startswith("cuda")
        self.seconds = {p: 0.0 for p in PHASES}
        self.peak_bytes = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        # the phase's label in a torch.profiler trace (lowres.train.opprofile reads "lowres.optimizer");
        # without a running trace a record_function costs about a microsecond
        with (self.prof.phase(name) if self.prof else contextlib.nullcontext()), \
                torch.profiler.record_function(f"lowres.{name}"):
            yield
            if self.cuda:
                torch.cuda.synchronize()
            self.peak_bytes = max(self.peak_bytes, peak_memory(self.cuda))
        self.seconds[name] += time.perf_counter() - t0


def peak_memory(cuda: bool) -> int:
    if cuda:
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
