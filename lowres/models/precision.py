"""resolve_precision(): which dtypes and quantization a run uses, decided and checked before anything loads.

Refusals happen here, not halfway through loading a model: bf16 compute on a CPU that would emulate it,
fp16 on a CPU, 4-bit/8-bit where bitsandbytes has no working backend. Each refusal names the alternative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lowres.errors import UnsupportedError

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """``"bf16"`` → ``torch.bfloat16`` (and fp32, fp16)."""
    import torch

    return getattr(torch, TORCH_DTYPES[name])


@dataclass(frozen=True)
class ResolvedPrecision:
    """Concrete precision of a run. Dtypes are names ("fp32", "bf16", "fp16"); ``torch_dtype()`` converts.

    ``autocast`` is True where the stored weights are wider than the compute dtype (fp32 weights, bf16
    compute): the recipe then runs forward and loss under ``torch.autocast(device, compute dtype)``.
    """

    compute_dtype: str
    weights_dtype: str
    quant: str = "none"
    double_quant: bool = True
    autocast: bool = False
    device: str = "cpu"
    reasons: list[str] = field(default_factory=list)

    @property
    def compute_torch_dtype(self):
        return torch_dtype(self.compute_dtype)

    @property
    def weights_torch_dtype(self):
        return torch_dtype(self.weights_dtype)


# bf16 is auto's pick on a CPU with native bf16 only where its GEMMs, measured at the model's shapes, beat
# fp32's by this much: the step also converts activations and runs non-GEMM work that bf16 does not speed up.
# Measured: AMX 1,940–2,340 vs fp32 317 GFLOP/s (bf16 step 2.3× faster), the AMD EPYC's AVX512_BF16 448 vs 204
# (1.6×); the AMX Xeon with AMX turned off (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) 207 vs 276, where the bf16 step
# ran at 0.71× fp32's (session 13, bench/harness_vs_hf.py --isa avx512_bf16). Used by `lowres train`
# (lowres.train.mfu.measured_auto_precision) and the advisor (lowres.advisor.estimate.resolve_compute).
BF16_MIN_GEMM_GAIN = 1.25


def bf16_gemms_pay(bf16_flops: float | None, fp32_flops: float | None) -> bool | None:
    """Whether measured bf16 GEMMs beat fp32's by BF16_MIN_GEMM_GAIN; None when either figure is unknown."""
    if not bf16_flops or not fp32_flops:
        return None
    return bf16_flops >= BF16_MIN_GEMM_GAIN * fp32_flops


def _cuda_bf16(hw: Any) -> bool:
    # bf16 tensor cores arrived with Ampere (compute capability 8.0)
    gpus = getattr(hw, "gpus", None) or []
    if not gpus or not gpus[0].compute_capability:
        return False
    return float(gpus[0].compute_capability) >= 8.0


def _fast_bf16(hw: Any, device: str) -> bool:
    return _cuda_bf16(hw) if device.startswith("cuda") else bool(hw.cpu.bf16_fast)


def resolve_precision(p: Any, hw: Any = None, device: str = "cpu", *,
                      allow_emulated_bf16: bool = False) -> ResolvedPrecision:
    """Turn a PrecisionConfig into concrete dtypes for ``device`` on machine ``hw`` (a HardwareProfile;
    detected when None), or raise UnsupportedError saying why and what to use instead.

    auto compute → bf16 where the hardware has fast bf16 (AVX512_BF16/AMX on x86 CPUs, compute capability
    ≥ 8.0 on CUDA), else fp32. auto weights follow compute; fp32 weights with bf16 compute mean autocast.
    ``allow_emulated_bf16`` lets bf16 run on a CPU without it (correct but slower than fp32).
    """
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if hw is None:
        from lowres.hardware import detect

        hw = detect(probe_bnb=p.quant != "none")
    reasons: list[str] = []
    fast = _fast_bf16(hw, kind)
    where = hw.cpu.model if kind == "cpu" else (hw.gpus[0].name if getattr(hw, "gpus", None) else "this GPU")

    compute = p.compute
    if compute == "auto":
        compute = "bf16" if fast else "fp32"
        reasons.append(f"compute auto → {compute}: " + (
            f"{where} has fast bf16 ({'AVX512_BF16/AMX' if kind == 'cpu' else 'compute capability ≥ 8.0'})"
            if fast else f"{where} has no fast bf16, and fp32 is faster than emulated bf16"))
    elif compute == "bf16" and not fast:
        if kind == "cpu" and not allow_emulated_bf16:
            raise UnsupportedError(
                f"bf16 compute on this CPU ({where}) would be emulated: it has neither AVX512_BF16 nor AMX, so "
                "bf16 runs slower than fp32", hint="use --set precision.compute=fp32 (or auto)")
        reasons.append(f"bf16 compute on {where} without fast bf16: allowed on request, expect it slower")
    elif compute == "fp16" and kind == "cpu":
        raise UnsupportedError("fp16 compute is not supported on the CPU: its matmuls are slow there and "
                               "fp16 training needs loss scaling", hint="use --set precision.compute=fp32, "
                               "or bf16 on a CPU with AVX512_BF16/AMX")
    else:
        reasons.append(f"compute {compute}: as configured")

    quant = p.quant
    if quant != "none":
        backends = hw.bnb_backends
        if backends is None:
            from lowres.hardware.bnb import probe_bnb_backends

            backends = probe_bnb_backends()
        if not backends.get(kind, False):
            raise UnsupportedError(
                f"{quant} quantization needs a working bitsandbytes {kind} backend, and there is none here "
                f"(probed: {backends})", hint="use --set precision.quant=none, or install bitsandbytes ≥ 0.45 "
                "with a backend for this device")
        reasons.append(f"quant {quant}: bitsandbytes {kind} backend works"
                       + (" (double quantization of the 4-bit constants)" if quant in ("nf4", "fp4")
                          and p.double_quant else ""))

    weights = p.weights
    if quant != "none":
        # bitsandbytes stores the quantized linears itself; the rest of the model (embeddings, norms) is kept
        # in the compute dtype, which is also what the dequantized matmuls run in.
        if weights not in ("auto", compute):
            reasons.append(f"weights {weights} ignored: a {quant} base keeps its unquantized parts in {compute}")
        weights = compute
    elif weights == "auto":
        weights = compute
        reasons.append(f"weights auto → {weights}: follow compute")
    elif weights != compute and _width(weights) < _width(compute):
        raise UnsupportedError(
            f"weights stored in {weights} cannot feed {compute} compute: the matmuls would mix dtypes",
            hint=f"use --set precision.weights={compute} (or auto), or precision.compute={weights}")
    autocast = quant == "none" and weights != compute
    if autocast:
        reasons.append(f"weights {weights} with {compute} compute: autocast to {compute}")
    return ResolvedPrecision(compute_dtype=compute, weights_dtype=weights, quant=quant,
                             double_quant=p.double_quant, autocast=autocast, device=device, reasons=reasons)


def _width(name: str) -> int:
    return 4 if name == "fp32" else 2
