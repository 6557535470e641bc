"""Rank advice with reasons: from the data size and the memory budget, and for a federated client from a
bytes-per-round budget. Each function returns (rank, reasons); the reasons carry the numbers."""

from __future__ import annotations

import os
from typing import Any

from lowres.advisor import memory as M

# Training tokens → LoRA rank. Hu et al. 2021 (LoRA, §7.2) found r = 1-8 enough to adapt GPT-3 to tasks of
# thousands of examples; Dettmers et al. 2023 (QLoRA, §4) used r = 64 on all linears for instruction sets of
# 10k-1M examples; Biderman et al. 2024 ("LoRA Learns Less and Forgets Less") needed r ≥ 256 only for
# continued pre-training on billions of tokens. Between those anchors, one step per decade of tokens.
RANK_BY_TOKENS = ((1e6, 8), (1e7, 16), (1e8, 32), (float("inf"), 64))

# Bytes of text per token for BPE tokenizers on English and logs (OpenAI's rule of thumb: ~4 characters per
# token). Only used to size the data before a tokenizer exists; the advice says so.
BYTES_PER_TOKEN = 4.0


def data_bytes(data_cfg: Any) -> int | None:
    """Size on disk of the run's data (a file, a folder's files, or the shipped sample); None for hub data."""
    from lowres.data.reading import sample_path

    if data_cfg.path and data_cfg.path.startswith("hf:"):
        return None
    path = data_cfg.path or str(sample_path(data_cfg.sample))
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path) if os.path.isfile(path) else None


def rank_for_data(spec: Any, n_bytes: int | None, targets: str = "attention_mlp") -> tuple[int, list[str]]:
    """The rank for ``n_bytes`` of training text (≈ n_bytes / 4 tokens), by ``RANK_BY_TOKENS``."""
    if n_bytes is None:
        return 16, ["data size unknown (hub dataset): rank 16, the middle of the usual 8-64"]
    tokens = n_bytes / BYTES_PER_TOKEN
    rank = next(r for limit, r in RANK_BY_TOKENS if tokens < limit)
    n = M.lora_parameter_count(spec, rank, M.resolve_targets(targets))
    return rank, [f"rank {rank}: the data is {n_bytes / 1e6:.2f} MB ≈ {tokens / 1e6:.2f}M tokens (at ~4 bytes "
                  f"per token); below 1M tokens r = 8 suffices (LoRA paper, §7.2), one step up per decade of "
                  f"tokens — {n / 1e6:.2f}M trainable parameters on {targets}"]


def lora_round_bytes(spec: Any, rank: int, targets: str | tuple[str, ...], value_bytes: int = 4,
                     round_trip: bool = True) -> int:
    """Bytes a federated client moves per round for its LoRA adapter.

    Per targeted module A is r × d_in and B is d_out × r (Hu et al. 2021), so r·(d_in + d_out) values, sent
    as ``value_bytes`` each (4 for fp32, 2 for fp16/bf16 codecs); the global adapter comes down and the update
    goes up each round (FedAvg, McMahan et al. 2017), hence 2·r·Σ(d_in + d_out)·bytes over all L layers.
    """
    per_rank = M.lora_parameter_count(spec, 1, M.resolve_targets(targets))
    return int((2 if round_trip else 1) * rank * per_rank * value_bytes)


def federated_rank(spec: Any, bytes_per_round: float, targets: str = "attention_mlp", value_bytes: int = 4,
                   max_rank: int = 64) -> tuple[int | None, list[str]]:
    """The largest rank ≤ ``max_rank`` whose round trip fits ``bytes_per_round``; None when not even r = 1."""
    per_rank = lora_round_bytes(spec, 1, targets, value_bytes)
    rank = min(max_rank, int(bytes_per_round // per_rank))
    if rank < 1:
        return None, [f"even rank 1 moves {per_rank / 1e6:.2f} MB per round (2 × r × Σ(d_in + d_out) × "
                      f"{value_bytes} B); the budget is {bytes_per_round / 1e6:.2f} MB — target fewer modules "
                      f"(e.g. attention) or compress the update"]
    return rank, [f"federated rank {rank}: each round moves 2 × r × Σ(d_in + d_out) × {value_bytes} B = "
                  f"{rank * per_rank / 1e6:.2f} MB ≤ the {bytes_per_round / 1e6:.2f} MB budget "
                  f"({per_rank / 1e6:.3f} MB per unit of rank on {targets})"]


def fit_rank_to_budget(rank: int, fits: Any) -> tuple[int, list[str]]:
    """Halve ``rank`` while ``fits(rank)`` (a predicate on the smallest setting) says it does not fit."""
    start = rank
    while rank > 1 and not fits(rank):
        rank //= 2
    if rank == start:
        return rank, []
    return rank, [f"rank lowered {start} → {rank}: LoRA state and activations at rank {start} do not fit the budget"]
