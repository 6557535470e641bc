"""train.attention=bmm (lowres.train.attention): the same attention as torch's SDPA, through transformers'
attention interface, with SDPA's own forward wherever it does not apply."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _llama(dtype, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads)
    return LlamaForCausalLM(cfg).to(dtype)


def _run(model, impl: str, ids, mask, weight):
    """Logits and the first layer's q_proj weight gradient of a loss over the positions ``weight`` keeps."""
    from lowres.train.speed import set_attention

    set_attention(model, impl)
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    (logits.float().pow(2) * weight).mean().backward()
    return logits.detach().float(), model.model.layers[0].self_attn.q_proj.weight.grad.float().clone()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left-padded"])
def test_bmm_equals_sdpa_in_fp32_and_is_as_close_as_flash_in_bf16(heads, kv_heads, padded):
    """fp32: logits and gradients equal SDPA's to float noise. bf16: both kernels against the fp32 result —
    bmm rounds its scores to bf16 (as transformers' eager attention does), flash keeps them in fp32; bmm's
    error stays within 3× flash's (measured ~1.5×), far below what a wrong mask or gradient gives (~0.4)."""
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = weight = None
    weight = torch.ones(2, 24, 1)
    if padded:  # the second sequence starts with 7 pads; the loss covers real tokens only
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[1, :7] = 0
        weight[1, :7] = 0
    keep = weight.squeeze(-1).bool()
    ref = _run(_llama(torch.float32, heads, kv_heads), "sdpa", ids, mask, weight)
    got = _run(_llama(torch.float32, heads, kv_heads), "bmm", ids, mask, weight)
    assert _rel(got[0][keep], ref[0][keep]) < 1e-5 and _rel(got[1], ref[1]) < 1e-5
    flash = _run(_llama(torch.bfloat16, heads, kv_heads), "sdpa", ids, mask, weight)
    bmm = _run(_llama(torch.bfloat16, heads, kv_heads), "bmm", ids, mask, weight)
    for i in range(2):
        sel = (lambda t: t[keep]) if i == 0 else (lambda t: t)
        assert _rel(sel(bmm[i]), sel(ref[i])) < 3 * _rel(sel(flash[i]), sel(ref[i])) + 1e-3


def test_a_wrong_mask_is_caught_by_the_comparison():
    """The comparison above can fail: attending to the future (no causal mask) moves the result by far more
    than its tolerance."""
    from lowres.train import attention as A

    q, k, v = (torch.randn(1, 4, 16, 8, dtype=torch.float64) for _ in range(3))
    ok = A._function().apply(q, k, v, A._additive_mask(None, 1, 4, 4, 16, q.dtype, "cpu"), 8 ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    wrong = A._function().apply(q, k, v, torch.zeros(16, 16, dtype=q.dtype), 8 ** -0.5)
    assert _rel(ok, ref) < 1e-12 and _rel(wrong, ref) > 0.1


def test_gradients_are_checked_numerically():
    """The hand-written backward against finite differences (float64; GQA with 2 query heads per kv head)."""
    from lowres.train import attention as A

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    mask = A._additive_mask(None, 1, 4, 2, 6, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda q, k, v: A._function().apply(q, k, v, mask, 0.5), (q, k, v))


def test_what_it_does_not_handle_goes_to_sdpa_and_generation_still_works():
    """Generation with a cache (a query shorter than its keys) and a sliding window take SDPA's own forward:
    greedy tokens equal SDPA's."""
    from lowres.train.attention import bmm_attention_forward

    model = _llama(torch.float32)
    model.eval()
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(2))
    out = {}
    for impl in ("sdpa", "bmm"):
        from lowres.train.speed import set_attention

        set_attention(model, impl)
        with torch.no_grad():
            out[impl] = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out["sdpa"], out["bmm"])
    attn = model.model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    windowed, _ = bmm_attention_forward(attn, q, k, v, None, sliding_window=4)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    expected, _ = sdpa_attention_forward(attn, q, k, v, None, sliding_window=4)
    assert torch.equal(windowed, expected)


