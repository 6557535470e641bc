"""System memory and swap from /proc/meminfo."""

from __future__ import annotations

from profiler.process_tree import ProcFile, SamplerUnavailable, _kb_field
from profiler.reading import Sample

_KEYS = (b"MemTotal", b"MemAvailable", b"SwapTotal", b"SwapFree")


def _meminfo(text: bytes) -> dict[bytes, int]:
    """The four fields used, in bytes (found by key: parsing all ~50 lines costs 4x more)."""
    return {k: _kb_field(text, b"\n" + k + b":") if k != b"MemTotal" else _kb_field(text, k + b":")
            for k in _KEYS if (k + b":") in text}


class MemorySampler:
    """Memory in use (total - available, as ``free`` counts it), its fraction of the total, and swap in use."""

    name = "memory"
    period = 0.0

    def __init__(self) -> None:
        try:
            self._file = ProcFile("/proc/meminfo")
            info = _meminfo(self._file.read(16384))
        except OSError as exc:
            raise SamplerUnavailable(f"no /proc/meminfo ({exc}); not Linux?") from None
        if b"MemAvailable" not in info:
            raise SamplerUnavailable("/proc/meminfo has no MemAvailable (kernel older than 3.14)")

    def read(self, now: float) -> list[Sample]:
        """One reading."""
        info = _meminfo(self._file.read(16384))
        used = info[b"MemTotal"] - info[b"MemAvailable"]
        swap = info.get(b"SwapTotal", 0) - info.get(b"SwapFree", 0)
        return [
            Sample(now, "lowres_system_memory_used_bytes", float(used)),
            Sample(now, "lowres_system_memory_used_ratio", used / info[b"MemTotal"]),
            Sample(now, "lowres_system_swap_used_bytes", float(swap)),
        ]

    def close(self) -> None:
        """Close /proc/meminfo."""
        self._file.close()
