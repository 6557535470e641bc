"""Aggregation of LoRA updates: validation, FedAvg over rank slots, heterogeneous ranks, metric sums.

Pure numpy over ``{peft name: array}`` dicts, so every rule is testable without Flower or torch.

What travels up is a client's *update* ``Δ = w_after − w_received`` (deltas compress far better than weights
under top-k, and the server keeps the global adapter in full precision whatever the downlink codec did).

Heterogeneous ranks (HetLoRA-style zero-padding, Cho et al. 2024): the global adapter has the largest rank
R. LoRA A is ``(r, in)`` and B is ``(out, r)``; slot j of the rank axis is row j of A and column j of B. A
client of rank r receives the first r slots (truncation) and returns an update of r slots; the server adds,
slot by slot, the sample-weighted mean of the updates of the clients that own that slot — a zero-padded
FedAvg that does not dilute the high slots with the zeros of small-rank clients. Slots no client trained
this round stay as they were. (peft scales LoRA by alpha/r, so clients of different rank should keep
alpha/r fixed — e.g. alpha = 2r — for a slot to mean the same to all of them.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def rank_axis(name: str) -> int | None:
    """The rank axis of a LoRA tensor by its peft name: 0 for A, 1 for B, None for anything else."""
    if "lora_A" in name:
        return 0
    if "lora_B" in name:
        return 1
    return None


def adapter_rank(tensors: dict[str, np.ndarray]) -> int:
    """The rank of an adapter (largest over its A tensors); 0 if it holds none."""
    return max((x.shape[0] for n, x in tensors.items() if rank_axis(n) == 0), default=0)


def truncate_to_rank(tensors: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The first ``rank`` slots of every LoRA tensor (the global adapter as a client of that rank gets it)."""
    out = {}
    for n, x in tensors.items():
        ax = rank_axis(n)
        out[n] = x if ax is None else (x[:rank] if ax == 0 else x[:, :rank])
    return {n: np.ascontiguousarray(x) for n, x in out.items()}


def expected_shapes(global_tensors: dict[str, np.ndarray], rank: int) -> dict[str, tuple[int, ...]]:
    return {n: x.shape for n, x in truncate_to_rank(global_tensors, rank).items()}


@dataclass
class Update:
    """One client's reply for aggregation."""

    client: str
    delta: dict[str, np.ndarray]
    num_examples: float  # as the client reported it (update_weights caps what it weighs)
    rank: int


@dataclass
class Rejection:
    client: str
    reason: str


def check_update(update: Update, global_tensors: dict[str, np.ndarray]) -> str | None:
    """Why ``update`` cannot be averaged in (names, shapes, NaN/Inf, weight), or None if it can."""
    if not 1 <= update.rank <= adapter_rank(global_tensors):
        return f"rank {update.rank} outside 1..{adapter_rank(global_tensors)}"
    want = expected_shapes(global_tensors, update.rank)
    if set(update.delta) != set(want):
        missing, extra = sorted(set(want) - set(update.delta)), sorted(set(update.delta) - set(want))
        return f"tensor names differ (missing {missing[:2]}, unexpected {extra[:2]})"
    for n, x in update.delta.items():
        if x.shape != want[n]:
            return f"{n}: shape {x.shape}, expected {want[n]} for rank {update.rank}"
        if not np.all(np.isfinite(x)):
            return f"{n}: holds NaN or Inf"
    if not (update.num_examples > 0 and math.isfinite(update.num_examples)):
        return f"num_examples {update.num_examples} is not a positive finite count"
    return None


def update_norm(delta: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(x, dtype=np.float64).sum()) for x in delta.values()))


def screen(updates: list[Update], global_tensors: dict[str, np.ndarray], norm_factor: float | None = 10.0,
           reference_norm: float | None = None) -> tuple[list[Update], list[Rejection]]:
    """Split updates into accepted and rejected: malformed ones first, then any whose norm exceeds
    ``norm_factor`` × a reference norm: the median norm of the well-formed ones when there are at least 3;
    with fewer (a median of two is one of the two, so it cannot tell which is the outlier) the norm of the
    previous round's global update (``reference_norm``), or, for two updates in a first round, the smaller
    of the two norms."""
    ok, rejected = [], []
    for u in updates:
        reason = check_update(u, global_tensors)
        (rejected.append(Rejection(u.client, reason)) if reason else ok.append(u))
    if not norm_factor or not ok:
        return ok, rejected
    norms = [update_norm(u.delta) for u in ok]
    if len(ok) >= 3:
        ref, what = float(np.median(norms)), "the round's median"
    elif reference_norm is not None and reference_norm > 0 and math.isfinite(reference_norm):
        ref, what = float(reference_norm), "the previous global update"
    elif len(ok) == 2:
        ref, what = min(norms), "the other update's"
    else:
        return ok, rejected
    limit = norm_factor * ref
    kept = []
    for u, n in zip(ok, norms):
        if limit > 0 and not n <= limit:
            rejected.append(Rejection(u.client, f"update norm {n:.4g} > {norm_factor:g} × {what} norm {ref:.4g}"))
        else:
            kept.append(u)
    return kept, rejected