def test_auto_picks_bmm_only_for_short_sequences_on_the_cpu():
    from lowres.train.attention import BMM_MAX_SEQ, resolve_attention

    assert resolve_attention("auto", "cpu", "bf16", 256) == "bmm"
    assert resolve_attention("auto", "cpu", "bf16", BMM_MAX_SEQ) == "bmm"
    assert resolve_attention("auto", "cpu", "bf16", BMM_MAX_SEQ + 1) == "sdpa"
    assert resolve_attention("auto", "cpu", "fp32", 256) == "bmm"
    assert resolve_attention("auto", "cpu", "fp32", BMM_MAX_SEQ + 1) == "sdpa"
    assert resolve_attention("auto", "cpu", "fp16", 256) == "sdpa"
    assert resolve_attention("auto", "cuda", "bf16", 256) == "sdpa"
    assert resolve_attention("eager", "cpu", "bf16", 256) == "eager"
    assert resolve_attention("bmm", "cpu", "fp32", 4096) == "bmm"


def _qkv(b, heads, kv_heads, s, d, dtype, seed=0):
    """q, k, v as transformers hands them over: [b, h, s, d] views of the projections' [b, s, h, d]."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, n, d, generator=g).to(dtype).transpose(1, 2).requires_grad_()
                 for n in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("s,blocks", [(128, 2), (100, 3), (64, 8)])
def test_block_causal_attention_equals_sdpa(heads, kv_heads, s, blocks):
    """The block-causal Function (queries in blocks, each against the keys up to its end): output and the
    gradients of q, k and v equal SDPA's causal attention in fp32 to float noise, in blocks that do and do
    not divide the length."""
    from lowres.train import attention as A

    q, k, v = _qkv(2, heads, kv_heads, s, 16, torch.float32)
    go = torch.randn(2, heads, s, 16, generator=torch.Generator().manual_seed(3))
    out = A._blocked_function().apply(q, k, v, 0.25, tuple(A.block_bounds(s, blocks)))
    out.backward(go)
    got = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25,
                                                           enable_gqa=heads != kv_heads)
    ref.backward(go)
    for a, b in zip(got, [ref.detach()] + [t.grad for t in (q, k, v)]):
        assert _rel(a, b) < 1e-5


def test_block_causal_attention_gradcheck_and_a_wrong_mask_control():
    """The blocked backward against finite differences (float64, GQA, 3 uneven blocks); and the comparison
    can fail: the blocks' masks zeroed (each block seeing its own future) moves the output far off."""
    from lowres.train import attention as A

    q, k, v = (t.detach().double().requires_grad_() for t in _qkv(1, 4, 2, 7, 3, torch.float64))
    bounds = tuple(A.block_bounds(7, 3))
    assert torch.autograd.gradcheck(lambda q, k, v: A._blocked_function().apply(q, k, v, 0.5, bounds), (q, k, v))
    with torch.no_grad():
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True)
        ok = A._blocked_function().apply(q, k, v, 0.5, bounds)
        masks = A._block_masks(7, 2, bounds, torch.float64, q.device)
        saved = [m.clone() for m in masks]
        try:
            for m in masks:
                m.zero_()
            wrong = A._blocked_function().apply(q, k, v, 0.5, bounds)
        finally:
            for m, m0 in zip(masks, saved):
                m.copy_(m0)
    assert _rel(ok, ref) < 1e-12 and _rel(wrong, ref) > 0.05


