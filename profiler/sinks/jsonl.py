"""A JSON-lines file of every sample: the live dashboard tails it, and it is the record nothing can lose.

One line per sample (``Sample.to_dict()``). Lines go into a buffer; a small thread flushes it at least every
``flush_interval_s`` so a reader sees data within a second however slowly the sampler ticks, without a
system call per sample.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

from profiler.reading import Sample


class JsonlSink:
    """Appends samples to ``path`` (parent folders created), flushed every ``flush_interval_s`` and at close."""

    def __init__(self, path: str, flush_interval_s: float = 1.0):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Appending keeps an earlier part of the same run (a resumed run writes to the same file).
        self._file = open(self.path, "a", encoding="utf-8", buffering=1 << 16)
        self._lock = threading.Lock()
        self._dirty = False
        self._closed = threading.Event()
        self.written = 0
        self._flusher = threading.Thread(target=self._flush_loop, args=(flush_interval_s,),
                                         name="lowres-jsonl-flush", daemon=True)
        self._flusher.start()

    def write(self, batch: Sequence[Sample]) -> None:
        """Serialise the batch into the buffer; the flusher thread writes it out."""
        text = "".join(json.dumps(s.to_dict(), separators=(",", ":")) + "\n" for s in batch)
        if not text:
            return
        with self._lock:
            if self._file.closed:
                raise ValueError(f"JSONL sink {self.path} is closed")
            self._file.write(text)
            self._dirty = True
            self.written += len(batch)

    def flush(self) -> None:
        """Push buffered lines to the file now."""
        with self._lock:
            if self._dirty and not self._file.closed:
                self._file.flush()
                self._dirty = False

    def _flush_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            self.flush()

    def close(self) -> None:
        """Flush and close the file; safe to call twice."""
        self._closed.set()
        self._flusher.join(timeout=5)
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                self._file.close()

    def describe(self) -> dict:
        """Where the samples are, for the run summary."""
        return {"kind": "jsonl", "path": str(self.path), "samples": self.written}


def read(path: str | Path) -> list[Sample]:
    """Every sample in a JSONL file written by this sink; a torn last line (a live file) is skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(Sample.from_dict(json.loads(line)))
            except ValueError:
                continue
    return out
