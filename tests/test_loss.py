"""The chunked LM head + cross-entropy equals the plain one and needs a fraction of its memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lowres.train.loss import IGNORE_INDEX, chunked_lm_loss, plain_lm_loss, shift_labels


def _inputs(tokens=37, hidden=16, vocab=101, dtype=torch.float64, train_weight=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, tokens, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype, requires_grad=train_weight)
    b = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=train_weight) if bias else None
    labels = torch.randint(0, vocab, (2, tokens), generator=g)
    labels[0, :5] = IGNORE_INDEX  # a masked prompt
    labels[1, 20:] = IGNORE_INDEX  # a whole chunk without targets
    return h, w, b, shift_labels(labels)


def _loss_and_grads(fn, h, w, b, y, **kw):
    loss = fn(h, w, y, b, **kw)
    loss.backward(torch.tensor(0.37, dtype=loss.dtype))  # a non-unit upstream gradient must be honoured
    grads = [t.grad.clone() if t is not None and t.grad is not None else None for t in (h, w, b)]
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    return loss.detach(), grads


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
@pytest.mark.parametrize("train_weight,bias", [(False, False), (True, True)])
def test_chunked_equals_plain(chunk, train_weight, bias):
    h, w, b, y = _inputs(train_weight=train_weight, bias=bias)
    ref, ref_grads = _loss_and_grads(plain_lm_loss, h, w, b, y)
    got, got_grads = _loss_and_grads(chunked_lm_loss, h, w, b, y, chunk_tokens=chunk)
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-6, atol=1e-8)
    for g, r in zip(got_grads, ref_grads):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-5)  # fp32 logits


@pytest.mark.parametrize("vocab_block", [1, 16, 33, 0, 10_000])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vocab_blocks_of_a_frozen_head_equal_plain(vocab_block, bias, dtype):
    """A frozen head (and bias) walks the vocabulary in blocks with an online softmax: the same loss and input
    gradient as the whole head, for blocks that divide the vocabulary or not, one column or all of it."""
    h, w, b, y = _inputs(dtype=dtype, bias=bias)
    ref, ref_grads = _loss_and_grads(plain_lm_loss, h, w, b, y)
    got, got_grads = _loss_and_grads(chunked_lm_loss, h, w, b, y, chunk_tokens=16, vocab_block=vocab_block)
    tol = 1e-5  # plain_lm_loss computes its logits in fp32, whatever the input dtype
    torch.testing.assert_close(got.double(), ref.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(got_grads[0].double(), ref_grads[0].double(), rtol=tol, atol=tol)
    assert got_grads[1] is None and got_grads[2] is None


def test_vocab_blocks_bf16_as_close_to_fp32_as_the_whole_vocabulary():
    """In bf16 the blocked head rounds its logits as the whole-vocabulary path does (the target logit read from
    them) and keeps its sums in fp32: the same loss, and an input gradient as close to an fp32 reference."""
    h, w, b, y = _inputs(tokens=64, hidden=32, vocab=500, dtype=torch.bfloat16)
    h32 = h.detach().float().requires_grad_()
    ref, (rh, _, _) = _loss_and_grads(plain_lm_loss, h32, w.float(), None, y)
    got = {block: _loss_and_grads(chunked_lm_loss, h, w, b, y, chunk_tokens=16, vocab_block=block)
           for block in (0, 64, 7)}
    for block, (loss, (gh, _, _)) in got.items():
        assert gh.dtype == torch.bfloat16
        torch.testing.assert_close(loss.float(), ref, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(loss, got[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gh.float(), got[0][1][0].float(), rtol=2e-2, atol=1e-2)
    err = {block: float((gh.float() - rh).abs().mean()) for block, (_, (gh, _, _)) in got.items()}
    assert err[64] <= err[0] * 1.5 and err[7] <= err[0] * 1.5


def test_chunked_bf16_close_to_plain():
    h, w, b, y = _inputs(tokens=64, hidden=32, vocab=500, dtype=torch.bfloat16)
    ref, (rh, _, _) = _loss_and_grads(plain_lm_loss, h, w, b, y)
    got, (gh, _, _) = _loss_and_grads(chunked_lm_loss, h, w, b, y, chunk_tokens=16)
    assert gh.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gh.float(), rh.float(), rtol=2e-2, atol=1e-2)  # bf16 matmul rounding


def test_no_targets_gives_zero_loss_and_grad():
    h, w, b, y = _inputs()
    y = torch.full_like(y, IGNORE_INDEX)
    loss = chunked_lm_loss(h, w, y, chunk_tokens=8)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum().item() == 0.0


_PEAK_SCRIPT = r"""
import json, sys, torch
from lowres.train.loss import chunked_lm_loss
torch.set_num_threads(1)
chunk = int(sys.argv[1])
T, H, V = 2048, 64, 32768           # 2048 tokens of a 32k vocabulary: fp32 logits are 256 MiB
g = torch.Generator().manual_seed(0)
h = torch.randn(T, H, generator=g, requires_grad=True)
w = torch.randn(V, H, generator=g) * 0.02
y = torch.randint(0, V, (T,), generator=g)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")   # the high-water mark restarts from the current RSS
base = rss()
loss = chunked_lm_loss(h, w, y, chunk_tokens=chunk)
loss.backward()
print(json.dumps({"peak": hwm() - base, "loss": loss.item()}))
"""


def _peak(chunk: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(chunk)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_chunked_peak_memory_is_a_fraction_of_plain():
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("this kernel does not let a process reset its RSS high-water mark")
    full, chunked = _peak(0), _peak(256)
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-4)
    # Full logits + their softmax/gradient buffers are ≥ 512 MiB; 256-token chunks hold ~32 MiB at a time.
    assert full["peak"] > 400 * 2**20, full
    assert chunked["peak"] < 0.6 * full["peak"], (chunked, full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exp_rows_in_cache_sized_blocks_equals_the_whole_at_once(dtype):
    """exp_rows' blocks (a row count that does not divide the rows, and one block of all) give the same bits,
    and the log-sum-exp torch computes; a bf16 chunk's exponentials are written back in bf16."""
    from lowres.train.loss import exp_rows

    torch.manual_seed(0)
    logits = (torch.randn(70, 1000) * 6).to(dtype)
    m1, s1, e1 = exp_rows(logits.clone(), rows=32)
    m2, s2, e2 = exp_rows(logits.clone(), rows=10**6)
    assert torch.equal(m1, m2) and torch.equal(s1, s2) and torch.equal(e1, e2)
    assert e1.dtype == dtype and m1.dtype == s1.dtype == torch.float32
    ref = torch.logsumexp(logits.float(), -1, keepdim=True)
    assert torch.allclose(m1 + s1.log(), ref, rtol=0, atol=1e-5)
    assert torch.allclose(e1.float(), torch.exp(logits.float() - m1).to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_vocab_blocked_eval_gives_the_loss_and_first_top1_of_the_whole_head(block):
    """Evaluation's blocked head (no gradient, top-1 index kept across blocks): the loss per row and the argmax
    of the whole logits, ties going to the first index as ``argmax`` does — here rows 0 and 40 of the head
    are equal, so every token whose best is row 0 ties with a later block."""
    from lowres.train.loss import vocab_blocked_loss

    g = torch.Generator().manual_seed(3)
    h = torch.randn(50, 16, generator=g)
    w = torch.randn(60, 16, generator=g)
    w[40] = w[0]
    w[0] *= 3.0  # row 0 wins for many tokens ...
    w[40] = w[0]  # ... and row 40 ties with it
    y = torch.randint(0, 60, (50,), generator=g)
    logits = h @ w.t()
    loss, grad, top = vocab_blocked_loss(h, y, w, None, block, grad=False, argmax=True)
    assert grad is None
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, reduction="none"), rtol=1e-5, atol=1e-5)
    assert torch.equal(top, logits.argmax(-1)) and bool((top == 0).any())
