"""System and per-core CPU use from /proc/stat, as deltas of the kernel's cumulative jiffy counters."""

from __future__ import annotations

from profiler.process_tree import ProcFile, SamplerUnavailable
from profiler.reading import Sample


def _parse(text: bytes) -> dict[str, tuple[int, int]]:
    """``{"cpu": (busy, total), "cpu0": ...}`` in jiffies; idle and iowait count as not busy."""
    out = {}
    for line in text.split(b"\n"):
        if not line.startswith(b"cpu"):
            break  # the cpu lines come first
        parts = line.split()
        values = [int(v) for v in parts[1:9]]  # user nice system idle iowait irq softirq steal
        total = sum(values)
        out[parts[0].decode()] = (total - values[3] - values[4], total)
    return out


class CpuSampler:
    """System-wide CPU use (0..1) and each core's."""

    name = "cpu"
    period = 0.0

    def __init__(self) -> None:
        try:
            self._file = ProcFile("/proc/stat")
        except OSError as exc:
            raise SamplerUnavailable(f"no /proc/stat ({exc}); not Linux?") from None
        self._last = _parse(self._file.read(65536))
        self._labels = {k: (("cpu", k[3:]),) for k in self._last if k != "cpu"}

    def read(self, now: float) -> list[Sample]:
        """Use since the previous read (or construction); a core with no elapsed jiffies is left out."""
        cur = _parse(self._file.read(65536))
        out = []
        for key, (busy, total) in cur.items():
            last = self._last.get(key)
            if last is None or total <= last[1]:
                continue
            ratio = (busy - last[0]) / (total - last[1])
            if key == "cpu":
                out.append(Sample(now, "lowres_system_cpu_utilization_ratio", ratio))
            else:
                out.append(Sample(now, "lowres_system_cpu_core_utilization_ratio", ratio,
                                  self._labels.get(key) or (("cpu", key[3:]),)))
        self._last = cur
        return out

    def close(self) -> None:
        """Close /proc/stat."""
        self._file.close()
