"""A sign of life for commands that take more than a couple of seconds without a progress bar of their own."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console


@contextmanager
def working(text: str, console: Console | None = None) -> Iterator[None]:
    """A spinner saying ``text`` on a terminal; piped or redirected, one plain line before and one with the
    time taken after, so a log shows what the command was doing. Both on stderr: stdout stays the result."""
    console = console or Console(stderr=True)
    if console.is_terminal:
        with console.status(text):
            yield
        return
    t0 = time.monotonic()
    console.print(text, highlight=False, soft_wrap=True)
    yield
    console.print(f"… done in {time.monotonic() - t0:.1f} s", highlight=False, soft_wrap=True)
