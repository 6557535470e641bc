"""The estimator: its memory terms, their order across formats, what each knob changes, unknowns, the CLI."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from lowres.advisor import memory as M
from lowres.advisor.estimate import Calibration, Candidate, estimate, largest_fitting_batch, resolve_compute
from lowres.hardware import Roofline, load_profile
from lowres.models import load_spec


@pytest.fixture(scope="module")
def spec():
    return load_spec("SmolLM2-135M")


@pytest.fixture(scope="module")
def laptop():
    return load_profile("laptop-8g-avx2")


@pytest.fixture(scope="module")
def a100():
    return load_profile("a100-80g")


def _weights(est):
    return sum(v for k, v in est.memory.items() if k.startswith("weights."))


def test_breakdown_sums_to_peak_and_calibration_scales_it(spec, laptop):
    est = estimate(spec, laptop, Candidate())
    assert est.peak_bytes == pytest.approx(sum(est.memory.values()), rel=1e-12)
    assert all(v >= 0 for v in est.memory.values())
    cal = estimate(spec, laptop, Candidate(), calibration=Calibration(memory_factor=1.3))
    assert cal.peak_bytes == pytest.approx(1.3 * est.peak_bytes, rel=1e-9)
    assert cal.peak_bytes == pytest.approx(sum(cal.memory.values()), rel=1e-12)


def test_parameter_count_matches_the_preset(spec):
    assert sum(M.parameter_counts(spec).values()) == pytest.approx(spec.param_count(), rel=0.005)


def test_fp32_weights_are_four_bytes_per_parameter(spec, laptop):
    est = estimate(spec, laptop, Candidate(compute="fp32"))
    assert _weights(est) == pytest.approx(4 * spec.param_count(), rel=0.01)
    assert 120e6 < spec.param_count() < 150e6


def test_weight_bytes_order_nf4_int8_bf16_fp32(spec, laptop):
    by = {(c, q): estimate(spec, laptop, Candidate(compute=c, quant=q)) for c, q in
          [("fp32", "none"), ("bf16", "none"), ("bf16", "int8"), ("bf16", "nf4")]}
    linear = [by[k].memory["weights.linear"] for k in [("bf16", "nf4"), ("bf16", "int8"), ("bf16", "none"),
                                                       ("fp32", "none")]]
    assert linear == sorted(linear) and len(set(linear)) == 4
    total = [_weights(by[k]) for k in [("bf16", "nf4"), ("bf16", "int8"), ("bf16", "none"), ("fp32", "none")]]
    assert total == sorted(total) and len(set(total)) == 4
    # NF4 with double quantization: 4 bits + 0.127 bits of constants per weight (QLoRA §3)
    n = M.parameter_counts(spec)["linear"]
    assert by[("bf16", "nf4")].memory["weights.linear"] / n == pytest.approx(0.5 + 0.127 / 8, rel=0.01)
    # embeddings and lm_head are never quantized, and peft's prepare_model_for_kbit_training upcasts them
    # (and the norms) to fp32 on a quantized base, whatever the compute dtype
    assert by[("bf16", "nf4")].memory["weights.embeddings"] == by[("fp32", "none")].memory["weights.embeddings"]
    assert by[("bf16", "nf4")].memory["weights.norms"] == by[("fp32", "none")].memory["weights.norms"]


def test_gradient_checkpointing_lowers_activations(spec, laptop):
    off = estimate(spec, laptop, Candidate(batch_size=4, seq_len=512))
    on = estimate(spec, laptop, Candidate(batch_size=4, seq_len=512, gradient_checkpointing=True))
    assert on.memory["activations"] < off.memory["activations"] / 3
    assert on.flops_per_step > off.flops_per_step  # the recompute costs a forward


def test_chunked_loss_lowers_the_logits_term(spec, laptop, a100):
    from lowres.train.loss import VOCAB_BLOCK

    whole = estimate(spec, laptop, Candidate(batch_size=8, seq_len=512, loss_chunk_tokens=0))
    chunked = estimate(spec, laptop, Candidate(batch_size=8, seq_len=512, loss_chunk_tokens=1024))
    tokens = 8 * 512
    # plain head: log-softmax output, its gradient and the logits' gradient, fp32 each
    assert whole.memory["logits"] == pytest.approx(tokens * spec.vocab_size * 12)
    # chunked on a CPU: one vocabulary block of one chunk's fp32 logits, the chunk's fp32 running sums, and
    # the hidden-state gradient of every token
    assert chunked.memory["logits"] == pytest.approx(1024 * VOCAB_BLOCK * 4 + 3 * 1024 * spec.hidden_size * 4
                                                     + tokens * spec.hidden_size * 4)
    assert chunked.memory["logits"] < whole.memory["logits"] / 10
    assert chunked.peak_bytes < whole.peak_bytes
    # on a GPU a chunk's logits span the whole vocabulary (bf16 there: A100)
    gpu = estimate(spec, a100, Candidate(batch_size=8, seq_len=512, loss_chunk_tokens=1024))
    assert gpu.memory["logits"] == pytest.approx(1024 * spec.vocab_size * 2 + 1024 * spec.vocab_size * 4
                                                 + tokens * spec.hidden_size * 2)


def test_laptop_and_a100_advice_differ_on_the_numbers(spec, laptop, a100):
    big = Candidate(compute="fp32", batch_size=16, seq_len=512)
    assert estimate(spec, a100, big).fits is True
    assert estimate(spec, laptop, big).fits is False
    on_laptop = largest_fitting_batch(spec, laptop, Candidate(compute="fp32"))
    on_a100 = largest_fitting_batch(spec, a100, Candidate(compute="fp32"))
    assert 1 <= on_laptop < on_a100 / 10
    assert estimate(spec, laptop, Candidate(compute="fp32", batch_size=on_laptop)).fits
    assert not estimate(spec, laptop, Candidate(compute="fp32", batch_size=on_laptop + 1)).fits
    assert resolve_compute(laptop, "auto") == "fp32" and resolve_compute(a100, "auto") == "bf16"
    assert estimate(spec, laptop, Candidate()).estimate_only


def test_unknown_roofline_gives_unknown_step_time(spec, laptop):
    assert laptop.roofline is None
    est = estimate(spec, laptop, Candidate())
    assert est.step_time_s is None and est.tokens_per_s is None
    assert est.to_dict()["step_time_s"] is None
    measured = Roofline(fp32_flops=1e11, source="measured")
    known = estimate(spec, laptop, Candidate(compute="fp32"), roofline=measured)
    # GEMM FLOPs at the roofline's peak, times the CPU's measured non-GEMM share (lowres.advisor.compute)
    assert known.step_time_s == pytest.approx(known.flops_per_step / 1e11 * 1.5)
    slower = estimate(spec, laptop, Candidate(compute="fp32"), roofline=measured,
                      calibration=Calibration(time_factor=2.0))
    assert slower.step_time_s == pytest.approx(2 * known.step_time_s)
    # 4-bit needs the bandwidth too (dequantisation traffic): unknown without it, slower with it
    assert estimate(spec, laptop, Candidate(compute="fp32", quant="nf4"), roofline=measured).step_time_s is None
    full = Roofline(fp32_flops=1e11, mem_bandwidth_bytes_s=2e10, source="measured")
    assert (estimate(spec, laptop, Candidate(compute="fp32", quant="nf4"), roofline=full).step_time_s
            > estimate(spec, laptop, Candidate(compute="fp32"), roofline=full).step_time_s)


def test_bf16_is_flagged_only_where_it_is_emulated(spec, laptop):
    assert estimate(spec, laptop, Candidate(compute="bf16")).slow_precision
    assert not estimate(spec, laptop, Candidate(compute="fp32")).slow_precision
    assert not estimate(spec, load_profile("laptop-16g-avx512bf16"), Candidate(compute="bf16")).slow_precision


@pytest.mark.parametrize("fused,attention,norm", [(True, "sdpa", True), (False, "sdpa", False), (True, "bmm", True),
                                                  (True, "sdpa", False)],
                         ids=["fused", "peft", "fused-bmm", "fused_lora-own_norm"])
@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_activation_formula_matches_what_autograd_saves(compute, fused, attention, norm):
    """Count the bytes autograd saves in a tiny random Llama with LoRA (parameters excluded), for 2 and 3
    layers, its LoRA linears as the recipe runs them (train.fused_lora) or peft's own, its attention SDPA or
    lowres' bmm kernel; the difference per token is one layer's activations, which the formula must give."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    b, s = 2, 16

    def saved_per_token(layers: int) -> float:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
        base = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        if attention != "sdpa":
            from lowres.train.speed import set_attention

            set_attention(base, attention)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=targets))
        if fused:
            from lowres.train.speed import fuse_lora

            assert fuse_lora(model) == 7 * layers
        if norm:
            from lowres.train.norms import fuse_norms

            assert fuse_norms(model) == 2 * layers + 1
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(0, 128, (b, s)), labels=torch.randint(0, 128, (b, s)))
        return sum(seen.values()) / (b * s)

    from types import SimpleNamespace
    shape = SimpleNamespace(hidden_size=64, intermediate_size=160, num_heads=4, num_kv_heads=2, head_dim=16)
    predicted = M.activation_bytes_per_token_per_layer(shape, M.DTYPE_BYTES[compute], 4, M.PROJECTIONS, fused,
                                                       attention, s, norm)
    assert saved_per_token(3) - saved_per_token(2) == pytest.approx(predicted, rel=0.02)


