"""lowres.models.loading.random_model: a random-init base built on the meta device, each tensor allocated and
initialized once — the distributions and buffers ``from_config`` gives, without its build-time transients."""

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lowres.models.loading import random_model  # noqa: E402

CONFIGS = {  # small published-shape families: tied and untied heads, GQA, sliding windows, partial rotary
    "llama-tied": dict(model_type="llama", hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=3000, sliding_window=16,
                   query_pre_attn_scalar=32, tie_word_embeddings=True,
                   layer_types=["sliding_attention", "full_attention"]),
    "neox-untied": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, vocab_size=1000, rotary_pct=0.25, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1200, tie_word_embeddings=True),
}


def _config(name):
    d = dict(CONFIGS[name])
    return AutoConfig.for_model(d.pop("model_type"), **d)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_distributions_buffers_and_ties_as_from_config(name):
    cfg = _config(name)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model = random_model(cfg, torch.float32, seed=0)
    assert type(model) is type(ref)
    ref_params = dict(ref.named_parameters())
    params = dict(model.named_parameters())
    assert params.keys() == ref_params.keys()
    for n, p in params.items():
        r = ref_params[n]
        assert p.shape == r.shape and p.dtype == r.dtype and bool(torch.isfinite(p).all()), n
        if r.numel() < 2 or float(r.std()) == 0.0:  # constants (norm weights, biases): exactly the same
            assert torch.equal(p, r), n
        else:  # random: the same distribution (these tensors hold ≥ 96 values)
            assert float(p.std()) == pytest.approx(float(r.std()), rel=0.25), n
            assert abs(float(p.mean()) - float(r.mean())) < 0.25 * float(r.std()) + 1e-6, n
            assert not torch.equal(p, torch.zeros_like(p)), n
    ref_buffers = dict(ref.named_buffers())
    for n, b in model.named_buffers():
        assert torch.equal(b, ref_buffers[n]), n  # rotary frequencies, embedding scales: recomputed
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head is emb) == bool(cfg.tie_word_embeddings)


def test_seeded_and_leaves_the_callers_rng_alone():
    cfg = _config("llama-tied")
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = random_model(cfg, torch.float32, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = random_model(cfg, torch.float32, seed=7)
    c = random_model(cfg, torch.float32, seed=8)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.get_input_embeddings().weight, c.get_input_embeddings().weight)


def test_a_family_whose_init_leaves_a_tensor_unset_is_built_by_from_config(monkeypatch):
    """The NaN check: an ``initialize_weights`` that skips a module (remote code may) must not leave NaN or
    uninitialized memory in the model — lowres falls back to ``from_config``, the same weights as it gives."""
    from transformers import PreTrainedModel

    real = PreTrainedModel.initialize_weights
    armed = [True]

    def skips_the_embedding(self):  # once, on real memory: the meta build's init, not from_config's own
        real(self)
        weight = self.get_input_embeddings().weight
        if armed[0] and weight.device.type == "cpu":
            armed[0] = False
            with torch.no_grad():
                weight.fill_(float("nan"))

    monkeypatch.setattr(PreTrainedModel, "initialize_weights", skips_the_embedding)
    cfg = _config("llama-tied")
    model = random_model(cfg, torch.float32, seed=5)
    torch.manual_seed(5)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    assert not armed[0]  # the check did run
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, r), n


_PEAK = r"""
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from lowres.models.loading import random_model
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
cfg = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=256, num_hidden_layers=1,
                           num_attention_heads=8, num_key_value_heads=8, vocab_size=262144, tie_word_embeddings=True)
with torch.device("meta"):
    AutoModelForCausalLM.from_config(cfg)  # model code imported before the baseline
start = hwm()
if sys.argv[1] == "lowres":
    model = random_model(cfg, torch.bfloat16, seed=0)
else:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
resident = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"rise": hwm() - start, "resident": resident}))
"""


@pytest.mark.slow
def test_build_peak_holds_the_weights_once():
    """A tied 262k × 512 bf16 head (256 MiB): from_config's build peaks about one head above the weights it
    keeps (the lm_head weight it initializes before tying drops it); lowres' build holds the weights once.
    VmHWM of fresh child processes: memory, not time."""
    def run(which):
        out = subprocess.run([sys.executable, "-c", _PEAK, which], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    head = 262144 * 512 * 2
    ours, theirs = run("lowres"), run("from_config")
    assert ours["resident"] == theirs["resident"]
    assert theirs["rise"] > ours["resident"] + 0.7 * head  # the transient this build avoids is real here
    assert ours["rise"] < ours["resident"] + 0.25 * head
