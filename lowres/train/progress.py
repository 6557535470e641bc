"""The console side of a run: a rich progress bar (ETA, tokens/s, loss, memory) and stop signals."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

GIB = 1024**3


LOG_EVERY_S = 10.0  # piped output: one plain progress line at most this often (and at the first step)


class TrainProgress:
    """One bar for the optimizer steps; ``update`` after each step. Disabled: every call is a no-op.

    On a terminal it is a live rich bar. Piped or redirected (``lowres train > log 2>&1``, nohup), a bar is
    invisible until the end, so it prints a plain line instead at the first step and then every
    ``LOG_EVERY_S`` seconds (``$LOWRES_PROGRESS_EVERY_S`` changes it), as log readers and ``tail -f`` expect.
    """

    def __init__(self, console: Console, total: int, done: int = 0, enabled: bool = True):
        import os

        self.enabled = enabled
        if not enabled:
            return
        self._console, self._total = console, total
        self._plain = not console.is_terminal
        if self._plain:
            self._every_s = float(os.environ.get("LOWRES_PROGRESS_EVERY_S", LOG_EVERY_S))
            self._t0, self._last, self._first = time.monotonic(), None, done
            return
        self._bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, transient=False)
        self._task = self._bar.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> "TrainProgress":
        if self.enabled and not self._plain:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and not self._plain:
            self._bar.stop()

    def update(self, step: int, loss: float, tokens_per_s: float, peak_bytes: int) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f} · {tokens_per_s:,.0f} tok/s · peak {peak_bytes / GIB:.2f} GiB"
        if not self._plain:
            self._bar.update(self._task, completed=step, info=info)
            return
        now = time.monotonic()
        if self._last is not None and now - self._last < self._every_s and step < self._total:
            return
        self._last, elapsed = now, now - self._t0
        done = step - self._first
        eta = "" if done <= 0 else f" · ETA {_clock(elapsed / done * (self._total - step))}"
        self._console.print(f"train step {step}/{self._total} ({step / self._total:.0%}) · {info} · "
                            f"elapsed {_clock(elapsed)}{eta}", highlight=False, soft_wrap=True)
        self._console.file.flush()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


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
