"""Memory-lean LM head + cross-entropy: the full fp32 logits never exist at once.

For a small model with a big vocabulary the logits are the largest tensor of a step: 4·V bytes per token in
fp32 (0.2 MB for V = 49 152), plus as much again for their gradient, plus softmax buffers, about 0.75 MB per
token in all. ``chunked_lm_loss`` walks the tokens in chunks of ``chunk_tokens``: per chunk it computes the
logits, the loss and, at once, the chunk's gradients with respect to the hidden states (and the head weight,
when it trains), then drops the logits. Backward only scales the stored gradients by the incoming one: no
recompute, the same FLOPs as the plain head (2·T·h·V forward, 2·T·h·V for the input gradient). The extra
memory is one T×h gradient buffer, about h/V of what the logits took. This is the "fused linear
cross-entropy" of Liger-Kernel (Hsu et al. 2024), written in plain torch.

The loss is the *sum* over label tokens (ignore index -100): the caller divides by the number of label
tokens in the whole optimizer step, so gradient accumulation weights every token equally, as one big batch
would (HF's ``num_items_in_batch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# rows of [rows × vocab] per block of the softmax's element-wise passes on the CPU: 32 × 49,152 fp32 is 6 MB,
# which stays in cache through its five passes where the whole chunk (100 MB at 512 tokens) streams through
# memory five times. Measured on the 2-core AMD EPYC with AVX512_BF16, 512 × 49,152: fp32 30 → 25 ms, bf16
# (the fp32 copy, max, exp, sum and the bf16 write-back) 76 → 35 ms, bit-identical results.
SOFTMAX_ROWS = 32
# vocabulary columns per block of the CPU head when only the input's gradient is wanted (a frozen head):
# [tokens × 2048] logits stay in cache between their GEMM, the softmax passes and the GEMM back. Measured on
# the Intel Xeon with AMX (session 14), 512 tokens × 49,152 × 576, forward + input gradient: bf16 67 → 54 ms
# (1,024: 58; 3,072: 73; 4,096: 75), fp32 213 → 217 ms (+2 %; the chunk's fp32 logits gone).
VOCAB_BLOCK = 2048


def exp_rows(logits: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, s, e) per row of ``logits`` [n × V]: ``m = max``, ``e = exp(x − m)`` (written over ``logits``, in its
    dtype) and ``s = Σ e`` — all computed in fp32, in blocks of ``rows`` rows on the CPU (one block elsewhere).
    A bf16 block goes through one fp32 scratch block: no fp32 copy of the whole chunk."""
    n, v = logits.shape
    rows = n if logits.device.type != "cpu" else max(1, rows or SOFTMAX_ROWS)
    m = torch.empty((n, 1), dtype=torch.float32, device=logits.device)
    s = torch.empty((n, 1), dtype=torch.float32, device=logits.device)
    scratch = None if logits.dtype == torch.float32 else torch.empty((min(rows, n), v), dtype=torch.float32,
                                                                     device=logits.device)
    for a in range(0, n, rows):
        block = logits[a:a + rows]
        k = block.shape[0]
        work = block if scratch is None else scratch[:k].copy_(block)
        torch.amax(work, -1, keepdim=True, out=m[a:a + k])
        work.sub_(m[a:a + k]).exp_()
        torch.sum(work, -1, keepdim=True, out=s[a:a + k])
        if scratch is not None:
            block.copy_(work)
    return m, s, logits


