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
    num_examples: int
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
    if not update.num_examples > 0:
        return f"num_examples {update.num_examples} is not positive"
    return None


def update_norm(delta: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(x, dtype=np.float64).sum()) for x in delta.values()))


def screen(updates: list[Update], global_tensors: dict[str, np.ndarray], norm_factor: float | None = 10.0,
           ) -> tuple[list[Update], list[Rejection]]:
    """Split updates into accepted and rejected: malformed ones first, then any whose norm exceeds
    ``norm_factor`` × the median norm of the well-formed ones (with at least 3 of them: a median of two is
    one of the two, so it cannot tell which is the outlier)."""
    ok, rejected = [], []
    for u in updates:
        reason = check_update(u, global_tensors)
        (rejected.append(Rejection(u.client, reason)) if reason else ok.append(u))
    if norm_factor and len(ok) >= 3:
        norms = [update_norm(u.delta) for u in ok]
        limit = norm_factor * float(np.median(norms))
        kept = []
        for u, n in zip(ok, norms):
            if limit > 0 and n > limit:
                rejected.append(Rejection(u.client, f"update norm {n:.4g} > {norm_factor:g} × median {limit / norm_factor:.4g}"))
            else:
                kept.append(u)
        ok = kept
    return ok, rejected


def aggregate(global_tensors: dict[str, np.ndarray], updates: list[Update]) -> dict[str, np.ndarray]:
    """New global adapter: per rank slot, old value + the sample-weighted mean of the owners' updates.

    Non-LoRA tensors (none in a plain LoRA adapter) are averaged over all updates."""
    if not updates:
        return {n: x.copy() for n, x in global_tensors.items()}
    out = {}
    for name, g in global_tensors.items():
        ax = rank_axis(name)
        acc = np.zeros(g.shape, np.float64)
        weight = np.zeros(g.shape[ax] if ax is not None else 1, np.float64)
        for u in updates:
            d = u.delta[name].astype(np.float64)
            if ax is None:
                acc += u.num_examples * d
                weight += u.num_examples
            elif ax == 0:
                acc[:u.rank] += u.num_examples * d
                weight[:u.rank] += u.num_examples
            else:
                acc[:, :u.rank] += u.num_examples * d
                weight[:u.rank] += u.num_examples
        safe = np.where(weight > 0, weight, 1.0)
        mean = acc / (safe[:, None] if ax == 0 else safe if ax == 1 else safe[0])
        out[name] = (g.astype(np.float64) + mean).astype(np.float32)
    return out


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