def _app() -> typer.Typer:
    from lowres.cli.advise import advise

    app = typer.Typer()
    app.command()(advise)
    app.command("noop")(lambda: None)  # two commands, so typer keeps `advise` as a subcommand name
    return app


def test_cli_advise_on_a_saved_profile():
    result = CliRunner().invoke(_app(), ["advise", "--model", "SmolLM2-135M", "--hardware", "laptop-8g-avx2"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "estimate only" in result.output
    assert "step time: unknown" in result.output
    assert "logits" in result.output and "largest batch" in result.output


def test_cli_advise_json_and_this_machine():
    result = CliRunner().invoke(_app(), ["advise", "--json", "--rank", "16", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["hardware"]["estimate_only"] is False
    assert doc["estimate"]["candidate"]["lora_rank"] == 16
    assert doc["estimate"]["peak_bytes"] == pytest.approx(sum(doc["estimate"]["memory_bytes"].values()), abs=20)
    assert len(doc["grid"]) >= 6


def test_cli_advise_rejects_a_bad_quantization():
    from lowres.errors import UsageError

    result = CliRunner().invoke(_app(), ["advise", "--quant", "nf3", "--hardware", "laptop-8g-avx2"])
    assert result.exit_code != 0
    assert isinstance(result.exception, UsageError) and "quant" in str(result.exception)


def test_cli_advise_reads_the_roofline_measured_here_without_measuring(tmp_path, monkeypatch):
    """advise measures nothing; once train/tune measured this machine's roofline, its step time is known."""
    from lowres.hardware import detect, usable_cpus
    from lowres.train.roofline_cache import cache_key, cache_path, gemm_shapes, write_cache

    monkeypatch.setenv("LOWRES_CACHE_DIR", str(tmp_path))
    args = ["advise", "--json", "--precision", "fp32", "--batch-size", "2"]
    before = json.loads(CliRunner().invoke(_app(), args).output)["estimate"]
    assert before["step_time_s"] is None
    spec = load_spec("SmolLM2-135M")
    key = cache_key(f"{detect().fingerprint}:cpu", "fp32", usable_cpus(), gemm_shapes(spec, 512))
    write_cache(cache_path(), {key: {"flops_per_s": 1e11, "dtype": "fp32", "threads": usable_cpus(),
                                     "shapes": gemm_shapes(spec, 512), "source": "measured", "measured_at": 0.0}})
    after = json.loads(CliRunner().invoke(_app(), args).output)["estimate"]
    assert after["roofline_source"] == "cache" and after["step_time_s"] > 0
    # the estimate scales with the cached peak: 1e11 FLOP/s → the step's FLOPs / 1e11 × the fp32 non-GEMM prior
    from lowres.advisor.compute import CPU_NON_GEMM_FACTOR

    assert after["step_time_s"] == pytest.approx(after["flops_per_step"] / 1e11 * CPU_NON_GEMM_FACTOR["fp32"], rel=1e-6)


def test_a_quantized_base_counts_fp32_activations_and_reuses_its_load_copy(spec):
    """peft's k-bit preparation keeps norms, embeddings and head in fp32, so a 4-bit base's hidden states —
    its saved activations and logits — are fp32 whatever the compute dtype; and the full-precision copy
    quantizing at load leaves in the heap is reused by the step's transients, so only what they do not fill
    adds to the peak (CPU)."""
    avx512 = load_profile("laptop-16g-avx512bf16")
    nf4 = estimate(spec, avx512, Candidate(compute="bf16", quant="nf4", batch_size=2, seq_len=128))
    plain32 = estimate(spec, avx512, Candidate(compute="fp32", quant="none", batch_size=2, seq_len=128,
                                               fused_lora=False))
    assert nf4.memory["activations"] == pytest.approx(plain32.memory["activations"], rel=1e-9)
    assert nf4.memory["logits"] == pytest.approx(plain32.memory["logits"], rel=1e-9)
    assert nf4.allocator_factor == pytest.approx(M.allocator_factor("cpu", 4))
    assert nf4.peak_bytes == pytest.approx(sum(nf4.memory.values()), rel=1e-12)
    load_copy = M.quantize_load_bytes(spec, 2, "nf4")
    # 256 tokens of transients outweigh the 200 MiB copy: none of it shows; one token's do not: most of it does
    assert nf4.memory["quantize_load"] == 0.0
    tiny_step = estimate(spec, avx512, Candidate(compute="bf16", quant="nf4", batch_size=1, seq_len=1))
    assert 0.5 * load_copy < tiny_step.memory["quantize_load"] < load_copy
    assert tiny_step.memory["quantize_load"] == pytest.approx(
        load_copy - tiny_step.transient_bytes - tiny_step.memory["allocator"], rel=1e-9)


@pytest.mark.parametrize("bf16, fp32, want", [(None, None, "bf16"), (448e9, 204e9, "bf16"),
                                              (207e9, 276e9, "fp32"), (300e9, 276e9, "fp32")])
def test_auto_on_a_bf16_cpu_follows_the_measured_gemms_as_train_does(bf16, fp32, want):
    """The advisor resolves `compute: auto` as `lowres train` does: bf16 by the flags, unless a measured roofline
    shows bf16's GEMMs short of 1.25× fp32's (the AMX Xeon with AMX turned off: 207 vs 276 GFLOP/s)."""
    cpu = load_profile("laptop-16g-avx512bf16")
    assert cpu.cpu.bf16_fast and cpu.roofline is None
    rl = None if bf16 is None else Roofline(bf16_flops=bf16, fp32_flops=fp32, source="measured")
    assert resolve_compute(cpu, "auto", rl) == want
    if rl is not None:
        assert resolve_compute(cpu.model_copy(update={"roofline": rl}), "auto") == want  # the profile's own
        spec = load_spec("SmolLM2-135M")
        assert estimate(spec, cpu, Candidate(), roofline=rl).candidate.compute == want
    assert resolve_compute(cpu, "bf16", rl) == "bf16"  # a dtype the user set is never second-guessed
