"""Compute terms of a LoRA/QLoRA fine-tuning step: FLOPs, dequantisation traffic, step time.

A figure that cannot be known from what is given is ``None`` (shown as "unknown"), never a plausible guess.
"""

from __future__ import annotations

from typing import Any

from lowres.advisor.memory import _all_layers, linear_shapes, quantized_linear_bytes  # noqa: F401


def lora_flops_per_token(spec: Any, seq_len: int, lora_params: int, gradient_checkpointing: bool) -> float:
    """Training FLOPs per token of one LoRA step over a frozen base.

    Forward: 2 FLOPs per weight of every block linear and of the lm_head (Kaplan et al. 2020, "Scaling Laws",
    C_forward ≈ 2N), plus attention scores and weighted sum 4·L·s·d_attn (Chowdhery et al. 2022, PaLM, App. B;
    counted without the causal half, as nanoGPT's MFU does), plus 2 per LoRA weight.
    Backward of a frozen weight needs only the input gradient (2N, not 4N); attention's backward is twice
    its forward (gradients of q, k and v: 8·L·s·d_attn); LoRA weights take the full 4 per weight
    (Kaplan's 6N in all). Gradient checkpointing adds one more forward of the blocks (not the lm_head).
    The embedding is a lookup: no FLOPs.
    """
    layers = spec.num_layers
    block_weights = sum(i * o for layer in _all_layers(spec) for _, i, o in layer)
    head_weights = spec.vocab_size * spec.hidden_size
    attn = 4 * layers * seq_len * spec.num_heads * spec.head_dim
    forward_blocks = 2 * block_weights + attn + 2 * lora_params
    forward = forward_blocks + 2 * head_weights
    backward = 2 * block_weights + 2 * head_weights + 2 * attn + 4 * lora_params
    recompute = forward_blocks if gradient_checkpointing else 0
    return float(forward + backward + recompute)


def peak_flops(roofline: Any, compute: str) -> float | None:
    """The roofline's peak FLOP/s for the compute dtype, or None when the roofline does not give it."""
    if roofline is None:
        return None
    return getattr(roofline, f"{compute}_flops", None)


def dequant_bytes_per_step(spec: Any, e: int, quant: str, double_quant: bool,
                           gradient_checkpointing: bool) -> float:
    """Memory traffic of dequantising the frozen block linears in one micro-batch step.

    A bitsandbytes int8/4-bit linear materialises its weight in the compute dtype for each matmul: once in
    the forward, once for the input gradient in backward, once more in a checkpointed recompute. Each pass
    reads the packed weight and writes and re-reads the dequantised one: passes · Σ (packed + 2·in·out·e).
    The cost is per step, not per token, so larger batches amortise it. Zero when not quantized.
    """
    if quant == "none":
        return 0.0
    passes = 3 if gradient_checkpointing else 2
    total = sum(quantized_linear_bytes(i, o, quant, e, double_quant) + 2 * i * o * e
                for layer in _all_layers(spec) for _, i, o in layer)
    return float(passes * total)


# Measured step time over GEMM-roofline time on CPU (bench/advisor_accuracy.py, EPYC with AVX512_BF16,
# 2 threads, tiny and SmolLM2-135M at 1-8k tokens per step): the roofline counts only the GEMM FLOPs at their
# peak; RMSNorm, SwiGLU, softmax, SDPA, the rank-r LoRA matmuls, casts and the optimizer add ~50 % in fp32
# and ~170 % in bf16, where the GEMMs run twice as fast but the rest does not (and casts are added).
# Priors; probes calibrate them per machine.
CPU_NON_GEMM_FACTOR = {"fp32": 1.5, "bf16": 2.7, "fp16": 2.7}


def step_seconds(flops: float, dequant_bytes: float, roofline: Any, compute: str,
                 quant: str = "none", device: str = "cpu") -> float | None:
    """Time of one micro-batch step on the roofline: FLOPs / peak FLOP/s + dequantisation bytes / bandwidth,
    the first times ``CPU_NON_GEMM_FACTOR`` on a CPU.

    The bandwidth is the measured dequantisation rate of ``quant`` where the roofline has one.
    Both are lower bounds on one machine (Williams et al. 2009, "Roofline"); a measured roofline (a large
    matmul and a copy timed on this machine) brings them close, and probes calibrate the rest. None when the
    peak for this dtype is unknown, or when dequantisation is needed and the bandwidth is unknown.
    """
    peak = peak_flops(roofline, compute)
    if not peak:
        return None
    seconds = flops / peak * (CPU_NON_GEMM_FACTOR.get(compute, 1.0) if device == "cpu" else 1.0)
    if dequant_bytes:
        # a measured dequantisation rate (lowres.advisor.calibrate.measure_dequant_rate) beats bandwidth:
        # bitsandbytes on CPUs runs far below it
        rate = (getattr(roofline, "dequant_bytes_s", None) or {}).get(quant)
        bandwidth = rate or getattr(roofline, "mem_bandwidth_bytes_s", None)
        if not bandwidth:
            return None
        seconds += dequant_bytes / bandwidth
    return seconds


