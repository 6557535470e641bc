"""Model presets, precision decisions, locating weights, tokenizers, and LoRA/QLoRA loading of `tiny`."""

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from lowres.config import LoraConfig, ModelConfig, PrecisionConfig  # noqa: E402
from lowres.errors import ConfigError, ModelError, UnsupportedError, UsageError  # noqa: E402
from lowres.hardware import load_profile  # noqa: E402
from lowres.models import (  # noqa: E402
    ResolvedPrecision,
    check_max_length,
    list_presets,
    load_model,
    load_spec,
    load_tokenizer,
    locate_weights,
    resolve_precision,
    train_tokenizer,
)

PUBLISHED = {"SmolLM2-135M": 135e6, "SmolLM2-360M": 360e6, "Qwen2.5-0.5B": 494e6, "TinyLlama-1.1B": 1.1e9,
             "Llama-3.2-1B": 1.24e9}
TEXTS = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(200)]
FP32 = ResolvedPrecision(compute_dtype="fp32", weights_dtype="fp32")


@pytest.fixture(scope="module")
def no_bf16():
    return load_profile("laptop-8g-avx2")


@pytest.fixture(scope="module")
def with_bf16():
    return load_profile("laptop-16g-avx512bf16").model_copy(update={"bnb_backends": {"cpu": True, "cuda": False}})


def test_presets_exist():
    assert set(PUBLISHED) | {"tiny"} <= set(list_presets())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_param_count_matches_published_and_transformers(name):
    from transformers import AutoModelForCausalLM

    spec = load_spec(name)
    assert abs(spec.param_count() / PUBLISHED[name] - 1) < 0.02
    with torch.device("meta"):  # builds the real architecture without allocating its weights
        model = AutoModelForCausalLM.from_config(spec.to_hf_config())
    assert spec.param_count() == sum(p.numel() for p in model.parameters())
    assert spec.head_dim * spec.num_heads == spec.hidden_size


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ModelError, match="tiny"):
        load_spec("no-such-preset")


def test_tiny_random_init_forward_and_lora(capsys):
    loc = locate_weights(ModelConfig(name="tiny"))
    assert loc.kind == "random-init"
    assert "random weights" in capsys.readouterr().err
    model, info = load_model(loc, FP32, LoraConfig(rank=4, alpha=8, targets="attention", rslora=True))
    assert info["weights_source"] == "random-init"
    assert info["params_total"] > loc.spec.param_count()  # base plus adapters
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("mlp" in n for n in trainable)  # attention-only targets
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    ids = torch.randint(0, 4096, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, 4096)
    assert 7.0 < out.loss.item() < 10.0  # about ln(4096) = 8.3 for random weights


def test_random_init_is_seeded():
    loc = locate_weights(ModelConfig(name="tiny", weights="random-init"))
    a, _ = load_model(loc, FP32, LoraConfig(), seed=3)
    b, _ = load_model(loc, FP32, LoraConfig(), seed=3)
    wa = a.base_model.model.model.embed_tokens.weight
    assert torch.equal(wa, b.base_model.model.model.embed_tokens.weight)


