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
