"""load_tokenizer(): the pretrained tokenizer where the weights are pretrained, else a byte-level BPE trained
on the run's own texts with the `tokenizers` library (deterministic: same texts, same tokenizer)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lowres.errors import ModelError

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# A minimal chat template for tokenizers that have none: one role marker per message; the assistant's turn
# ends with EOS so a fine-tuned model learns to stop. Newlines are written as {{ '\n' }} expressions because
# transformers compiles templates with trim_blocks, which would eat a newline written after a block tag.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '" + EOS + "' }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def render_chat(prompt: str, response: str | None = None) -> str:
    """What CHAT_TEMPLATE renders for one user turn (and the assistant's answer), without a tokenizer —
    used to give the tokenizer trainer the same text it will later see."""
    text = f"<|user|>\n{prompt}\n<|assistant|>\n"
    return text if response is None else text + f"{response}{EOS}"


def _flatten(texts: Iterable[Any]) -> Iterable[str]:
    for t in texts:
        if isinstance(t, (tuple, list)):
            yield "".join(t)
        else:
            yield t


def train_tokenizer(texts: Sequence[Any], vocab_size: int):
    """A byte-level BPE trained on ``texts`` (strings, or (prompt, response) pairs), wrapped as a
    transformers fast tokenizer with bos/eos/pad and CHAT_TEMPLATE. The vocabulary may end smaller than
    ``vocab_size`` when the texts hold fewer distinct merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ModelError(f"a tokenizer vocabulary of {vocab_size} cannot hold the 256 bytes and "
                         f"{len(SPECIAL_TOKENS)} special tokens", hint="use data.tokenizer_vocab ≥ 512")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Texts already carry role markers as text; splitting them out keeps the trainer from merging them.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.train_from_iterator(list(_flatten(texts)), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      additional_special_tokens=list(ROLE_TOKENS))
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def load_tokenizer(loc: Any, texts: Sequence[Any] | None, vocab_size: int | None = None) -> tuple[Any, str]:
    """(tokenizer, source): source is "pretrained" (from ``loc.path``) or "trained-on-data".

    A pretrained tokenizer without a pad token pads with EOS; one without a chat template gets CHAT_TEMPLATE.
    Random-init weights always get a tokenizer trained on ``texts`` with ``vocab_size`` (default: the
    model's), because the pretrained tokenizer's ids would mean nothing to random embeddings anyway and
    a small vocabulary keeps the tiny presets small.
    """
    if loc.kind != "random-init":
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(loc.path, trust_remote_code=loc.trust_remote_code)
        except Exception as exc:  # missing or unreadable tokenizer files: say which folder
            raise ModelError(f"no usable tokenizer in {loc.path!r}: {exc}",
                             hint="copy the tokenizer files next to the weights") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if not getattr(tok, "chat_template", None):
            tok.chat_template = CHAT_TEMPLATE
        return tok, "pretrained"
    if not texts:
        raise ModelError("a tokenizer must be trained on the run's data (random-init weights), but no texts "
                         "were given", hint="pass the rendered training texts")
    size = vocab_size or loc.spec.vocab_size
    if size > loc.spec.vocab_size:
        raise ModelError(f"tokenizer vocabulary {size} is larger than the model's embedding "
                         f"({loc.spec.vocab_size})", hint=f"use data.tokenizer_vocab ≤ {loc.spec.vocab_size}")
    return train_tokenizer(texts, size), "trained-on-data"
