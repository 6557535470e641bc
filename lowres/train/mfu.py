"""Model FLOP utilisation: FLOPs a step needs, over a roofline measured on this machine.

MFU = (model FLOPs per token × tokens per second) / peak FLOP/s (Chowdhery et al. 2022, PaLM, App. B;
nanoGPT's ``estimate_mfu``). Two choices make it honest here:

* the numerator counts the FLOPs the *model* needs, not what we spend: a gradient-checkpointing recompute
  and the chunked loss's work are left out, so turning those on can only lower MFU, never flatter it;
* the denominator is not a datasheet figure but the best FLOP/s this machine reached, with the threads the
  run uses, on GEMMs of this model's own shapes in the compute dtype. It is measured once and cached in
  ``~/.cache/lowres/roofline.json`` (``$LOWRES_CACHE_DIR`` overrides), keyed by hardware fingerprint, dtype,
  threads and shapes. An MFU of 0.6 therefore means: the step ran at 60 % of the speed of this model's own
  matrix multiplications done back to back on this machine; the rest is elementwise work, attention's small
  matmuls, Python and framework overhead, and dequantisation of a 4-bit base.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lowres.models.precision import BF16_MIN_GEMM_GAIN, bf16_gemms_pay
from lowres.train.roofline_cache import (  # noqa: F401
    cache_key, cache_path, gemm_shapes, keep_if_quiet, read_cache, write_cache)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_flops_per_token(spec: Any, seq_len: int, lora_params: int) -> float:
    """Model FLOPs of one LoRA training step, per token.

    One formula serves the advisor and MFU: ``lowres.advisor.compute.lora_flops_per_token`` (sources in its
    docstring: Kaplan et al. 2020 for 2N per weight forward; PaLM App. B for attention). What it counts:
    forward 2 per weight of every block linear and of the lm_head, plus attention scores and weighted sum
    4·L·s·d_attn (no causal halving), plus 2 per LoRA weight; backward 2 per frozen weight (input gradient
    only: frozen weights get no weight gradient), twice attention's forward, and 4 per LoRA weight.
    The embedding lookup, norms, activations and softmax are not counted (they are not matmuls). Called with
    ``gradient_checkpointing=False`` on purpose: a recompute is hardware FLOPs, not model FLOPs.
    """
    from lowres.advisor.compute import lora_flops_per_token

    return lora_flops_per_token(spec, seq_len, lora_params, gradient_checkpointing=False)


@dataclass
class RooflineResult:
    """The peak FLOP/s measured for one key, and where the figure came from ("measured" or "cache")."""

    flops_per_s: float
    dtype: str
    threads: int
    shapes: list[tuple[int, int, int]]
    source: str
    measured_at: float


MAX_COLUMNS = 16384  # the widest N a roofline GEMM is measured at (measure_gemm_flops)


def measure_gemm_flops(shapes: list[tuple[int, int, int]], dtype: str, device: str = "cpu",
                       budget_s: float = 3.0) -> float:
    """Best FLOP/s over ``shapes`` (2·M·K·N per GEMM), each run warm then timed for a share of ``budget_s``.

    The best of several repeats, not the mean: on a shared machine the fastest run is the one least
    disturbed, and a peak is what a roofline is. Bounded by time, not by a repeat count: each shape is first
    timed on a slice of at most 16 rows, and M is cut so one run takes at most a third of the shape's share
    of ``budget_s`` (a 152k-vocabulary head in an emulated dtype would otherwise take minutes per run). N is
    cut to ``MAX_COLUMNS``: a 262k-vocabulary head's full operand (Gemma 3: 320 MiB in bf16, more in fp32)
    and output would otherwise be the first run's memory peak, above its training's; 16k columns keep the
    GEMM as wide as any block projection.
    """
    dt = DTYPES[dtype]
    best = 0.0
    per_shape = budget_s / max(1, len(shapes))
    g = torch.Generator(device="cpu").manual_seed(0)
    for m, k, n in shapes:
        n = min(n, MAX_COLUMNS)
        a = torch.randn(m, k, generator=g).to(device=device, dtype=dt)
        # a constant (normal, non-zero) operand: CPU and GPU GEMMs run at the same speed on any normal values,
        # and filling it is a memset, where randn of a 262k-vocabulary head took seconds on a busy machine
        b = torch.full((k, n), 0.01, device=device, dtype=dt)
        small = a[: min(m, 16)]
        torch.matmul(small, b)  # warm-up: packing buffers, thread pool, kernel selection
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(small, b)
        _sync(device)
        per_row = (time.perf_counter() - t0) / small.shape[0]
        rows = max(small.shape[0], min(m, int(per_shape / 3 / max(per_row, 1e-12))))
        a = a[:rows]
        deadline = time.perf_counter() + per_shape
        while True:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            _sync(device)
            dt_s = time.perf_counter() - t0
            best = max(best, 2.0 * rows * k * n / dt_s)
            if time.perf_counter() >= deadline:
                break
        del a, b, small
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def roofline(spec: Any, dtype: str, tokens: int, *, fingerprint: str | None = None, device: str = "cpu",
             path: Path | None = None, budget_s: float = 3.0) -> RooflineResult:
    """The peak FLOP/s for this model's GEMM shapes in ``dtype`` on this machine: cached, else measured.

    ``tokens`` (the micro-batch's tokens, capped at 2048) sets M. Threads are torch's current setting, so
    call it after ``torch.set_num_threads``.
    """
    if fingerprint is None:
        from lowres.hardware.detection import this_machine_fingerprint

        fingerprint = this_machine_fingerprint()
    threads = torch.get_num_threads()
    shapes = gemm_shapes(spec, min(max(1, tokens), 2048))
    key = cache_key(f"{fingerprint}:{device}", dtype, threads, shapes)
    path = path or cache_path()
    cache = read_cache(path)
    if key in cache:
        hit = dict(cache[key], source="cache")
        hit["shapes"] = [tuple(s) for s in hit["shapes"]]
        return RooflineResult(**{k: v for k, v in hit.items() if k in RooflineResult.__dataclass_fields__})
    from lowres.advisor.calibrate import machine_load

    before = machine_load()
    result = RooflineResult(flops_per_s=measure_gemm_flops(shapes, dtype, device, budget_s), dtype=dtype,
                            threads=threads, shapes=shapes, source="measured", measured_at=time.time())
    keep_if_quiet(path, key, asdict(result), before, always=device != "cpu")
    return result


def raise_to_achieved(result: RooflineResult, achieved_flops_per_s: float, *, fingerprint: str,
                      device: str = "cpu", path: Path | None = None, budget_s: float = 3.0) -> RooflineResult:
    """A roofline below what a run just achieved was measured while the machine was busy (shared machines):
    measure again now and keep the larger of the new figure and the achieved rate — itself a proven lower
    bound of the peak — in the cache, so MFU never reads above 100 %. Returns ``result`` when it holds."""
    if achieved_flops_per_s <= result.flops_per_s:
        return result
    measured = measure_gemm_flops(result.shapes, result.dtype, device, budget_s)
    new = RooflineResult(flops_per_s=max(measured, achieved_flops_per_s), dtype=result.dtype,
                         threads=result.threads, shapes=result.shapes,
                         source="re-measured" if measured >= achieved_flops_per_s else "raised to an achieved rate",
                         measured_at=time.time())
    path = path or cache_path()
    cache = read_cache(path)
    cache[cache_key(f"{fingerprint}:{device}", result.dtype, result.threads, result.shapes)] = asdict(new)
    write_cache(path, cache)
    return new


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_s: float) -> float:
    """Achieved model FLOP/s over the peak (a ratio; 1.0 = every cycle did model matmul work)."""
    if peak_flops_per_s <= 0:
        return float("nan")
    return tokens_per_s * flops_per_token / peak_flops_per_s


_AUTO_RATES: dict[tuple, tuple[float, float]] = {}


def measured_auto_precision(p: Any, rp: Any, hw: Any, spec: Any, tokens: int, device: str = "cpu") -> Any:
    """``precision.compute: auto`` on a CPU that has native bf16 by its flags: keep bf16 only if its GEMMs at
    this model's shapes measure at least BF16_MIN_GEMM_GAIN × fp32's on this machine (both rooflines cached
    per fingerprint, so measured once), else fp32. Anything else (set dtypes, GPUs, quantized bases, fp32
    already) is returned unchanged."""
    if p.compute != "auto" or device != "cpu" or rp.compute_dtype != "bf16" or rp.quant != "none":
        return rp
    from lowres.models import resolve_precision

    memo = (hw.fingerprint, tuple(gemm_shapes(spec, min(max(1, tokens), 2048))), torch.get_num_threads())
    if memo not in _AUTO_RATES:  # once per process too: on a busy machine the file cache keeps nothing
        _AUTO_RATES[memo] = tuple(roofline(spec, dtype, tokens, fingerprint=hw.fingerprint, device=device).flops_per_s
                                  for dtype in ("bf16", "fp32"))
    bf16, fp32 = _AUTO_RATES[memo]
    measured = (f"its GEMMs at the model's shapes ran at {bf16 / 1e9:,.0f} GFLOP/s in bf16 and "
                f"{fp32 / 1e9:,.0f} in fp32 here")
    if bf16_gemms_pay(bf16, fp32):
        rp.reasons[0] += f"; measured: {measured}"
        return rp
    out = resolve_precision(p.model_copy(update={"compute": "fp32"}), hw, device)
    out.reasons[0] = (f"compute auto → fp32: {hw.cpu.model} has native bf16 by its flags, but {measured} — "
                      f"bf16 pays only at ≥ {BF16_MIN_GEMM_GAIN:g}× fp32's rate")
    return out