def test_a_model_trains_the_same_through_block_causal_attention():
    """A Llama at 130 tokens in fp32 (2 blocks of queries: auto's bmm splits fp32 sequences into blocks of
    64): logits and a weight gradient equal SDPA's; in bf16 (2 blocks at 512 tokens is too slow for a test:
    forced here at 130) as close as flash."""
    from lowres.train import attention as A

    assert A.causal_blocks(130, 4) == 2 and A.causal_blocks(512, 2) == 2 and A.causal_blocks(256, 2) == 1
    ids = torch.randint(0, 100, (2, 130), generator=torch.Generator().manual_seed(4))
    weight = torch.ones(2, 130, 1)
    ref = _run(_llama(torch.float32), "sdpa", ids, None, weight)
    got = _run(_llama(torch.float32), "bmm", ids, None, weight)
    assert _rel(got[0], ref[0]) < 1e-5 and _rel(got[1], ref[1]) < 1e-5
    original = A.causal_blocks
    try:
        A.causal_blocks = lambda s, e: 2  # bf16 through the blocked Function too
        bmm = _run(_llama(torch.bfloat16), "bmm", ids, None, weight)
    finally:
        A.causal_blocks = original
    flash = _run(_llama(torch.bfloat16), "sdpa", ids, None, weight)
    for i in range(2):
        assert _rel(bmm[i], ref[i]) < 3 * _rel(flash[i], ref[i]) + 1e-3


def test_the_advisor_counts_the_probabilities_bmm_saves():
    """Candidate(attention=auto) resolves as the recipe does; bmm's s² probabilities are in the activations
    (heads·s·e more per token and layer than SDPA's logsumexp, as the real model saves: test_estimate)."""
    from lowres.advisor.estimate import Candidate, estimate
    from lowres.hardware import load_profile
    from lowres.models import load_spec

    spec = load_spec("SmolLM2-135M")
    hw = load_profile("laptop-16g-avx512bf16")  # a saved profile: the same answer on any machine
    cand = dict(compute="bf16", batch_size=2, seq_len=256)
    auto = estimate(spec, hw, Candidate(**cand)).memory["activations"]
    sdpa = estimate(spec, hw, Candidate(**cand, attention="sdpa")).memory["activations"]
    probs = 2 * 256 * spec.num_layers * spec.num_heads * 256 * 2  # tokens × layers × heads·s × 2 B
    assert auto - sdpa == pytest.approx(probs, rel=0.15)
    # fp32 runs 256 tokens in 4 query blocks: it keeps 10/16 of the probabilities, 4 B each
    cand = dict(compute="fp32", batch_size=2, seq_len=256)
    auto = estimate(spec, hw, Candidate(**cand)).memory["activations"]
    sdpa = estimate(spec, hw, Candidate(**cand, attention="sdpa")).memory["activations"]
    probs = 2 * spec.num_layers * spec.num_heads * 256 * 256 * 10 / 16 * 4  # sequences × layers × heads × kept × 4 B
    assert auto - sdpa == pytest.approx(probs, rel=0.15)


@pytest.mark.parametrize("name", ["qwen2", "gemma3", "neox", "mistral", "phi"])
def test_every_family_trains_the_same_with_bmm_attention_and_fused_norms(name):
    """Across the families the advisor knows (GQA with biases, sliding windows and soft-capping, parallel
    attention, partial rotary): bmm attention — or SDPA's forward where bmm does not apply — and fused norms
    where they pass their check give the model's own logits and gradients (fp32)."""
    import copy

    from test_advisor_families import TINY, _real_model

    from lowres.train.norms import fuse_norms
    from lowres.train.speed import set_attention

    torch.manual_seed(0)
    model = _real_model(TINY[name], 3, torch.float32)
    model.config.use_cache = False
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))

    def run(m):
        m.zero_grad()
        out = m(input_ids=ids).logits
        out.pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    ref = run(model)
    ours = copy.deepcopy(model)
    set_attention(ours, "bmm")
    fuse_norms(ours)
    got = run(ours)
    assert _rel(got[0], ref[0]) < 1e-5
    assert len(got[1]) == len(ref[1]) and all(_rel(a, b) < 1e-4 for a, b in zip(got[1], ref[1]))
