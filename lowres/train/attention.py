"""``train.attention=bmm``: causal attention as batched GEMMs with the probabilities kept for backward — what
``train.attention=auto`` picks for sequences of up to 512 tokens on a CPU (bf16 and fp32), where it beats
torch's flash kernel.

torch's CPU flash kernel walks the scores in blocks and recomputes them in backward; at a few hundred tokens
its blocks are small and its bf16 path slow. Here the scores of a whole sequence are one batched GEMM
(``baddbmm``: ``Q Kᵀ · scale + mask``), the softmax one vectorised kernel, the output one more GEMM, and
backward the textbook five (``dV = Pᵀ dO``, ``dP = dO Vᵀ``, ``dS = P ⊙ (dP − rowsum(dP ⊙ P))`` in torch's
softmax-backward kernel, ``dQ = dS K``, ``dK = dSᵀ Q``). It saves the probabilities ``P`` — up to batch ×
heads × s² elements per layer in the compute dtype, which is why it is for short sequences only (the
advisor's trace counts them: it runs these Functions on the meta device).

Block-causal: an unpadded causal sequence runs in ``causal_blocks`` query blocks, each against the keys up to
its own end only, so the masked upper part is neither computed nor kept ((n − 1)/(2n) of it for n blocks);
the rows are position-major (query i, head j → row i·g + j) so each block is a contiguous run of rows. fp32
runs blocks of 64 queries, bf16 of 256 (one block at 256 tokens: bf16's small GEMMs lose more than the
skipped half saves). A padding mask runs the whole matrix in one block — in fp32 that is no faster than
flash, so fp32 with a padding mask takes SDPA.

Grouped-query attention runs without repeating K and V: the ``heads / kv_heads`` query heads of a group are
stacked along the row axis against their one ``[b·kv, s, d]`` key and value.

Numerics: in bf16 the scores are rounded to bf16 before the softmax (as transformers' eager attention rounds
them); torch's flash kernel keeps them in fp32. Against an fp32 reference on random inputs its relative error
was 1.2e-2 (gradients) where flash's was 0.8e-2; in fp32 both agree with the reference to 1e-6. The loss-curve
test checks a short run against sdpa.

Measured on the 2-core AMD EPYC with AVX512_BF16 (torch 2.13 CPU build, 2 threads; 9 query and 3 key/value
heads of 64, SmolLM2-135M's, forward + backward per layer): bf16 seq 256 × batch 2: 3.8–6 ms against flash's
8.8–9.7 ms; seq 512: 6.5 (2 blocks) against 18 ms; fp32 seq 256 × 2: 6.2 ms (4 blocks) against 7.9 ms; seq 512:
11.1 (8 blocks) against 17.8 ms. At 1,024 tokens the saved probabilities grow to tens of MB per layer, hence
auto's 512 limit.

It handles what a causal decoder's training forward passes: no mask (causal), or transformers' boolean or
additive 4-D mask (padding). Anything else — dropout, a sliding window, soft-capping, attention sinks, a
query shorter than the keys (generation with a cache), returned attention weights — goes to transformers' own
SDPA forward, per call.
"""

from __future__ import annotations

from typing import Any

from lowres.train.lazy import built_once

NAME = "lowres_bmm"
# auto picks bmm at or below this many tokens per sequence (bf16, CPU): the crossover measured above
BMM_MAX_SEQ = 512


def resolve_attention(attention: str, device: str, compute: str, seq_len: int) -> str:
    """``train.attention`` as it will run: ``auto`` → ``bmm`` on the CPU in bf16 or fp32 for sequences of at
    most ``BMM_MAX_SEQ`` tokens, else ``sdpa``; anything else as given."""
    if attention != "auto":
        return attention
    return "bmm" if device == "cpu" and compute in ("bf16", "fp32") and 0 < seq_len <= BMM_MAX_SEQ else "sdpa"