def update_weights(updates: list[Update], weighting: str = "samples", max_examples: int | None = None,
                   max_ratio: float | None = None) -> list[float]:
    """The aggregation weight of each update: its ``num_examples`` (``weighting="samples"``) or 1 each
    (``"equal"``). A client reports its own count, so it is capped: at ``max_examples`` (what the server
    configured) and at ``max_ratio`` × the round's lower median count (with at least 2 updates) — one
    client claiming 1e9 examples weighs no more than that."""
    return capped_weights([float(u.num_examples) for u in updates], weighting, max_examples, max_ratio)


def capped_weights(counts: list[float], weighting: str = "samples", max_examples: int | None = None,
                   max_ratio: float | None = None) -> list[float]:
    """Self-reported counts (train or eval examples) as weights, capped as ``update_weights`` says."""
    if weighting == "equal":
        return [1.0] * len(counts)
    if weighting != "samples":
        raise ValueError(f"unknown weighting {weighting!r}; use samples or equal")
    w = [float(x) for x in counts]
    cap = math.inf if max_examples is None else float(max_examples)
    if max_ratio is not None and len(w) >= 2:
        cap = min(cap, max_ratio * sorted(w)[(len(w) - 1) // 2])
    return [min(x, cap) for x in w]


AGGREGATORS = ("fedavg", "median", "trimmed_mean")


def aggregate(global_tensors: dict[str, np.ndarray], updates: list[Update], weights: list[float] | None = None,
              method: str = "fedavg", trim_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """New global adapter: per rank slot, old value + an aggregate of the updates of that slot's owners.

    ``fedavg``: the weighted mean (``weights``, default each update's ``num_examples``). ``median``: the
    coordinate-wise median; ``trimmed_mean``: per coordinate, the mean after dropping the ``trim_fraction``
    largest and smallest values (at least one at each end once there are 3 owners) — both unweighted and
    robust to a minority of arbitrary updates (Yin et al. 2018). Non-LoRA tensors (none in a plain LoRA
    adapter) take every update."""
    if not updates:
        return {n: x.copy() for n, x in global_tensors.items()}
    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {method!r}; use one of {', '.join(AGGREGATORS)}")
    ws = [float(u.num_examples) for u in updates] if weights is None else [float(w) for w in weights]
    if method != "fedavg":
        return {name: (g.astype(np.float64) + _robust_delta(name, g, updates, method, trim_fraction)).astype(np.float32)
                for name, g in global_tensors.items()}
    out = {}
    for name, g in global_tensors.items():
        ax = rank_axis(name)
        acc = np.zeros(g.shape, np.float64)
        weight = np.zeros(g.shape[ax] if ax is not None else 1, np.float64)
        for u, w in zip(updates, ws):
            d = u.delta[name].astype(np.float64)
            if ax is None:
                acc += w * d
                weight += w
            elif ax == 0:
                acc[:u.rank] += w * d
                weight[:u.rank] += w
            else:
                acc[:, :u.rank] += w * d
                weight[:u.rank] += w
        safe = np.where(weight > 0, weight, 1.0)
        mean = acc / (safe[:, None] if ax == 0 else safe if ax == 1 else safe[0])
        out[name] = (g.astype(np.float64) + mean).astype(np.float32)
    return out


def _robust_delta(name: str, g: np.ndarray, updates: list[Update], method: str, trim: float) -> np.ndarray:
    """The coordinate-wise median / trimmed mean of the updates to one tensor, slot range by slot range (the
    owners of slots lo..hi-1 are the updates of rank ≥ hi)."""
    ax = rank_axis(name)
    if ax is None:
        return _robust(np.stack([u.delta[name] for u in updates]), method, trim)
    out = np.zeros(g.shape, np.float64)
    lo = 0
    for hi in sorted({min(u.rank, g.shape[ax]) for u in updates}):
        owners = [u for u in updates if u.rank >= hi]
        sl = (slice(lo, hi), slice(None)) if ax == 0 else (slice(None), slice(lo, hi))
        out[sl] = _robust(np.stack([u.delta[name][sl] for u in owners]), method, trim)
        lo = hi
    return out


def _robust(stack: np.ndarray, method: str, trim: float) -> np.ndarray:
    stack = stack.astype(np.float64)
    if method == "median":
        return np.median(stack, axis=0)
    k = stack.shape[0]
    cut = max(1, int(math.floor(trim * k))) if k >= 3 else 0
    cut = min(cut, (k - 1) // 2)
    return np.sort(stack, axis=0)[cut:k - cut].mean(axis=0)


def sum_metrics(records: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    """Merge clients' metric dicts: peaks (``*peak*``) take the max; byte and count counters (``*_bytes``,
    ``*_total``, ``num_examples``) are summed; everything else is the weighted mean. (Flower's default averages
    every key, which turns byte counters into a meaningless mean.)"""
    out: dict[str, float] = {}
    keys = sorted({k for r in records for k in r})
    total_w = sum(weights) or 1.0
    for k in keys:
        vals = [(r[k], w) for r, w in zip(records, weights) if k in r]
        if "peak" in k:  # before the byte rule: a peak RSS in bytes is a maximum, not a sum
            out[k] = float(max(v for v, _ in vals))
        elif k.endswith("_bytes") or k.endswith("_total") or k == "num_examples":
            out[k] = float(sum(v for v, _ in vals))
        else:
            wsum = sum(w for _, w in vals) or total_w
            out[k] = float(sum(v * w for v, w in vals) / wsum)
    return out
