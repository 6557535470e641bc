"""``train.attention=bmm``: causal attention as three batched GEMMs with the probabilities kept for backward —
what ``train.attention=auto`` picks for short bf16 sequences on a CPU, where it beats torch's flash kernel.

torch's CPU flash kernel walks the scores in blocks and recomputes them in backward; at a few hundred tokens
its blocks are small and its bf16 path slow. Here the scores of a whole sequence are one batched GEMM
(``baddbmm``: ``Q Kᵀ · scale + mask``), the softmax one vectorised kernel, the output one more GEMM, and
backward the textbook five (``dV = Pᵀ dO``, ``dP = dO Vᵀ``, ``dS = P ⊙ (dP − rowsum(dP ⊙ P))`` in torch's
softmax-backward kernel, ``dQ = dS K``, ``dK = dSᵀ Q``). It does the masked upper half too, and saves the
probabilities ``P`` — batch × heads × s² elements per layer in the compute dtype, which is why it is for short
sequences only (the advisor's trace counts them: it runs this Function on the meta device).

Grouped-query attention runs without repeating K and V: the ``heads / kv_heads`` query heads of a group are
stacked along the sequence axis, ``[b·kv, g·s, d]``, against their one ``[b·kv, s, d]`` key and value.

Numerics: in bf16 the scores are rounded to bf16 before the softmax (as transformers' eager attention rounds
them); torch's flash kernel keeps them in fp32. Against an fp32 reference on random inputs its relative error
was 1.2e-2 (gradients) where flash's was 0.8e-2; in fp32 both agree with the reference to 1e-6. The loss-curve
test checks a short run against sdpa.

Measured on the 2-core AMD EPYC with AVX512_BF16 (torch 2.13 CPU build, 2 threads; 9 query and 3 key/value
heads of 64, SmolLM2-135M's, forward + backward per layer): bf16 seq 256 × batch 2: 4–6 ms against flash's
9.7 ms; seq 512: 15.1 against 19.1 ms; seq 1024: 56 against 49 ms; seq 2048: 219 against 146 ms. fp32 seq 256 ×
batch 2: 8.1 against 8.4 ms (no gain: fp32 keeps flash and its smaller memory).

It handles what a causal decoder's training forward passes: no mask (causal), or transformers' boolean or
additive 4-D mask (padding). Anything else — dropout, a sliding window, soft-capping, attention sinks, a
query shorter than the keys (generation with a cache), returned attention weights — goes to transformers' own
SDPA forward, per call.
"""

from __future__ import annotations

import functools
from typing import Any

NAME = "lowres_bmm"
# auto picks bmm at or below this many tokens per sequence (bf16, CPU): the crossover measured above
BMM_MAX_SEQ = 512


def resolve_attention(attention: str, device: str, compute: str, seq_len: int) -> str:
    """``train.attention`` as it will run: ``auto`` → ``bmm`` on the CPU in bf16 for sequences of at most
    ``BMM_MAX_SEQ`` tokens, else ``sdpa``; anything else as given."""
    if attention != "auto":
        return attention
    return "bmm" if device == "cpu" and compute == "bf16" and 0 < seq_len <= BMM_MAX_SEQ else "sdpa"


_CAUSAL: dict = {}  # (s, g, dtype, device) → the additive causal mask baddbmm adds (never written to)


@functools.cache
def _function():
    """The autograd Function, built on first use (torch imported lazily)."""
    import torch

    class BmmAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, mask, scale):
            # q [b, h, s, d]; k, v [b, kv, s, d]; mask additive, broadcastable to [b·kv, g·s, s]
            b, h, s, d = q.shape
            kv = k.shape[1]
            q3 = q.reshape(b * kv, (h // kv) * s, d)
            k3, v3 = k.reshape(b * kv, s, d), v.reshape(b * kv, s, v.shape[-1])
            p = torch.softmax(torch.baddbmm(mask, q3, k3.transpose(1, 2), alpha=scale), dim=-1)
            out = torch.bmm(p, v3)
            ctx.save_for_backward(q3, k3, v3, p)
            ctx.scale, ctx.shapes = scale, (q.shape, k.shape, v.shape)
            return out.view(b, h, s, v.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            q3, k3, v3, p = ctx.saved_tensors
            qs, ks, vs = ctx.shapes
            g3 = grad.reshape(q3.shape[0], q3.shape[1], v3.shape[-1])
            dv = torch.bmm(p.transpose(1, 2), g3)
            ds = torch._softmax_backward_data(torch.bmm(g3, v3.transpose(1, 2)), p, -1, p.dtype)
            dq = torch.bmm(ds, k3).mul_(ctx.scale)
            dk = torch.bmm(ds.transpose(1, 2), q3).mul_(ctx.scale)
            return dq.view(qs), dk.view(ks), dv.view(vs), None, None

    return BmmAttention


def _additive_mask(attention_mask: Any, b: int, h: int, kv: int, s: int, dtype: Any, device: Any):
    """The mask as ``baddbmm`` adds it: [g·s, s] (causal, shared) or [b·kv, g·s, s] (per sequence). Masked
    entries get the dtype's lowest value, not -inf, so a row with nothing to attend to (a padding query) is
    uniform rather than NaN — as transformers' eager attention does."""
    import torch

    low = torch.finfo(dtype).min
    g = h // kv
    if attention_mask is None:  # the causal mask: built once per shape, dtype and device, then shared
        key = (s, g, dtype, str(device))
        mask = _CAUSAL.get(key)
        if mask is None:
            causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
            mask = torch.zeros(s, s, dtype=dtype, device=device).masked_fill_(~causal, low).repeat(g, 1)
            if len(_CAUSAL) >= 8:
                _CAUSAL.clear()
            _CAUSAL[key] = mask
        return mask
    m = attention_mask[..., :s, :s]
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill_(~m, low)
    else:
        m = m.to(dtype).clamp(min=low)
    # [b or 1, 1 or h, s, s] → [b·kv, g·s, s]
    m = m.expand(b, h, s, s).reshape(b, kv, g, s, s).reshape(b * kv, g * s, s)
    return m


def bmm_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                          dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Any, None]:
    """A transformers attention function (``AttentionInterface``): ``(output [b, s, h, d], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, s, d = query.shape
    kv = key.shape[1]
    plain = (dropout == 0.0 and not kwargs.get("sliding_window") and kwargs.get("softcap") is None
             and kwargs.get("s_aux") is None and kwargs.get("position_bias") is None
             and not kwargs.get("output_attentions") and key.shape[2] == s and h % kv == 0
             and getattr(module, "is_causal", True) and kwargs.get("is_causal", True) is not False
             and (attention_mask is None or attention_mask.dim() == 4) and query.dtype == key.dtype)
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else d ** -0.5
    mask = _additive_mask(attention_mask, b, h, kv, s, query.dtype, query.device)
    out = _function().apply(query, key, value, mask, float(scale))
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``lowres_bmm`` an attention implementation transformers knows (its masks: SDPA's); its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, bmm_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