def causal_blocks(seq_len: int, element_bytes: int) -> int:
    """How many query blocks bmm runs a causal (unpadded) sequence in: block j's queries attend to the keys
    of blocks 1…j only, so n blocks skip (n − 1)/(2n) of the score matrix's FLOPs and memory, at the price of
    n smaller GEMMs. Measured per layer on the 2-core AMD EPYC with AVX512_BF16 (9/3 heads of 64, forward +
    backward): fp32 is best with blocks of 64 queries (seq 256 × 2: 4 blocks 6.0 ms, 1 block 9.3, flash 8.1;
    seq 512: 8 blocks 14.0 ms, flash 17.5), bf16 with blocks of 256 (seq 256: 1 block 4.3 ms, 4 blocks 4.9;
    seq 512: 2 blocks 6.4 ms, 1 block 9.1, flash 16.8)."""
    return max(1, seq_len // (64 if element_bytes >= 4 else 256))


def block_bounds(seq_len: int, blocks: int) -> list[int]:
    """The end of each query block (``causal_blocks`` of them, as even as the length allows)."""
    return [round(seq_len * (j + 1) / blocks) for j in range(blocks)]


def probabilities_per_sequence(seq_len: int, element_bytes: int) -> int:
    """Score-matrix elements per head and sequence that bmm saves for a causal sequence: s² in one block,
    Σ (block rows × keys up to the block's end) in several."""
    lo, total = 0, 0
    for hi in block_bounds(seq_len, causal_blocks(seq_len, element_bytes)):
        total += (hi - lo) * hi
        lo = hi
    return total


_CAUSAL: dict = {}  # (s, g, dtype, device) → the additive causal mask baddbmm adds (never written to)
_BLOCK_MASKS: dict = {}  # (s, g, bounds, dtype, device) → each block's additive mask (never written to)


@built_once
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


def _block_masks(s: int, g: int, bounds: tuple[int, ...], dtype: Any, device: Any) -> list:
    """Per query block [lo, hi) in position-major rows (query i, head j → row i·g + j): the additive mask
    over keys [0, hi) — 0 where key ≤ query, the dtype's lowest value above the diagonal."""
    import torch

    compiling = torch.compiler.is_compiling()  # under torch.compile: built in the graph, not kept (a side effect)
    key = (s, g, bounds, dtype, str(device))
    masks = None if compiling else _BLOCK_MASKS.get(key)
    if masks is None:
        low = torch.finfo(dtype).min
        masks, lo = [], 0
        for hi in bounds:
            pos = torch.arange(lo, hi, device=device).repeat_interleave(g)
            keys = torch.arange(hi, device=device)
            masks.append(torch.zeros(len(pos), hi, dtype=dtype, device=device)
                         .masked_fill_(keys[None, :] > pos[:, None], low))
            lo = hi
        if compiling:
            return masks
        if len(_BLOCK_MASKS) >= 8:
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = masks
    return masks


@built_once
def _blocked_function():
    """The block-causal autograd Function, built on first use (torch imported lazily)."""
    import torch

    def rows_of(t, b, kv, s, g, d):  # [b, h, s, d] → [b·kv, s·g, d], position-major: one copy
        return t.transpose(1, 2).reshape(b, s, kv, g, d).permute(0, 2, 1, 3, 4).reshape(b * kv, s * g, d)

    def heads_of(t3, b, kv, s, g, d):  # the inverse: [b·kv, s·g, d] → [b, h, s, d] (a view of [b, s, h, d])
        return t3.view(b, kv, s, g, d).permute(0, 2, 1, 3, 4).reshape(b, s, kv * g, d).transpose(1, 2)

    class BlockedCausalAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, scale, bounds):
            b, h, s, d = q.shape
            kv = k.shape[1]
            g = h // kv
            q3 = rows_of(q, b, kv, s, g, d)
            k3, v3 = k.reshape(b * kv, s, d), v.reshape(b * kv, s, v.shape[-1])
            probs, outs, lo = [], [], 0
            for hi, mask in zip(bounds, _block_masks(s, g, bounds, q.dtype, q.device)):
                p = torch.softmax(torch.baddbmm(mask, q3[:, lo * g:hi * g], k3[:, :hi].transpose(1, 2),
                                                alpha=scale), dim=-1)
                outs.append(torch.bmm(p, v3[:, :hi]))
                probs.append(p)
                lo = hi
            ctx.save_for_backward(q3, k3, v3, *probs)
            ctx.scale, ctx.bounds, ctx.dims = scale, bounds, (b, kv, s, g, d, v.shape[-1])
            return heads_of(torch.cat(outs, dim=1), b, kv, s, g, v.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            q3, k3, v3, *probs = ctx.saved_tensors
            b, kv, s, g, d, dv_ = ctx.dims
            g3 = rows_of(grad, b, kv, s, g, dv_)
            dq3 = torch.empty_like(q3)
            dk3, dv3 = torch.zeros_like(k3), torch.zeros_like(v3)
            lo = 0
            for hi, p in zip(ctx.bounds, probs):
                rows = slice(lo * g, hi * g)
                gb = g3[:, rows]
                dv3[:, :hi].baddbmm_(p.transpose(1, 2), gb)
                ds = torch._softmax_backward_data(torch.bmm(gb, v3[:, :hi].transpose(1, 2)), p, -1, p.dtype)
                dq3[:, rows] = torch.bmm(ds, k3[:, :hi])
                dk3[:, :hi].baddbmm_(ds.transpose(1, 2), q3[:, rows])
                lo = hi
            dq3.mul_(ctx.scale)
            dk3.mul_(ctx.scale)
            return (heads_of(dq3, b, kv, s, g, d), dk3.view(b, kv, s, d), dv3.view(b, kv, s, dv_), None,
                    None)

    return BlockedCausalAttention


def causal_attention(q: Any, k: Any, v: Any, scale: float) -> Any:
    """Causal attention of unpadded sequences, ``[b, h, s, d]`` out (a view of ``[b, s, h, d]`` when blocked):
    bmm in ``causal_blocks`` query blocks — the full score matrix in one (``BmmAttention``), or the
    block-causal Function, which skips the blocks above the diagonal."""
    b, h, s, d = q.shape
    blocks = causal_blocks(s, q.element_size())
    if blocks <= 1:
        mask = _additive_mask(None, b, h, k.shape[1], s, q.dtype, q.device)
        return _function().apply(q, k, v, mask, float(scale))
    return _blocked_function().apply(q, k, v, float(scale), tuple(block_bounds(s, blocks)))


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
    # a padding mask runs the whole score matrix: in fp32 that is no faster than flash, which saves less
    if not plain or (attention_mask is not None and query.element_size() >= 4):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else d ** -0.5
    if attention_mask is None:
        out = causal_attention(query, key, value, scale)
    else:
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
