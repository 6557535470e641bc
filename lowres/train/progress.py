"""The console side of a run: a rich progress bar (ETA, tokens/s, loss, memory) and stop signals."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

GIB = 1024**3


class TrainProgress:
    """One bar for the optimizer steps; ``update`` after each step. Disabled: every call is a no-op."""

    def __init__(self, console: Console, total: int, done: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self._bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, transient=False)
        self._task = self._bar.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> "TrainProgress":
        if self.enabled:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.stop()

    def update(self, step: int, loss: float, tokens_per_s: float, peak_bytes: int) -> None:
        if self.enabled:
            info = f"loss {loss:.4f} · {tokens_per_s:,.0f} tok/s · peak {peak_bytes / GIB:.2f} GiB"
            self._bar.update(self._task, completed=step, info=info)


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop finishes its step, checkpoints and returns (``signame`` says why)."""

    def __init__(self) -> None:
        self.signame: str | None = None

    def __bool__(self) -> bool:
        return self.signame is not None


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Turn SIGTERM and SIGINT into a flag for the duration; a second signal of the same kind acts at once.

    Only the main thread may install handlers; elsewhere (a Flower client thread) the flag never sets.
    """
    flag = StopFlag()
    previous = {}

    def handler(signum, frame):
        if flag:
            raise KeyboardInterrupt  # asked twice: stop now, without the checkpoint
        flag.signame = signal.Signals(signum).name

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:
        pass  # not the main thread
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
