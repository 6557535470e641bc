"""Process-tree sampler: CPU, resident memory, its kernel high-water mark and I/O of a process and all its
descendants, read straight from Linux /proc.

Why not psutil: ``Process.children(recursive=True)`` scans every process on the machine, and each psutil call
re-opens its /proc file. Here the tree is tracked incrementally (each known process's ``children`` file, the
main thread every tick, all threads once per ``rescan_period``) and every /proc file stays open and is re-read
with ``pread`` (about 5 µs each). A kept file descriptor also never follows a pid the kernel has reused.

CPU of exited processes is kept: a process reaped by a watched parent shows up in that parent's
``cutime``/``cstime``; one whose parent is not watched (the root, an orphan) keeps its last-seen total, or the
exact figure the reaper hands over through :meth:`ProcessTreeSampler.account_exit` (``os.wait4`` rusage).
A process that is orphaned (its parent exits) before any tick has seen it is not found: nothing in /proc
links it to the tree any more.

RSS summed over processes counts pages shared between them (e.g. after fork) once per process; that is an
upper bound, like ``ps``, and the price of not reading ``smaps`` (milliseconds per process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from profiler.reading import Sample

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class SamplerUnavailable(RuntimeError):
    """The hardware, operating-system feature or package a sampler needs is absent (the sampler is skipped)."""


class ProcFile:
    """A /proc file kept open and re-read from offset 0; reading a dead process's file raises or is empty."""

    __slots__ = ("fd",)

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, size: int = 16384) -> bytes:
        """The file's current content (the kernel regenerates it on each read from offset 0)."""
        return os.pread(self.fd, size, 0)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _kb_field(text: bytes, key: bytes) -> int:
    """The value in bytes of a ``Key:   123 kB`` line of /proc/<pid>/status, 0 where absent (zombies)."""
    i = text.find(key)
    if i < 0:
        return 0
    return int(text[i + len(key) :].split(None, 1)[0]) * 1024


def _io_field(text: bytes, key: bytes) -> int:
    i = text.find(key)
    return int(text[i + len(key) :].split(None, 1)[0]) if i >= 0 else 0


@dataclass(slots=True)
class _Proc:
    pid: int
    stat: ProcFile
    status: ProcFile
    children: ProcFile | None
    io: ProcFile | None
    ppid: int = 0
    zombie: bool = False  # exited, not yet reaped: its counters are final, it is no longer counted
    ticks: int = 0  # own utime+stime plus reaped children's, in clock ticks
    rss: int = 0
    hwm: int = 0
    io_read: int = 0
    io_write: int = 0

    def close(self) -> None:
        for f in (self.stat, self.status, self.children, self.io):
            if f is not None:
                f.close()


def _open_proc(pid: int) -> _Proc | None:
    try:
        stat = ProcFile(f"/proc/{pid}/stat")
        status = ProcFile(f"/proc/{pid}/status")
    except OSError:
        return None
    try:
        children = ProcFile(f"/proc/{pid}/task/{pid}/children")
    except OSError:  # kernel without CONFIG_PROC_CHILDREN: the periodic thread scan finds nothing either
        children = None
    try:
        io = ProcFile(f"/proc/{pid}/io")
    except OSError:  # another user's process: no I/O figures for it
        io = None
    return _Proc(pid, stat, status, children, io)


def _refresh(p: _Proc) -> bool:
    """Re-read one process; False once it is gone (reaped)."""
    try:
        stat = p.stat.read(1024)
        status = p.status.read(4096)
    except OSError:
        return False
    if not stat:
        return False
    fields = stat[stat.rfind(b")") + 2 :].split()
    p.zombie = fields[0] == b"Z"
    p.ppid = int(fields[1])
    p.ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    p.rss = int(fields[21]) * PAGE_SIZE
    p.hwm = _kb_field(status, b"VmHWM:")
    if p.io is not None:
        try:
            io = p.io.read(512)
            p.io_read, p.io_write = _io_field(io, b"read_bytes:"), _io_field(io, b"\nwrite_bytes:")
        except OSError:
            pass
    return True


