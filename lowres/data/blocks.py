"""Token blocks: tokenize (packing or pad/truncate), a deterministic train/eval split, and a resumable
batch iterator. Labels follow the Hugging Face convention: unshifted copies of input_ids (the loss shifts),
-100 where no loss is taken (padding, prompts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lowres.errors import DataError

IGNORE = -100


@dataclass
class TokenBlocks:
    """N sequences of length L. ``attention_mask`` is None when packed (every position is attended; a
    padded tail of the last block only sees, and is never seen by, earlier tokens and carries no labels)."""

    input_ids: Any  # LongTensor [N, L]
    labels: Any  # LongTensor [N, L]
    attention_mask: Any | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index: Any) -> "TokenBlocks":
        """The blocks at ``index`` (a LongTensor or list of row numbers)."""
        mask = None if self.attention_mask is None else self.attention_mask[index]
        return TokenBlocks(self.input_ids[index], self.labels[index], mask)

    def n_label_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def _examples(texts: list, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    eos = tokenizer.eos_token_id
    if not texts:
        return []
    if isinstance(texts[0], str):
        ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        # EOS between documents, so a packed block shows where one ends and the next begins
        return [(x + [eos], x + [eos]) for x in ids]
    # chat-rendered strings carry their own special tokens (BOS, role markers): add none
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    answers = tokenizer([r for _, r in texts], add_special_tokens=False)["input_ids"]
    return [(p + r, [IGNORE] * len(p) + r) for p, r in zip(prompts, answers)]


def tokenize(texts: list, tokenizer: Any, cfg: Any) -> TokenBlocks:
    """Texts (or prompt/response pairs) → blocks of ``cfg.max_length`` tokens.

    Packing: all examples joined (EOS after each plain text) and cut into blocks; the tail is kept as a
    padded last block when it holds at least a quarter of a block (or is all there is). No packing: each
    example truncated or right-padded to the length, with an attention mask; examples whose labels are all
    masked (a prompt longer than the block) are dropped, since they teach nothing.
    """
    import torch

    length = cfg.max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = _examples(texts, tokenizer)
    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    masks: list[list[int]] | None = None
    if cfg.packing:
        ids = [t for x, _ in examples for t in x]
        labels = [t for _, y in examples for t in y]
        for start in range(0, len(ids), length):
            chunk = ids[start:start + length]
            if len(chunk) < length and rows_ids and len(chunk) < length // 4:
                break
            fill = length - len(chunk)
            rows_ids.append(chunk + [pad] * fill)
            rows_labels.append(labels[start:start + length] + [IGNORE] * fill)
    else:
        masks = []
        for x, y in examples:
            x, y = x[:length], y[:length]
            if all(t == IGNORE for t in y):
                continue
            fill = length - len(x)
            rows_ids.append(x + [pad] * fill)
            rows_labels.append(y + [IGNORE] * fill)
            masks.append([1] * len(x) + [0] * fill)
    if not rows_ids:
        raise DataError("the data gave no token blocks with anything to learn (empty texts, or every prompt "
                        f"longer than data.max_length={length})", hint="check the data or raise max_length")
    return TokenBlocks(torch.tensor(rows_ids, dtype=torch.long), torch.tensor(rows_labels, dtype=torch.long),
                       None if masks is None else torch.tensor(masks, dtype=torch.long))


def split_blocks(blocks: TokenBlocks, eval_fraction: float, seed: int) -> tuple[TokenBlocks, TokenBlocks]:
    """(train, eval): a seeded random ``eval_fraction`` of the blocks for eval (at least one when the
    fraction is > 0 and there are two or more blocks), each part in its original order."""
    import torch

    n = len(blocks)
    n_eval = 0
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    eval_idx = perm[:n_eval].sort().values
    train_idx = perm[n_eval:].sort().values
    return blocks.select(train_idx), blocks.select(eval_idx)


class BatchIterator:
    """Endless batches over ``blocks``: each epoch a fresh permutation seeded by (seed, epoch), so the order
    depends on nothing but those two numbers and ``state_dict()`` → ``load_state_dict()`` resumes exactly.
    A batch that runs past the end of an epoch continues into the next one (no short batches)."""

    def __init__(self, blocks: TokenBlocks, batch_size: int, seed: int = 0):
        if len(blocks) == 0:
            raise DataError("no blocks to iterate over", hint="the training split is empty; add data")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.epoch, self.index = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int):
        import torch

        # hash of a tuple of ints is stable across processes (no hash randomisation for ints)
        g = torch.Generator().manual_seed(hash((self.seed, epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randperm(len(self.blocks), generator=g)

    @property
    def batches_per_epoch(self) -> float:
        return len(self.blocks) / self.batch_size

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict:
        return self.next()

    def next(self) -> dict:
        """The next batch: input_ids, labels, and attention_mask where the blocks have one."""
        import torch

        rows = []
        while len(rows) < self.batch_size:
            if self.index >= len(self.blocks):
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            rows.append(int(self._perm[self.index]))
            self.index += 1
        part = self.blocks.select(torch.tensor(rows))
        batch = {"input_ids": part.input_ids, "labels": part.labels}
        if part.attention_mask is not None:
            batch["attention_mask"] = part.attention_mask
        return batch

    def state_dict(self) -> dict:
        """Position to resume from: {"epoch", "index", "seed"}."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict()``; the blocks must be the same ones."""
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self._perm = self._permutation(self.epoch)