# The machine model of an uncalibrated CPU step (``machine_step_seconds``). Element-wise traffic per byte a
# step saves for backward: written once in the forward, read once in backward, its gradient written and read
# once — four passes — plus the forward's reads of the same tensors (norm, activation and residual inputs):
# ~6 passes in all (an assumption; probes calibrate it). The chunked loss passes over each chunk's fp32
# logits about 6 times too (matmul out, max, exp, sum, in-place gradient, cast for the input-gradient matmul).
ELEMENTWISE_PASSES = 6.0
LOGITS_PASSES = 6.0
# An uncalibrated estimate's band: the machine model's step time on this development CPU fell within
# 0.5-2x of measurement (bench/advisor_accuracy.py, cold column); a calibrated one is far closer.
COLD_BAND = (0.5, 2.0)


def attention_flops_per_token(spec: Any, seq_len: int, gradient_checkpointing: bool) -> float:
    """The attention part of ``lora_flops_per_token``: 12·L·s·heads·d (4 forward, 8 backward) + 4·L·s·heads·d
    more for a checkpointed recompute."""
    attn = 4 * spec.num_layers * seq_len * spec.num_heads * spec.head_dim
    return float(3 * attn + (attn if gradient_checkpointing else 0))


def machine_step_seconds(spec: Any, compute: str, tokens: int, seq_len: int, flops: float, activation_bytes: float,
                         logits_elements: float, n_ops: int, lora_tensors: int, dequant_bytes: float,
                         roofline: Any, quant: str = "none") -> tuple[float, dict[str, float]] | None:
    """Seconds of one uncalibrated CPU micro-batch step from a measured machine model, and its parts:

    * gemm — the matmul FLOPs (all but attention) at the peak FLOP/s measured on this model's GEMM shapes;
    * attention — 12·L·s·heads·d FLOPs per token at the rate causal SDPA forward + backward reached here at
      the run's length (``measure_attention_flops``), else at the GEMM peak;
    * elementwise — ``ELEMENTWISE_PASSES`` × the bytes the step saves for backward (the norms, activations,
      casts, residuals between GEMMs) plus ``LOGITS_PASSES`` × the logits' fp32 bytes, at the measured
      element-wise bandwidth;
    * ops — the autograd ops of the step (forward + backward of every op traced on the meta device, and the
      optimizer's ~8 per LoRA tensor) at the measured fixed cost per op;
    * dequant — as in ``step_seconds``.

    None when the roofline lacks the peak, the element-wise bandwidth or the per-op cost (a saved profile):
    the caller falls back to ``step_seconds``.
    """
    peak = peak_flops(roofline, compute)
    elem = (getattr(roofline, "elementwise_bytes_s", None) or {}).get(compute) or (
        getattr(roofline, "elementwise_bytes_s", None) or {}).get("fp32")
    op_s = getattr(roofline, "op_seconds", None)
    if not (peak and elem and op_s):
        return None
    attn_flops = tokens * attention_flops_per_token(spec, seq_len, False)
    attn_rate = (getattr(roofline, "attention_flops_s", None) or {}).get(compute) or peak
    parts = {
        "gemm": max(0.0, flops - attn_flops) / peak,
        "attention": attn_flops / attn_rate,
        "elementwise": (ELEMENTWISE_PASSES * activation_bytes + LOGITS_PASSES * 4 * logits_elements) / elem,
        "ops": (n_ops + 8 * lora_tensors) * op_s,
    }
    if dequant_bytes:
        rate = (getattr(roofline, "dequant_bytes_s", None) or {}).get(quant)
        bandwidth = rate or getattr(roofline, "mem_bandwidth_bytes_s", None)
        if not bandwidth:
            return None
        parts["dequant"] = dequant_bytes / bandwidth
    return sum(parts.values()), parts
