"""Inference memory: what `lowres generate` / `lowres chat` need for a model, a weight format and a context.

Peak RSS while generating = runtime + weights (by format) + KV cache at the full context + the prefill's
transient working set (× the allocator factor, as in training). Each term is one function with its formula.
`lowres advise --mode infer` prints the breakdown; `lowres generate --json` prints the prediction beside the
peak it measured, and ``bench/pretrained_finetune.py`` reports their relative error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lowres.advisor.memory import (
    DTYPE_BYTES,
    RUNTIME_BASELINE_BYTES,
    allocator_factor,
    parameter_counts,
    weight_bytes,
)

GIB = 1024**3


def inference_weight_bytes(spec: Any, e: int, quant: str) -> float:
    """Frozen weights as generation holds them: block linears in their stored format (``quant``: none → e
    bytes each, int8 → 1 B + a scale per row, nf4 → ½ B + block constants; memory.quantized_linear_bytes),
    embeddings, a tied or untied head, norms and biases in the compute dtype — no peft k-bit preparation
    upcasts them to fp32 at inference."""
    parts = weight_bytes(spec, e, quant)
    counts = parameter_counts(spec)
    return float(parts["weights.linear"] + (counts["embeddings"] + counts["norms"]) * e)


def kv_cache_bytes(spec: Any, e: int, context: int, batch: int = 1) -> float:
    """Keys and values of every layer for ``context`` tokens: 2 · L · kv_heads · head_dim · context · batch · e
    (grouped-query attention stores kv_heads, not heads; Ainslie et al. 2023). transformers' DynamicCache
    keeps them in the compute dtype."""
    return float(2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * context * batch * e)


def prefill_transient_bytes(spec: Any, e: int, prompt_tokens: int, batch: int = 1) -> float:
    """Tensors alive at once in one decoder layer while the prompt is processed without gradients: the
    residual stream and its normed copy (2·h), q, k, v and the attention output (heads·d + 2·kv_heads·d +
    heads·d) and the gated MLP's gate, up and their product (3·i), per prompt token, in the compute dtype —
    plus the last position's fp32 logits over the vocabulary (generate keeps only the last token's logits)."""
    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    per_token = 2 * h + 2 * spec.num_heads * d + 2 * spec.num_kv_heads * d + 3 * i
    return float(per_token * prompt_tokens * batch * e + 4 * spec.vocab_size * batch)


@dataclass
class InferenceEstimate:
    """Predicted peak RSS of generation and its parts (bytes)."""

    model: str
    weights_dtype: str
    quant: str
    context: int
    prompt_tokens: int
    batch: int
    device: str
    breakdown: dict[str, float] = field(default_factory=dict)
    unmodelled: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return float(sum(self.breakdown.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "weights_dtype": self.weights_dtype, "quant": self.quant,
                "context": self.context, "prompt_tokens": self.prompt_tokens, "batch": self.batch,
                "device": self.device, "peak_bytes": self.peak_bytes, "breakdown": dict(self.breakdown),
                "unmodelled": list(self.unmodelled)}


def estimate_inference(spec: Any, *, compute: str = "fp32", quant: str = "none", context: int = 512,
                       prompt_tokens: int | None = None, batch: int = 1, device: str = "cpu") -> InferenceEstimate:
    """Peak memory of generating up to ``context`` tokens (prompt + new) from a ``prompt_tokens`` prompt
    (default: half the context) in ``compute`` with the block linears stored as ``quant``."""
    if compute not in DTYPE_BYTES:
        raise ValueError(f"unknown compute dtype {compute!r}; use one of {sorted(DTYPE_BYTES)}")
    e = DTYPE_BYTES[compute]
    prompt = context // 2 if prompt_tokens is None else min(prompt_tokens, context)
    transient = prefill_transient_bytes(spec, e, prompt, batch)
    breakdown = {
        "runtime": float(RUNTIME_BASELINE_BYTES[device]),
        "weights": inference_weight_bytes(spec, e, quant),
        "kv_cache": kv_cache_bytes(spec, e, context, batch),
        "transient": transient * allocator_factor(device, e),
    }
    unmodelled = []
    if getattr(spec, "sliding_window", None):
        unmodelled.append("sliding-window layers: their KV cache is counted at the full context (an upper bound)")
    return InferenceEstimate(getattr(spec, "name", "model"), compute, quant, context, prompt, batch, device,
                             breakdown, unmodelled)
