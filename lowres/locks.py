"""Folders owned by one process at a time: a run's output folder, the tracking spool during a sync.

A lock is ``fcntl.flock`` on ``<folder>/.lowres.lock`` (or a name given), whose content says who holds it
(pid, host, command, since). The kernel drops the lock when its process dies, however it dies, so a lock
file left by a dead process is simply taken over; no pid guessing, no stale-lock timeouts. Locks are per
open file, so two threads of one process that each open the lock are refused like two processes.

    with FolderLock(out, "run"):          # LockedError (exit 2) naming the holder when another process has it
        ...
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from lowres.errors import UsageError

LOCK_NAME = ".lowres.lock"


class LockedError(UsageError):
    """The folder is in use by another process (exit 2); the message names it."""


class FolderLock:
    """An exclusive lock on ``folder`` (created if missing) held until :meth:`release`."""

    def __init__(self, folder: str | Path, what: str = "output folder", name: str = LOCK_NAME,
                 hint: str = "wait for it to finish, or pick another folder"):
        self.folder, self.what, self.hint = Path(folder), what, hint
        self.path = self.folder / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait_s: float = 0.0, on_wait=None) -> "FolderLock":
        """Take the lock; wait up to ``wait_s`` seconds for another holder (``on_wait(holder)`` is called once
        when waiting starts); LockedError if it is still held then."""
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _describe(read_holder(self.path))
                    os.close(fd)
                    raise LockedError(f"{self.what} {str(self.folder)!r} is in use by {holder}",
                                      hint=self.hint) from None
                if on_wait is not None and not told:
                    on_wait(_describe(read_holder(self.path)))
                    told = True
                time.sleep(0.2)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": " ".join(["lowres", *sys.argv[1:]])[:300] if sys.argv else "lowres"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a process about to lock it)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_output_dir(folder: str | Path, what: str = "output folder") -> Path:
    """UsageError (exit 2) unless ``folder`` is, or can become, a writable folder; creates nothing.

    Checked before any heavy work: a file in the way, a file among its parents, or no write permission on the
    folder or its nearest existing parent (a read-only filesystem included).
    """
    p = Path(folder).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{what} {str(p)!r} is a file, not a folder", hint="pick a folder path")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{what} {str(p)!r} cannot be created: {str(probe)!r} is a file",
                         hint="pick a folder path whose parents are folders")
    if not os.access(probe, os.W_OK | os.X_OK) or _read_only_fs(probe):
        raise UsageError(f"{what} {str(p)!r} is not writable ({str(probe)!r} is read-only to this user)",
                         hint="pick a folder you can write to")
    return p


def _read_only_fs(path: Path) -> bool:
    """True on a read-only mount, which os.access does not report for root."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def read_holder(path: Path) -> dict:
    """What the holder wrote into the lock file ({} when unreadable or being rewritten)."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process"
    since = time.strftime("%H:%M:%S", time.localtime(holder["since"])) if holder.get("since") else "?"
    return (f"process {holder['pid']} on {holder.get('host', '?')} ({holder.get('command', 'lowres')!r}, "
            f"since {since})")
