"""render_texts(): records → plain texts, or (prompt, response) pairs rendered with a chat template."""

from __future__ import annotations

from typing import Any

from lowres.errors import DataError


def detect_format(records: list[dict], cfg: Any) -> str:
    """"instruct" when records carry the prompt and response fields, "text" when they carry the text field;
    ``cfg.format`` other than auto is checked against the first record."""
    first = records[0]
    has_instruct = cfg.prompt_field in first and cfg.response_field in first
    has_text = cfg.text_field in first
    fmt = cfg.format
    if fmt == "auto":
        fmt = "instruct" if has_instruct else "text" if has_text else ""
    if (fmt == "instruct" and not has_instruct) or (fmt == "text" and not has_text) or not fmt:
        raise DataError(
            f"the records have fields {sorted(first)}, none of which the data config names "
            f"(text_field={cfg.text_field!r}, prompt_field={cfg.prompt_field!r}, "
            f"response_field={cfg.response_field!r}, format={cfg.format!r})",
            hint="set data.text_field, or data.prompt_field and data.response_field, to the right names")
    return fmt


def _field(record: dict, name: str, index: int) -> str:
    value = record.get(name)
    if value is None:
        raise DataError(f"record {index} has no {name!r} field (fields: {sorted(record)})",
                        hint="every record needs the fields the first one has")
    return str(value)


def chat_pair(prompt: str, response: str, tokenizer: Any = None) -> tuple[str, str]:
    """(prompt text up to the assistant's turn, the assistant's turn) under the tokenizer's chat template,
    or lowres's default template when no tokenizer is given (e.g. to train a tokenizer on the texts)."""
    if tokenizer is None:
        from lowres.models.tokenizer import render_chat

        head = render_chat(prompt)
        return head, render_chat(prompt, response)[len(head):]
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if full.startswith(head):
        return head, full[len(head):]
    # Templates that render the generation prompt differently from a finished turn (rare): keep the
    # response whole and end it with EOS so the model still learns to stop.
    return head, response + (tokenizer.eos_token or "")


def render_texts(records: list[dict], cfg: Any, tokenizer: Any = None) -> list[str] | list[tuple[str, str]]:
    """Plain texts (format text) or (prompt, response) pairs (format instruct); an optional ``input`` field
    (Alpaca style) is appended to the prompt. In pairs, the prompt is masked out of the labels later."""
    fmt = detect_format(records, cfg)
    if fmt == "text":
        return [_field(r, cfg.text_field, i) for i, r in enumerate(records)]
    pairs = []
    for i, r in enumerate(records):
        prompt = _field(r, cfg.prompt_field, i)
        if r.get("input"):
            prompt = f"{prompt}\n\n{r['input']}"
        pairs.append(chat_pair(prompt, _field(r, cfg.response_field, i), tokenizer))
    return pairs