@pytest.mark.parametrize("quant,layer_type", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_tiny_trains_only_lora(quant, layer_type, with_bf16):
    rp = resolve_precision(PrecisionConfig(compute="bf16", quant=quant), with_bf16)
    loc = locate_weights(ModelConfig(name="tiny", weights="random-init"))
    model, info = load_model(loc, rp, LoraConfig(rank=4), gradient_checkpointing=True)
    assert info["quant"] == quant
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(base).__name__ == layer_type
    ids = torch.randint(0, 4096, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_bf16_refused_without_fast_bf16(no_bf16):
    with pytest.raises(UnsupportedError, match="fp32") as exc:
        resolve_precision(PrecisionConfig(compute="bf16"), no_bf16)
    assert exc.value.exit_code == 2
    rp = resolve_precision(PrecisionConfig(compute="bf16"), no_bf16, allow_emulated_bf16=True)
    assert rp.compute_dtype == "bf16"


def test_auto_precision_follows_the_hardware(no_bf16, with_bf16):
    slow = resolve_precision(PrecisionConfig(), no_bf16)
    fast = resolve_precision(PrecisionConfig(), with_bf16)
    assert (slow.compute_dtype, fast.compute_dtype) == ("fp32", "bf16")
    assert any("no fast bf16" in r for r in slow.reasons)
    mixed = resolve_precision(PrecisionConfig(compute="bf16", weights="fp32"), with_bf16)
    assert mixed.autocast and mixed.weights_dtype == "fp32"
    with pytest.raises(UnsupportedError, match="weights"):
        resolve_precision(PrecisionConfig(compute="fp32", weights="bf16"), with_bf16)


def test_quant_refused_without_bnb_backend(with_bf16):
    hw = with_bf16.model_copy(update={"bnb_backends": {"cpu": False, "cuda": False}})
    with pytest.raises(UnsupportedError, match="quant=none"):
        resolve_precision(PrecisionConfig(quant="nf4"), hw)


def test_unknown_model_offline_says_what_was_tried():
    with pytest.raises(ModelError) as exc:
        locate_weights(ModelConfig(name="lowres-test/no-such-model"))
    msg = str(exc.value)
    assert "cache" in msg and "offline" in msg and "preset" in msg


def test_pretrained_required_but_missing():
    with pytest.raises(ModelError, match="not reachable"):
        locate_weights(ModelConfig(name="SmolLM2-135M", weights="pretrained"))


def test_sequence_length_over_model_maximum():
    check_max_length(load_spec("TinyLlama-1.1B"), 2048)
    with pytest.raises(ConfigError, match="data.max_length") as exc:
        check_max_length(load_spec("TinyLlama-1.1B"), 4096)
    assert isinstance(exc.value, UsageError)


def test_tokenizer_training_is_deterministic():
    a, b = train_tokenizer(TEXTS, 512), train_tokenizer(TEXTS, 512)
    assert a.get_vocab() == b.get_vocab()
    assert a(TEXTS[3])["input_ids"] == b(TEXTS[3])["input_ids"]
    assert a.decode(a(TEXTS[3])["input_ids"]) == TEXTS[3]
    assert {a.eos_token, a.pad_token, a.bos_token} == {"<|endoftext|>", "<|pad|>", "<|bos|>"}


def test_random_init_tokenizer_trained_on_texts():
    loc = locate_weights(ModelConfig(name="tiny", weights="random-init"))
    tok, source = load_tokenizer(loc, TEXTS, 600)
    assert source == "trained-on-data" and len(tok) <= 600
    with pytest.raises(ModelError, match="larger"):
        load_tokenizer(loc, TEXTS, 10_000)


def _save_tiny(folder):
    loc = locate_weights(ModelConfig(name="tiny", weights="random-init"))
    model = loc.spec.to_hf_config()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(model).save_pretrained(folder)
    train_tokenizer(TEXTS, 512).save_pretrained(folder)


def test_local_path_loads_pretrained(tmp_path):
    _save_tiny(tmp_path)
    loc = locate_weights(ModelConfig(name=str(tmp_path)))
    assert loc.kind == "local" and loc.spec.hidden_size == 256
    tok, source = load_tokenizer(loc, None)
    assert source == "pretrained" and tok.chat_template
    _, info = load_model(loc, FP32, LoraConfig())
    assert info["weights_source"] == "pretrained"


def test_hf_cache_is_found(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "models--lowres-test--tiny"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _save_tiny(snap)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    loc = locate_weights(ModelConfig(name="lowres-test/tiny"))
    assert loc.kind == "cache" and loc.hub_id == "lowres-test/tiny"
    assert json.loads((snap / "config.json").read_text())["hidden_size"] == loc.spec.hidden_size
