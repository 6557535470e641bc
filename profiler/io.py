"""Disk and network bytes: the kernel's cumulative counters, read at most once a second and at the window
edges (the loop's first and last tick), never polled faster — a counter needs no fast polling to be exact."""

from __future__ import annotations

import os

from profiler.process_tree import ProcFile, SamplerUnavailable
from profiler.reading import Sample

# Whole disks only (partitions would count twice); virtual block devices that stack on real ones
# (device-mapper, md raid) or live in memory are left out for the same reason.
_SKIP = ("loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd")


def _disks() -> set[str]:
    try:
        return {d for d in os.listdir("/sys/block") if not d.startswith(_SKIP)}
    except OSError:
        return set()


class IoSampler:
    """Bytes read from and written to whole disks; bytes received and sent on every interface but loopback."""

    name = "io"
    period = 1.0

    def __init__(self) -> None:
        try:
            self._diskstats = ProcFile("/proc/diskstats")
            self._netdev = ProcFile("/proc/net/dev")
        except OSError as exc:
            raise SamplerUnavailable(f"no /proc/diskstats or /proc/net/dev ({exc}); not Linux?") from None
        self._names = _disks()
        self._base = self._counters()

    def _counters(self) -> tuple[int, int, int, int]:
        rd = wr = 0
        for line in self._diskstats.read(65536).split(b"\n"):
            parts = line.split()
            if len(parts) > 9 and parts[2].decode() in self._names:
                rd += int(parts[5]) * 512  # sectors are always 512 bytes in diskstats
                wr += int(parts[9]) * 512
        rx = tx = 0
        for line in self._netdev.read(65536).split(b"\n")[2:]:
            name, _, rest = line.partition(b":")
            parts = rest.split()
            if len(parts) >= 9 and name.strip() != b"lo":
                rx += int(parts[0])
                tx += int(parts[8])
        return rd, wr, rx, tx

    def read(self, now: float) -> list[Sample]:
        """Bytes since construction (counters, so a sink may compute any rate it wants)."""
        cur = self._counters()
        rd, wr, rx, tx = (max(0, c - b) for c, b in zip(cur, self._base))
        return [
            Sample(now, "lowres_system_disk_read_bytes_total", float(rd)),
            Sample(now, "lowres_system_disk_write_bytes_total", float(wr)),
            Sample(now, "lowres_system_network_receive_bytes_total", float(rx)),
            Sample(now, "lowres_system_network_transmit_bytes_total", float(tx)),
        ]

    def close(self) -> None:
        """Close the /proc files."""
        self._diskstats.close()
        self._netdev.close()
