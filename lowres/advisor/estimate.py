"""Predict a candidate's peak memory (what the OS or the CUDA driver sees) and step time, loading nothing.

``estimate(spec, hw, candidate)`` adds up the terms of lowres.advisor.memory and lowres.advisor.compute.
Each term is one cited function there; this module only chooses the device, the dtype and the budget, and
applies the per-machine ``Calibration`` that probes learn (lowres.advisor.calibrate, later).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lowres.advisor import compute as C
from lowres.advisor import memory as M
from lowres.train.allocator import MMAP_THRESHOLD
from lowres.train.attention import resolve_attention

DEFAULT_HEADROOM = 0.10
PERSISTENT = ("lora.params", "lora.optimizer", "quantize_load")  # besides the weights: not churned by a step


class Candidate(BaseModel):
    """One configuration to estimate: the knobs that change memory or time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compute: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    quant: Literal["none", "int8", "nf4", "fp4"] = "none"
    double_quant: bool = True
    lora_rank: int = Field(8, ge=1)
    lora_targets: str | tuple[str, ...] = "attention_mlp"
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=1)
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = Field(1024, ge=0, description="0 = the whole batch's logits at once")
    optimizer: str = "adamw"
    fused_lora: bool = Field(True, description="LoRA linears as lowres.train.speed's Function (train.fused_lora, "
                             "no LoRA dropout); traced as such for activations and op counts")
    fused_norm: bool = Field(True, description="RMSNorms as lowres.train.norms' Function (train.fused_norm); "
                             "traced as such")
    attention: Literal["auto", "sdpa", "bmm", "eager"] = Field(
        "auto", description="train.attention; auto resolved as the recipe resolves it (lowres.train.attention)")

    @field_validator("lora_targets")
    @classmethod
    def _known_targets(cls, v: str | tuple[str, ...]) -> str | tuple[str, ...]:
        M.resolve_targets(v)  # raises ValueError naming the bad target and the allowed ones
        return v

    @classmethod
    def from_run_config(cls, cfg: Any) -> "Candidate":
        """The candidate a RunConfig describes (lowres.config.RunConfig)."""
        targets = cfg.lora.targets if isinstance(cfg.lora.targets, str) else tuple(cfg.lora.targets)
        return cls(compute=cfg.precision.compute, quant=cfg.precision.quant,
                   double_quant=cfg.precision.double_quant, lora_rank=cfg.lora.rank, lora_targets=targets,
                   batch_size=cfg.train.batch_size, seq_len=cfg.data.max_length,
                   gradient_checkpointing=cfg.precision.gradient_checkpointing,
                   loss_chunk_tokens=cfg.train.loss_chunk_tokens, optimizer=cfg.train.optimizer,
                   fused_lora=(cfg.train.fused_lora or cfg.train.gemm == "onednn") and cfg.lora.dropout == 0,
                   attention=cfg.train.attention, fused_norm=cfg.train.fused_norm)


@dataclass(frozen=True)
class Calibration:
    """Per-machine corrections learned from probes (lowres.advisor.calibrate fits them); defaults = none.

    peak = memory_factor · (runtime_bytes + persistent + allocator_scale · A · transient), A the allocator
    factor of lowres.advisor.memory, runtime_bytes its baseline where None; step = k · roofline time +
    step_overhead_s, k the factor of the candidate's quantization where probes of it ran, else of its
    compute dtype (fp32 and bf16 reach different shares of their peaks), else ``time_factor``.
    """

    memory_factor: float = 1.0
    time_factor: float = 1.0
    source: str = "uncalibrated"
    runtime_bytes: float | None = None
    allocator_scale: float = 1.0
    step_overhead_s: float = 0.0
    time_factor_by_quant: dict[str, float] | None = None
    time_factor_by_compute: dict[str, float] | None = None  # unquantized probes, per compute dtype

    def time_factor_for(self, quant: str, compute: str | None = None) -> float:
        if quant != "none" and quant in (self.time_factor_by_quant or {}):
            return self.time_factor_by_quant[quant]
        return (self.time_factor_by_compute or {}).get(compute, self.time_factor)


