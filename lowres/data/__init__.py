"""Data: read records, render them (plain or chat), tokenize into blocks, split, and batch resumably.

    records = read_records(cfg.data)
    bundle = build_data(cfg.data, tokenizer, seed, records=records)   # .train / .eval TokenBlocks, .stats
    batches = BatchIterator(bundle.train, batch_size, seed)            # state_dict() for checkpoints
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lowres.data.blocks import IGNORE, BatchIterator, TokenBlocks, split_blocks, tokenize
from lowres.data.reading import FORMATS, list_samples, read_file, read_records, sample_path
from lowres.data.rendering import chat_pair, detect_format, render_texts


@dataclass
class DataBundle:
    """Train and eval blocks of one run, with figures about them for the log."""

    train: TokenBlocks
    eval: TokenBlocks
    stats: dict = field(default_factory=dict)


def build_data(cfg: Any, tokenizer: Any, seed: int, records: list[dict] | None = None) -> DataBundle:
    """Read (unless ``records`` are given), render, tokenize and split a DataConfig's data.

    stats: n_records, format, n_blocks, n_train_blocks, n_eval_blocks, block_length, packing, n_tokens
    (non-padding), n_label_tokens (positions that take a loss).
    """
    records = read_records(cfg) if records is None else records
    texts = render_texts(records, cfg, tokenizer)
    blocks = tokenize(texts, tokenizer, cfg)
    train, evals = split_blocks(blocks, cfg.eval_fraction, seed)
    if blocks.attention_mask is not None:
        n_tokens = int(blocks.attention_mask.sum())
    else:
        n_tokens = int(blocks.input_ids.numel()) - _packed_fill(blocks, tokenizer.pad_token_id)
    stats = {
        "n_records": len(records),
        "format": "instruct" if texts and isinstance(texts[0], tuple) else "text",
        "n_blocks": len(blocks),
        "n_train_blocks": len(train),
        "n_eval_blocks": len(evals),
        "block_length": cfg.max_length,
        "packing": cfg.packing,
        "n_tokens": n_tokens,
        "n_label_tokens": blocks.n_label_tokens(),
    }
    return DataBundle(train, evals, stats)


def _packed_fill(blocks: TokenBlocks, pad: int | None) -> int:
    """Padding positions of packed blocks: only the last block can have any, as a run at its end of pad ids
    without labels (real data always ends with a labelled token: an EOS or a response's last token)."""
    if pad is None:
        return 0
    fill = 0
    for token, label in zip(reversed(blocks.input_ids[-1].tolist()), reversed(blocks.labels[-1].tolist())):
        if token != pad or label != IGNORE:
            break
        fill += 1
    return fill


__all__ = [
    "FORMATS",
    "IGNORE",
    "BatchIterator",
    "DataBundle",
    "TokenBlocks",
    "build_data",
    "chat_pair",
    "detect_format",
    "list_samples",
    "read_file",
    "read_records",
    "render_texts",
    "sample_path",
    "split_blocks",
    "tokenize",
]
