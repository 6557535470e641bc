"""train.fused_norm (lowres.train.norms): RMSNorm as one autograd Function, only where it reproduces the
family's own norm."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")


def _llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_fused_norms_give_the_models_outputs_and_gradients(dtype, tol):
    from lowres.train.norms import fuse_norms

    own = _llama(getattr(torch, dtype))
    fused = copy.deepcopy(own)
    assert fuse_norms(fused) == 2 * 2 + 1  # two per layer and the final one
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (own, fused):
        model.zero_grad()
        out = model(input_ids=ids).logits
        out.float().pow(2).mean().backward()
        grads.append((out.detach().float(), model.model.layers[0].self_attn.q_proj.weight.grad.float(),
                      model.model.layers[1].post_attention_layernorm.weight.grad.float()))
    for a, b in zip(*grads):
        assert float((a - b).norm()) <= tol * float(a.norm())


def test_norms_that_compute_something_else_keep_their_forward():
    """Gemma's norm scales by (1 + weight); a LayerNorm named like an RMSNorm subtracts the mean: the check
    catches both, and it can fail (it is not a name match)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from lowres.train.norms import eligible, fuse_norms

    class CenteredRMSNorm(torch.nn.Module):
        def __init__(self, h, eps=1e-6):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(h))
            self.variance_epsilon = eps

        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    assert eligible(LlamaRMSNorm(16)) and eligible(Qwen2RMSNorm(16))
    assert not eligible(Gemma3RMSNorm(16)) and not eligible(CenteredRMSNorm(16))
    model = torch.nn.Sequential(Gemma3RMSNorm(16), CenteredRMSNorm(16), LlamaRMSNorm(16))
    assert fuse_norms(model) == 1


def test_autocast_and_other_dtypes_take_the_modules_own_forward():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lowres.train.norms import fuse_norms

    norm = LlamaRMSNorm(16)
    fuse_norms(torch.nn.Sequential(norm))
    calls = []
    own = norm._lowres_own_forward
    norm._lowres_own_forward = lambda x: calls.append(x.dtype) or own(x)
    norm(torch.randn(2, 16))
    assert calls == []  # fp32: the Function
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm(torch.randn(2, 16))
    norm.half()(torch.randn(2, 16).half())
    assert calls == [torch.float32, torch.float16]