class ProcessTreeSampler:
    """CPU seconds (since construction), CPU cores in use, RSS, peak RSS, process count and I/O of a tree."""

    name = "process_tree"
    period = 0.0

    def __init__(self, pid: int, rescan_period: float = 1.0, exclude: frozenset[int] = frozenset()):
        if not os.path.exists(f"/proc/{pid}/stat"):
            raise SamplerUnavailable(f"no /proc/{pid}/stat: process {pid} does not exist or this is not Linux")
        self.root = pid
        self.rescan_period = rescan_period
        self.exclude = exclude  # the sampler process itself, when it is a child of the watched one
        self._procs: dict[int, _Proc] = {}
        self._departed: dict[int, tuple[float, int, int]] = {}  # pid -> (cpu s, io read, io write) at exit
        self._exits: list[tuple[int, float, int]] = []  # handed over by the reaper, applied in read()
        self._exact: dict[int, float] = {}
        self._last_rescan = -1e18
        self._peak = 0
        self._cpu = 0.0
        self._last: tuple[float, float] | None = None
        if self._add(pid) is None:
            raise SamplerUnavailable(f"process {pid} is gone or unreadable")
        self._discover(0.0, force_threads=True)
        self._base_cpu, self._base_read, self._base_write = self._totals()

    def pids(self) -> set[int]:
        """Pids of the live processes of the tree (for per-process GPU memory)."""
        return set(self._procs)

    def account_exit(self, pid: int, cpu_s: float, maxrss_bytes: int = 0) -> None:
        """Take the kernel's final figures for a reaped tree member (``os.wait4`` rusage): exact CPU and peak.

        Safe to call from another thread: the list append is atomic and read() applies it.
        """
        self._exits.append((pid, cpu_s, maxrss_bytes))

    def _add(self, pid: int) -> _Proc | None:
        p = _open_proc(pid)
        if p is None or not _refresh(p):
            return None
        self._procs[pid] = p
        return p

    def _discover(self, now: float, force_threads: bool = False) -> None:
        all_threads = force_threads or now - self._last_rescan >= self.rescan_period
        if all_threads:
            self._last_rescan = now
        todo = list(self._procs.values())
        while todo:  # new processes' own children are looked at in the same tick
            p = todo.pop()
            for child in self._children_of(p, all_threads):
                if child not in self._procs and child not in self._departed and child not in self.exclude:
                    q = self._add(child)
                    if q is not None:
                        todo.append(q)

    @staticmethod
    def _children_of(p: _Proc, all_threads: bool) -> list[int]:
        try:
            if not all_threads:
                return [int(x) for x in p.children.read().split()] if p.children else []
            out: list[int] = []
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                with open(f"/proc/{p.pid}/task/{tid}/children", "rb") as f:
                    out.extend(int(x) for x in f.read().split())
            return out
        except OSError:
            return []

    def _totals(self) -> tuple[float, int, int]:
        cpu = sum(p.ticks for p in self._procs.values()) / CLK_TCK
        rd = sum(p.io_read for p in self._procs.values())
        wr = sum(p.io_write for p in self._procs.values())
        for c, r, w in self._departed.values():
            cpu, rd, wr = cpu + c, rd + r, wr + w
        return cpu, rd, wr

    def _apply_exits(self) -> None:
        while self._exits:
            pid, cpu_s, maxrss = self._exits.pop()
            self._exact[pid] = cpu_s
            self._peak = max(self._peak, maxrss)
            if pid in self._departed:
                _, r, w = self._departed[pid]
                self._departed[pid] = (cpu_s, r, w)

    def read(self, now: float) -> list[Sample]:
        """One reading of the whole tree."""
        self._apply_exits()
        gone = [p for p in self._procs.values() if not _refresh(p)]
        for p in gone:
            del self._procs[p.pid]
        for p in gone:
            # A watched parent that is still alive reaps it and its cutime absorbs the child's total;
            # otherwise (the root, orphans) the last-seen or the reaper's exact figure is kept here.
            if p.ppid not in self._procs:
                cpu = self._exact.get(p.pid, p.ticks / CLK_TCK)
                self._departed[p.pid] = (cpu, p.io_read, p.io_write)
            p.close()
        self._discover(now)
        cpu, rd, wr = self._totals()
        # Monotone: a child's CPU moves into its parent's cutime only when reaped, a few ms after exit.
        self._cpu = max(self._cpu, cpu - self._base_cpu)
        rss = sum(p.rss for p in self._procs.values())
        hwm = sum(max(p.hwm, p.rss) for p in self._procs.values())
        self._peak = max(self._peak, hwm)
        out = [
            Sample(now, "lowres_process_cpu_seconds_total", self._cpu),
            Sample(now, "lowres_process_resident_memory_bytes", float(rss)),
            Sample(now, "lowres_process_resident_memory_peak_bytes", float(self._peak)),
            Sample(now, "lowres_process_count", float(sum(not p.zombie for p in self._procs.values()))),
            Sample(now, "lowres_process_io_read_bytes_total", float(max(0, rd - self._base_read))),
            Sample(now, "lowres_process_io_write_bytes_total", float(max(0, wr - self._base_write))),
        ]
        if self._last is not None and now > self._last[0]:
            out.append(Sample(now, "lowres_process_cpu_utilization_ratio",
                              (self._cpu - self._last[1]) / (now - self._last[0])))
        self._last = (now, self._cpu)
        return out

    def note_peak(self, nbytes: int) -> None:
        """Fold in a peak measured elsewhere (a phase's VmHWM read before the phase reset it)."""
        self._peak = max(self._peak, nbytes)

    def close(self) -> None:
        """Close every kept /proc file."""
        for p in self._procs.values():
            p.close()
        self._procs.clear()