def vocab_blocked_loss(hc: torch.Tensor, yc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       block: int, onednn: bool = False, grad: bool = True,
                       argmax: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(cross-entropy per row, its gradient with respect to ``hc`` if ``grad``, each row's top-1 vocabulary
    index if ``argmax`` — the first of equal maxima, as ``argmax`` gives) of ``hc @ weight.T (+ bias)`` against
    ``yc`` (clamped: no ignore index here), walking the vocabulary in blocks of ``block`` columns with an
    online softmax — the flash-attention recurrence with the head weight as both keys and values. Per block:
    ``l = hc W_bᵀ``, the running max ``m`` and sum ``s`` of ``exp(l − m)`` rescaled as ``m`` grows, and the
    running ``G = Σ exp(l − m) W_b``; at the end ``loss = m + log s − l_y`` and ``grad = G / s − W[y]``.
    No [tokens × vocab] tensor exists, no FLOP is added (2·T·h·V each way, as the whole head), and the block's
    logits are still in cache when the second GEMM reads them. Accumulators are fp32 (fp64 for fp64 inputs);
    the target logit ``l_y`` is read from its block's logits, so it is rounded as the log-sum-exp's terms are."""
    acc = torch.promote_types(hc.dtype, torch.float32)
    n, v = hc.shape[0], weight.shape[0]
    target = torch.zeros((n, 1), dtype=acc, device=hc.device)
    m = torch.full((n, 1), float("-inf"), dtype=acc, device=hc.device)
    s = torch.zeros((n, 1), dtype=acc, device=hc.device)
    g = torch.zeros((n, hc.shape[1]), dtype=acc, device=hc.device) if grad else None
    top = torch.zeros((n, 1), dtype=torch.long, device=hc.device) if argmax else None
    scratch = None if hc.dtype == acc else torch.empty((n, min(block, v)), dtype=acc, device=hc.device)
    for a in range(0, v, block):
        wb = weight[a:a + block]
        bb = None if bias is None else bias[a:a + block]
        logits = onednn_linear(hc, wb, bb) if onednn else F.linear(hc, wb, bb)
        local = yc - a
        inside = (local >= 0) & (local < logits.shape[1])
        picked = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None])
        target += torch.where(inside[:, None], picked, 0).to(acc)
        work = logits if scratch is None else scratch[:, :logits.shape[1]].copy_(logits)
        if argmax:
            best, where = work.max(-1, keepdim=True)
            top = torch.where(best > m, where + a, top)  # strictly greater: an earlier block keeps a tie
            m_new = torch.maximum(m, best)
        else:
            m_new = torch.maximum(m, work.amax(-1, keepdim=True))
        rescale = (m - m_new).exp_()  # exp(−inf) = 0 at the first block
        work.sub_(m_new).exp_()
        s.mul_(rescale).add_(work.sum(-1, keepdim=True))
        if grad:
            e = work if scratch is None else logits.copy_(work)  # exp ≤ 1: safe in bf16
            ew = onednn_linear(e, wb.t()) if onednn else e @ wb
            g.mul_(rescale).add_(ew)
            del e, ew
        m = m_new
        del logits
    loss = (m + s.log() - target).squeeze(1)
    return (loss, g.div_(s).sub_(weight[yc].to(acc)) if grad else None,
            top.squeeze(1) if argmax else None)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels for next-token prediction: position t predicts token t+1; the last position has no target."""
    pad = torch.full_like(labels[..., :1], IGNORE_INDEX)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` through oneDNN's JIT GEMM (``train.gemm=onednn``, lowres.train.speed)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def plain_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: full logits in fp32, then summed cross-entropy. ``labels`` are already shifted."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes loss and gradients chunk by chunk; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, gemm="torch", vocab_block=VOCAB_BLOCK):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        want_w = weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(h2) if hidden.requires_grad else None
        # Weight gradients accumulate in fp32: many chunks add up, and bf16 sums lose bits.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        onednn = (gemm == "onednn" and not want_w and not want_b and weight.dtype == torch.float32
                  and weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu"))
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, h2.shape[0], chunk_tokens):
            hc, yc = h2[start:start + chunk_tokens].to(weight.dtype), y[start:start + chunk_tokens]
            keep = yc != IGNORE_INDEX
            if not bool(keep.any()):
                continue  # no targets here: zero loss, zero gradient
            if grad_w is None and grad_b is None and vocab_block > 0 and hc.device.type == "cpu":
                # a frozen head (LoRA's case): the vocabulary in cache-sized blocks, online softmax
                rows, gh, _ = vocab_blocked_loss(hc, yc.clamp_min(0), weight, bias, vocab_block, onednn)
                total += (rows * keep).sum().to(total.dtype)
                if grad_h is not None:
                    if not bool(keep.all()):
                        gh[~keep] = 0.0
                    grad_h[start:start + chunk_tokens] = gh.to(grad_h.dtype)
                continue
            logits = onednn_linear(hc, weight, bias) if onednn else F.linear(hc, weight, bias)
            safe_y = yc.clamp_min(0)
            target = logits.gather(1, safe_y[:, None]).float()
            input_only = grad_w is None and grad_b is None
            if not input_only:
                logits = logits.float()  # a trainable head or bias: its gradients want the fp32 softmax
            # log-sum-exp in place in the logits buffer, block by block (exp_rows): m = max, e = exp(x − m),
            # s = Σe, loss = m + log s − x_target
            m, s, e = exp_rows(logits)
            total += ((m + s.log() - target).squeeze(1) * keep).sum()
            # d(sum CE)/d logits = softmax − onehot on kept rows, 0 on ignored ones
            inv = s.reciprocal_()
            if input_only:
                # only the input's gradient: (softmax − onehot) W = (1/s)·(e W) − W[y], per kept row. The
                # softmax is never formed (no scaling or scatter pass over [tokens × vocab]); the onehot term
                # is subtracted in fp32 at [tokens × hidden]
                if grad_h is not None:
                    e_c = e if e.dtype == hc.dtype else e.to(hc.dtype)
                    ew = onednn_linear(e_c, weight.t()) if onednn else e_c @ weight
                    gh = ew.float().mul_(inv).sub_(weight[safe_y].float())
                    if not bool(keep.all()):
                        gh[~keep] = 0.0
                    grad_h[start:start + chunk_tokens] = gh.to(grad_h.dtype)
                    del e_c, ew, gh
                del logits, e
                continue
            probs = e.mul_(inv)
            rows = torch.arange(probs.shape[0], device=probs.device)
            probs[rows, safe_y] -= 1.0
            if not bool(keep.all()):
                probs[~keep] = 0.0
            g = probs.to(hc.dtype)
            if grad_h is not None:
                gh = onednn_linear(g, weight.t()) if onednn else g @ weight
                grad_h[start:start + chunk_tokens] = gh.to(grad_h.dtype)
            if grad_w is not None:
                grad_w.addmm_(probs.t(), hc.float())
            if grad_b is not None:
                grad_b += probs.sum(0)
            del logits, probs, g
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.shape = hidden.shape
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = None if grad_h is None else (grad_h * grad_out.to(grad_h.dtype)).reshape(ctx.shape)
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.dtypes[0])
        gb = None if grad_b is None else (grad_b * grad_out).to(ctx.dtypes[1])
        return gh, gw, gb, None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    bias: torch.Tensor | None = None, chunk_tokens: int = 1024, gemm: str = "torch",
                    vocab_block: int = VOCAB_BLOCK) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against shifted ``labels``, in token chunks.

    ``hidden`` [..., h] in the compute dtype, ``weight`` [V, h], ``labels`` [...] with -100 for no target.
    ``chunk_tokens <= 0`` falls back to the plain head (full logits). On the CPU, with a frozen head and bias,
    each chunk walks the vocabulary in blocks of ``vocab_block`` columns (``vocab_blocked_loss``; 0 = the whole
    vocabulary at once). The result equals ``plain_lm_loss`` and so do its gradients, up to float rounding.
    """
    if chunk_tokens <= 0:
        return plain_lm_loss(hidden, weight, labels, bias)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, int(chunk_tokens), gemm, int(vocab_block))


def _head_and_decoder(model):
    """The decoder stack and a plain output head of a (peft-wrapped) causal LM, or None for the head when
    it is anything but an ``nn.Linear`` (a LoRA-wrapped or quantized head): then the model's own forward
    computes the logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or type(head) is not torch.nn.Linear:
        return None, None
    return decoder, head


def causal_lm_loss(model, batch: dict, chunk_tokens: int, gemm: str = "torch") -> tuple[torch.Tensor, int]:
    """(summed next-token loss, number of label tokens) of one batch through a causal LM.

    The decoder runs as usual; the LM head and cross-entropy run through ``chunked_lm_loss`` so the
    logits of the whole batch never exist at once. Labels are unshifted (HF convention); shifted here.
    """
    labels = shift_labels(batch["labels"])
    n_tokens = int((labels != IGNORE_INDEX).sum())
    decoder, head = _head_and_decoder(model)
    if decoder is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, n_tokens
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).last_hidden_state
    return chunked_lm_loss(hidden, head.weight, labels, head.bias, chunk_tokens, gemm), n_tokens


@torch.no_grad()
def causal_lm_loss_and_correct(model, batch: dict, chunk_tokens: int,
                               vocab_block: int = VOCAB_BLOCK) -> tuple[float, int, int]:
    """(summed next-token loss, label tokens, label tokens whose top-1 prediction is right) of one batch.

    Token accuracy is top-1 next-token accuracy on the targets that count (labels ≠ -100: no padding, no
    masked prompt). For evaluation only (no gradients); like ``causal_lm_loss`` the head runs chunk by chunk,
    so the whole batch's logits never exist at once — on the CPU each chunk also walks the vocabulary in blocks
    (``vocab_blocked_loss``), so an eval chunk's logits do not set the run's peak either."""
    labels = shift_labels(batch["labels"])
    y = labels.reshape(-1)
    keep = y != IGNORE_INDEX
    n_tokens = int(keep.sum())
    decoder, head = _head_and_decoder(model)
    if decoder is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        logits = logits.float().reshape(-1, logits.shape[-1])
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
        return float(loss), n_tokens, int(((logits.argmax(-1) == y) & keep).sum())
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).last_hidden_state
    h2 = hidden.reshape(-1, hidden.shape[-1])
    step = chunk_tokens if chunk_tokens > 0 else h2.shape[0]
    total, correct = 0.0, 0
    for start in range(0, h2.shape[0], step):
        yc, kc = y[start:start + step], keep[start:start + step]
        if not bool(kc.any()):
            continue
        hc = h2[start:start + step].to(head.weight.dtype)
        if vocab_block > 0 and hc.device.type == "cpu":
            rows, _, top = vocab_blocked_loss(hc, yc.clamp_min(0), head.weight, head.bias, vocab_block,
                                              grad=False, argmax=True)
            total += float((rows * kc).sum())
            correct += int(((top == yc) & kc).sum())
            continue
        logits = F.linear(hc, head.weight, head.bias).float()
        total += float(F.cross_entropy(logits, yc, ignore_index=IGNORE_INDEX, reduction="sum"))
        correct += int(((logits.argmax(-1) == yc) & kc).sum())
    return total, n_tokens, correct
