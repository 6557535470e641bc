"""A sign of life for commands that take more than a couple of seconds without a progress bar of their own."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console

EVERY_S = 10.0  # piped: a line at most this often ($LOWRES_PROGRESS_EVERY_S, as `lowres train` uses)


@contextmanager
def working(text: str, console: Console | None = None) -> Iterator[None]:
    """A spinner saying ``text`` on a terminal (it disappears when the work ends). Piped or redirected, a plain
    line ``text (12 s)`` every ``EVERY_S`` seconds while the work goes on, and one with the time taken at the
    end if any was printed: a log shows what a long command was doing, and work that ends (or fails on a bad
    input) sooner leaves stderr as it was — one line for an error. Both on stderr: stdout stays the result."""
    console = console or Console(stderr=True)
    if console.is_terminal:
        with console.status(text):
            yield
        return
    every = float(os.environ.get("LOWRES_PROGRESS_EVERY_S", EVERY_S)) or EVERY_S
    t0, done, said = time.monotonic(), threading.Event(), []

    def beat() -> None:
        while not done.wait(every):
            said.append(True)
            console.print(f"{text} ({time.monotonic() - t0:.0f} s)", highlight=False, soft_wrap=True)

    thread = threading.Thread(target=beat, name="lowres-working", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    if said:
        console.print(f"… done in {time.monotonic() - t0:.1f} s", highlight=False, soft_wrap=True)
