"""Reading a client's reply on the server, where nothing in it is trusted: metrics, sizes, codec parts.

    update, metrics = read_update(reply, "client-01", rank=8, expected={name: shape, …})

Every function raises ValueError (or lets numpy's own errors through) on anything a well-behaved client
would not send; the server's round loop wraps each reply in one guard, so any exception is a recorded
failure of that client. Sizes are checked against the shapes the server sent before anything is allocated.
"""

from __future__ import annotations

import math
from typing import Any

from lowres.federated.strategy import Update
from lowres.federated.wire import ARRAYS_KEY, METRICS_KEY, from_arrayrecord


def reply_metrics(content: Any, required: tuple[str, ...] = (), numeric: tuple[str, ...] = ()) -> dict[str, float]:
    """A reply's metrics record as finite floats. ValueError when the record is missing, a ``required`` key
    is absent or not a finite number, or a ``numeric`` key is present but not one; other keys that are not
    finite numbers (lists, NaN) are dropped."""
    record = content.metric_records.get(METRICS_KEY) if hasattr(content, "metric_records") else None
    if record is None:
        raise ValueError("the reply has no metrics record")
    out = {}
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                f = float(value)
            except OverflowError:
                continue
            if math.isfinite(f):
                out[str(key)] = f
    for key in (*required, *(k for k in numeric if k in record)):
        if key not in out:
            raise ValueError(f"metric {key!r} is missing or not a finite number "
                             f"({short_reason(repr(record[key])) if key in record else 'absent'})")
    return out


def read_update(reply: Any, client: str, rank: int, expected: dict[str, tuple[int, ...]],
                ) -> tuple[Update, dict[str, float]]:
    """A train reply → (Update, metrics), or ValueError saying what is wrong with it. ``expected`` is the
    shapes the server sent this client (its rank): nothing larger is ever allocated."""
    from lowres.federated.compression import decode

    m = reply_metrics(reply.content, ("num_examples",))
    if not 0 < m["num_examples"] <= 2 ** 53:
        raise ValueError(f"num_examples {m['num_examples']:g} is not a positive count")
    if "rank" in m and m["rank"] != rank:
        raise ValueError(f"reports rank {m['rank']:g}, but was sent rank {rank}")
    arrays = reply.content.array_records.get(ARRAYS_KEY)
    if arrays is None:
        raise ValueError("the reply has no arrays record")
    total = sum(math.prod(s) for s in expected.values())
    # the largest part a codec writes for these tensors: the values, or the names' bytes
    limit = total + len("\n".join(expected).encode()) + 16 * len(expected) + 64
    delta = decode(from_arrayrecord(arrays, max_elements=limit), expected=expected, max_elements=total)
    return Update(client, delta, m["num_examples"], rank), m


def short_reason(x: Any, n: int = 200) -> str:
    """An exception or text as one line of at most ``n`` characters, for a failure record."""
    text = x if isinstance(x, str) else f"{type(x).__name__}: {x}"
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"