@dataclass
class Estimate:
    """A candidate's predicted figures. ``memory`` sums exactly to ``peak_bytes``; None means unknown."""

    candidate: Candidate
    device: str
    memory: dict[str, float]
    peak_bytes: float
    live_tensor_bytes: float
    budget_bytes: float | None
    fits: bool | None
    headroom: float
    flops_per_step: float
    tokens_per_step: int
    step_time_s: float | None
    roofline_source: str | None
    estimate_only: bool
    calibration: Calibration
    warnings: list[str] = field(default_factory=list)
    slow_precision: bool = False  # the compute dtype is emulated on this hardware (e.g. bf16 on AVX2)
    transient_bytes: float = 0.0  # the live tensors the allocator factor applies to (not weights, states)
    allocator_factor: float = 1.0   # the factor applied to them (prior × calibration)
    step_time_band_s: tuple[float, float] | None = None  # an uncalibrated guess's band (compute.COLD_BAND)
    step_time_parts: dict[str, float] | None = None      # the machine model's parts, uncalibrated seconds

    @property
    def tokens_per_s(self) -> float | None:
        return None if not self.step_time_s else self.tokens_per_step / self.step_time_s

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready figures; unknowns stay None (null)."""
        return {
            "candidate": self.candidate.model_dump(mode="json"), "device": self.device,
            "memory_bytes": {k: round(v) for k, v in self.memory.items()},
            "peak_bytes": round(self.peak_bytes), "live_tensor_bytes": round(self.live_tensor_bytes),
            "budget_bytes": None if self.budget_bytes is None else round(self.budget_bytes),
            "fits": self.fits, "headroom": self.headroom, "flops_per_step": self.flops_per_step,
            "tokens_per_step": self.tokens_per_step, "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s, "roofline_source": self.roofline_source,
            "estimate_only": self.estimate_only, "calibration": vars(self.calibration),
            "warnings": list(self.warnings), "slow_precision": self.slow_precision,
            "step_time_band_s": None if self.step_time_band_s is None else list(self.step_time_band_s),
            "step_time_parts_s": self.step_time_parts,
        }


def device_of(hw: Any) -> str:
    """Where the tensors live: the first GPU when the profile lists one, else the CPU."""
    return "cuda" if getattr(hw, "gpus", None) else "cpu"


def memory_budget_bytes(hw: Any) -> float | None:
    """Memory a run may use on its device.

    CPU: ``hw.usable_memory_bytes()`` — RAM available at detection (what other programs leave free, not the
    installed total), capped by what the cgroup limit leaves. CUDA: the first GPU's free memory, else its
    total.
    """
    if device_of(hw) == "cuda":
        gpu = hw.gpus[0]
        return float(gpu.memory_free_bytes or gpu.memory_total_bytes)
    return float(hw.usable_memory_bytes())


def _gpu_capability(hw: Any) -> float | None:
    cc = hw.gpus[0].compute_capability if device_of(hw) == "cuda" else None
    try:
        return float(cc) if cc else None
    except ValueError:
        return None


def resolve_compute(hw: Any, compute: str, roofline: Any = None) -> str:
    """``auto`` → bf16 where the hardware has fast bf16 (CPU: AVX512_BF16/AMX or ARM BF16, from the ISA
    flags; GPU: compute capability ≥ 8.0), else fp32 — and on a CPU, as `lowres train` decides, fp32 where a
    measured roofline (``roofline``, else ``hw.roofline``) shows bf16's GEMMs short of
    BF16_MIN_GEMM_GAIN × fp32's. fp16 is never chosen automatically: it needs loss scaling. Other values
    pass through."""
    if compute != "auto":
        return compute
    if device_of(hw) == "cuda":
        cc = _gpu_capability(hw)
        return "bf16" if cc is not None and cc >= 8.0 else "fp32"
    if not hw.cpu.bf16_fast:
        return "fp32"
    from lowres.models.precision import bf16_gemms_pay

    rl = roofline if roofline is not None else getattr(hw, "roofline", None)
    pays = bf16_gemms_pay(getattr(rl, "bf16_flops", None), getattr(rl, "fp32_flops", None))
    return "fp32" if pays is False else "bf16"


def slow_precision(hw: Any, compute: str) -> bool:
    """Whether ``compute`` is emulated here: bf16 on a CPU without AVX512_BF16/AMX/ARM BF16 (tens of times
    slower than fp32, measured in issue 4), fp16 on a CPU without AVX512_FP16/AMX-FP16, or bf16 on a GPU
    below compute capability 8.0."""
    if device_of(hw) == "cuda":
        return compute == "bf16" and (_gpu_capability(hw) or 0.0) < 8.0
    if compute == "bf16":
        return not hw.cpu.bf16_fast
    return compute == "fp16" and not set(hw.cpu.flags) & {"avx512_fp16", "amx_fp16"}


def _warnings(hw: Any, cand: Candidate, compute: str, memory: dict[str, float], peak: float) -> list[str]:
    out = []
    if slow_precision(hw, compute):
        where = "GPU (compute capability < 8.0)" if device_of(hw) == "cuda" else "CPU (no native units in its ISA)"
        out.append(f"{compute} is emulated on this {where}: bf16 on AVX2-only CPUs ran tens of times slower "
                   "than fp32; use fp32")
    if device_of(hw) == "cpu" and cand.quant != "none":
        out.append(f"{cand.quant} on CPU dequantises every weight at each matmul: it costs time; measure it")
    weights = sum(v for k, v in memory.items() if k.startswith("weights."))
    if cand.quant != "none" and memory["weights.embeddings"] > memory["weights.linear"]:
        out.append(f"quantization shrinks only the block linears; embeddings/lm_head (unquantized) are larger "
                   f"here, and all weights are {weights / peak:.0%} of the peak")
    return out


def estimate(spec: Any, hw: Any, candidate: Candidate, *, roofline: Any = None,
             calibration: Calibration | None = None, headroom: float = DEFAULT_HEADROOM) -> Estimate:
    """Predict peak memory (broken down) and step time of ``candidate`` for model ``spec`` on ``hw``.

    peak = memory_factor · (runtime baseline + persistent + A · transient) (calibrated or not),
    where persistent = weights + LoRA params + AdamW states and transient = dequant scratch + LoRA grads +
    activations + logits (each from
    lowres.advisor.memory); the breakdown lists the allocator and calibration terms so that it sums to the
    peak. step time = time factor · (FLOPs/peak FLOP/s + dequant bytes/bandwidth) + step overhead, on
    ``roofline`` if given, else ``hw.roofline``; unknown (None) when neither gives the needed figures.
    """
    cal = calibration or Calibration()
    device = device_of(hw)
    compute = resolve_compute(hw, candidate.compute, roofline)
    cand = candidate.model_copy(update={"compute": compute})
    e = M.DTYPE_BYTES[compute]
    targets = M.resolve_targets(cand.lora_targets)
    del targets  # validated; the model's own linears are matched by the raw targets (a set name or names)
    lora_n = M.lora_parameter_count(spec, cand.lora_rank, cand.lora_targets)

    memory: dict[str, float] = {}
    memory.update(M.weight_bytes(spec, e, cand.quant, cand.double_quant))
    quantize_load = M.quantize_load_bytes(spec, e, cand.quant)
    memory["quantize_load"] = 0.0  # set below: what of it the step's transients do not reuse
    memory["dequant_scratch"] = M.dequant_scratch_bytes(spec, e, cand.quant)
    memory.update(M.lora_state_bytes(lora_n, cand.optimizer))
    # lowres.train.speed's Function runs fp32/bf16 LoRA layers over a plain base; peft's forward the rest
    fused = cand.fused_lora and cand.quant == "none" and compute != "fp16"
    attention = resolve_attention(cand.attention, device, compute, cand.seq_len)
    # A quantized base goes through peft's k-bit preparation, which keeps every unquantized tensor (norms,
    # embeddings, lm_head) in fp32: the hidden states, and so the saved activations and the logits, are fp32
    # whatever the compute dtype (a census of saved tensors, bf16/nf4: all fp32), and churn as fp32 does.
    e_act = 4 if cand.quant != "none" else e
    memory["activations"] = M.activation_bytes(spec, e_act, cand.lora_rank, cand.lora_targets, cand.batch_size,
                                               cand.seq_len, cand.gradient_checkpointing,
                                               fused, attention, cand.fused_norm)
    memory["logits"] = M.logits_bytes(spec, e_act, cand.batch_size, cand.seq_len, cand.loss_chunk_tokens, device)
    live = sum(memory.values())
    # Only transient tensors (activations, logits, gradients, dequant scratch) churn through the allocator;
    # weights and LoRA/optimizer states are allocated once and stay. Measured here (bench/advisor_accuracy):
    # applying the factor to the weights too over-predicted SmolLM2-135M's peak RSS by 25-35 %.
    transient = live - sum(v for k, v in memory.items() if k.startswith("weights.") or k in PERSISTENT)
    if device == "cpu" and memory["logits"] > MMAP_THRESHOLD:
        # a loss chunk's logits above the tuned mmap threshold (train.malloc_tuning) are mmap'd by glibc and
        # unmapped when freed: no fragmentation to add; below it they churn through the heap like the rest
        transient -= memory["logits"]
    allocator = M.allocator_factor(device, e_act) * cal.allocator_scale
    memory["allocator"] = (allocator - 1.0) * transient
    # The full-precision copy quantizing at load leaves in glibc's heap is reused by the step's transient
    # tensors: only what they do not fill raises the peak. Measured on the Xeon with AMX (SmolLM2-135M
    # bf16/nf4, micro-batch 1/2/4 at 128 tokens): the peaks sat 200 MiB (the whole copy) below an estimate
    # that added it, at every batch. On CUDA (not measured) it is still added whole.
    memory["quantize_load"] = (max(0.0, quantize_load - transient - memory["allocator"]) if device == "cpu"
                               else quantize_load)
    memory["runtime"] = float(M.RUNTIME_BASELINE_BYTES[device] if cal.runtime_bytes is None else cal.runtime_bytes)
    memory["calibration"] = (cal.memory_factor - 1.0) * sum(memory.values())
    peak = sum(memory.values())

    budget = memory_budget_bytes(hw)
    fits = None if budget is None else peak <= budget * (1.0 - headroom)

    tokens = cand.batch_size * cand.seq_len
    flops = tokens * C.lora_flops_per_token(spec, cand.seq_len, lora_n, cand.gradient_checkpointing)
    rl = roofline if roofline is not None else getattr(hw, "roofline", None)
    dq = C.dequant_bytes_per_step(spec, e, cand.quant, cand.double_quant, cand.gradient_checkpointing)
    seconds, parts = None, None
    arch = M.model_arch(spec)
    if device == "cpu" and rl is not None and arch is not None and getattr(rl, "op_seconds", None):
        from lowres.advisor.arch import graph_ops, targeted

        n_ops = 2 * graph_ops(spec, compute, cand.lora_rank, cand.lora_targets, cand.seq_len,
                              fused, attention, cand.fused_norm)
        lora_tensors = 2 * sum(len(layer) for layer in targeted(arch, cand.lora_targets))
        act = memory["activations"] * (1.5 if cand.gradient_checkpointing else 1.0)
        machine = C.machine_step_seconds(spec, compute, tokens, cand.seq_len, flops, act,
                                         float(tokens) * spec.vocab_size, n_ops, lora_tensors, dq, rl, cand.quant)
        if machine is not None:
            seconds, parts = machine
    if seconds is None:
        seconds = C.step_seconds(flops, dq, rl, compute, cand.quant, device)
    step = None if seconds is None else seconds * cal.time_factor_for(cand.quant, compute) + cal.step_overhead_s
    band = None
    if step is not None and not cal.time_factor_by_quant and cal.time_factor == 1.0 and not cal.step_overhead_s:
        band = (step * C.COLD_BAND[0], step * C.COLD_BAND[1])  # uncalibrated: the machine model's band

    warnings = _warnings(hw, cand, compute, memory, peak)
    arch = M.model_arch(spec)
    if arch is not None:
        from lowres.advisor.arch import target_notes

        warnings += target_notes(arch, cand.lora_targets) + [f"unmodelled: {n}" for n in arch.notes]
    if step is None:
        need = f"{compute} FLOP/s" + (" and memory bandwidth" if dq else "")
        name = getattr(spec, "name", "MODEL")
        warnings.append(f"step time unknown: no roofline with {need} for this machine — `lowres tune --auto "
                        f"--dry-run --model {name}` measures it (seconds, then probes), or give a profile "
                        "that lists one (--hardware)")
    return Estimate(candidate=cand, device=device, memory=memory, peak_bytes=peak, live_tensor_bytes=live,
                    transient_bytes=transient, allocator_factor=allocator,
                    budget_bytes=budget, fits=fits, headroom=headroom, flops_per_step=flops,
                    tokens_per_step=tokens, step_time_s=step,
                    roofline_source=getattr(rl, "source", None) if rl is not None else None,
                    estimate_only=bool(getattr(hw, "is_estimate_only", False)), calibration=cal,
                    warnings=warnings, slow_precision=slow_precision(hw, compute), step_time_band_s=band,
                    step_time_parts=parts)


def largest_fitting_batch(spec: Any, hw: Any, candidate: Candidate, *, max_batch: int = 4096,
                          **kwargs: Any) -> int:
    """The largest batch size ≤ ``max_batch`` whose estimate fits with headroom; 0 if not even 1 fits.
    Peak memory never decreases with the batch size, so a binary search suffices."""
    def fits(b: int) -> bool:
        return bool(estimate(spec, hw, candidate.model_copy(update={"batch_size": b}), **kwargs).fits)

    if not fits(1):
        return 0
    lo, hi = 1, max_batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
