"""Per-machine calibration: what probes measured, kept per hardware fingerprint and model, fitted into a
``Calibration`` the estimator applies; and the machine's roofline the step-time estimate runs on.

Cache: ``$LOWRES_CACHE_DIR/calibration.json`` (else ``~/.cache/lowres/calibration.json``), beside the
roofline cache of lowres.train.mfu:

    {"<fingerprint>|<model>": {"points": [ProbePoint, ...]},
     "<fingerprint>|bandwidth": {"bytes_per_s": ..., "measured_at": ...}}

The fit (``fit_calibration``), from the uncalibrated predictions of each probe:

* memory — the estimator says peak = R + P + s·A·T (R the runtime baseline, P the persistent tensors:
  weights and LoRA/optimizer states, T the transient ones, A the allocator prior per dtype, s its scale).
  With probes at two or more distinct A·T, R and s are fitted by least squares on measured − P (s kept in
  [0.7, 2], so RSS never grows by less than the transients, and R ≥ 0: outside, the fit is noise and the
  single factor below is used instead). With one probe: one factor, measured/predicted, on the whole peak.
* time — measured step ≈ k·predicted roofline time + c (c: per-step overhead the roofline cannot see —
  Python, the optimizer, small kernels; k: the share of peak FLOP/s real steps reach). Fitted by least
  squares with two or more distinct predictions, else c = 0 and k = measured/predicted. A separate k is kept
  per quantization where probes of it exist, because bitsandbytes dequantises on the CPU at a speed the
  copy-bandwidth roofline does not predict (measure, don't assume), and per compute dtype among the
  unquantized probes: on the development CPU the prior's bf16:fp32 time ratio was off by about 1.3x
  (bench/advisor_accuracy.py), which probes of both dtypes correct.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lowres.advisor.estimate import Calibration
from lowres.train.attention import resolve_attention


@dataclass
class ProbePoint:
    """One probe's uncalibrated prediction beside what it measured (None where it did not run)."""

    candidate: dict[str, Any]
    transient_bytes: float   # allocator prior × transient tensors (what the allocator scale multiplies)
    persistent_bytes: float
    predicted_peak_bytes: float
    predicted_step_s: float | None
    measured_peak_bytes: float | None
    measured_step_s: float | None
    fits: bool | None
    measured_at: float = 0.0
    cpu_share: float | None = None   # CPU time / (wall × threads) of its steps (lowres.advisor.probe)
    load: dict | None = None         # machine_load() when it ran


# A probe whose steps got less than this share of their cores' time (CPU time / wall × threads) ran on a
# busy machine, or waited: its step time is not used for calibration. On the 2-core development machine at
# load 6-14 (other programs holding the cores) probes measured 0.09-0.35, and their steps ran 2-30x slower
# than the same steps quiet; a sleep in every step gives < 0.2 (tests/test_advisor_families.py).
MIN_CPU_SHARE = 0.4
# A time calibration that puts steps more than this factor away from the machine model (either way) is
# absurd — a cache filled while the machine was busy gave 52,441 s per step for `tiny` — and is rejected.
MAX_TIME_FACTOR = 10.0


def cache_dir() -> Path:
    """``$LOWRES_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowres``, else ``~/.cache/lowres``."""
    root = os.environ.get("LOWRES_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lowres")
    return Path(root)


def cache_path() -> Path:
    return cache_dir() / "calibration.json"


def _read() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or damaged: start over (it is only a cache)


def _write(data: dict) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one


def load_points(fingerprint: str, model: str) -> list[ProbePoint]:
    """The probe points cached for this machine and model (oldest first)."""
    entry = _read().get(f"{fingerprint}|{model}", {})
    points = []
    for p in entry.get("points", []):
        try:
            points.append(ProbePoint(**p))
        except TypeError:  # written by another lowres version: skip it rather than fail the advice
            continue
    return points


def record_points(fingerprint: str, model: str, points: list[ProbePoint], keep: int = 32) -> None:
    """Add ``points`` to the cache; a newer probe of the same candidate replaces the older one."""
    data = _read()
    entry = data.setdefault(f"{fingerprint}|{model}", {"points": []})
    new_keys = {json.dumps(p.candidate, sort_keys=True) for p in points}
    kept = [p for p in entry["points"] if json.dumps(p["candidate"], sort_keys=True) not in new_keys]
    now = time.time()
    for p in points:
        p.measured_at = p.measured_at or now
    entry["points"] = (kept + [asdict(p) for p in points])[-keep:]
    _write(data)


def _line_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of y on x; None when x does not vary."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if len(xs) < 2 or sxx <= 1e-12 * max(1.0, mx * mx):
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def fit_calibration(points: list[ProbePoint]) -> Calibration:
    """A Calibration from probe points (see the module docstring for the fit); none = uncalibrated."""
    ran = [p for p in points if p.fits and p.measured_peak_bytes]
    if not ran:
        return Calibration()
    cal: dict[str, Any] = {"source": f"{len(ran)} probe(s) on this machine"}
    # transient sizes less than 20 % apart give a slope that is mostly noise: one factor then
    xs = [p.transient_bytes for p in ran]
    ys = [p.measured_peak_bytes - p.persistent_bytes for p in ran]
    line = _line_fit(xs, ys) if max(xs) > 1.2 * min(xs) else None
    if line and line[0] >= 0 and 0.7 <= line[1] <= 2.0:
        cal["runtime_bytes"], cal["allocator_scale"] = line
    else:
        ratios = [p.measured_peak_bytes / p.predicted_peak_bytes for p in ran]
        cal["memory_factor"] = statistics.median(ratios)
    timed = [p for p in ran if p.measured_step_s and p.predicted_step_s]
    busy = [p for p in timed if p.cpu_share is not None and p.cpu_share < MIN_CPU_SHARE]
    timed = [p for p in timed if p not in busy]
    if busy:
        cal["source"] += (f"; {len(busy)} probe time(s) left out: taken while the machine was busy (CPU share "
                          f"{min(p.cpu_share for p in busy):.2f} < {MIN_CPU_SHARE})")
    absurd = [p for p in timed if not 1 / MAX_TIME_FACTOR <= p.measured_step_s / p.predicted_step_s <= MAX_TIME_FACTOR]
    timed = [p for p in timed if p not in absurd]
    if absurd:
        cal["source"] += (f"; {len(absurd)} probe time(s) left out: more than {MAX_TIME_FACTOR:.0f}x from the "
                          "machine model")
    if timed:
        by_quant: dict[str, list[ProbePoint]] = {}
        for p in timed:
            by_quant.setdefault(p.candidate.get("quant", "none"), []).append(p)
        # the overhead c comes from the unquantized probes of the most probed compute dtype when they hold two
        # distinct predictions (else from all probes): one line per dtype, as each reaches its own share of peak
        base = by_quant.get("none") or timed
        by_compute: dict[str, list[ProbePoint]] = {}
        for p in base:
            by_compute.setdefault(p.candidate.get("compute", "?"), []).append(p)
        main = max(by_compute.values(), key=len)
        xs = [p.predicted_step_s for p in main]
        # an intercept from two nearly equal predictions is noise: demand a 1.5x spread
        fitted = _line_fit(xs, [p.measured_step_s for p in main]) if max(xs) >= 1.5 * min(xs) else None
        overhead = fitted[0] if fitted and fitted[0] >= 0 and fitted[1] > 0 else 0.0
        if overhead > (MAX_TIME_FACTOR - 1) * min(xs):  # an intercept that dwarfs the model: noise, not overhead
            overhead = 0.0

        def factor(ps: list[ProbePoint]) -> float:
            return statistics.median([(p.measured_step_s - overhead) / p.predicted_step_s for p in ps])

        factors = {q: f for q, ps in by_quant.items() if (f := factor(ps)) > 0}
        per_compute = {c: f for c, ps in by_compute.items() if (f := factor(ps)) > 0} if "none" in by_quant else {}
        if factors and any(not 1 / MAX_TIME_FACTOR <= f <= MAX_TIME_FACTOR for f in factors.values()):
            cal["source"] += "; time calibration rejected: its factors are more than 10x from the machine model"
            factors = {}
        if factors:
            main_compute = main[0].candidate.get("compute", "?")
            cal["time_factor"] = per_compute.get(main_compute) or factors.get("none") or statistics.median(
                factors.values())
            cal["time_factor_by_quant"] = factors
            cal["time_factor_by_compute"] = per_compute or None
            cal["step_overhead_s"] = overhead
    return Calibration(**cal)


def load_calibration(fingerprint: str, model: str) -> Calibration:
    """The fitted calibration for this machine and model; uncalibrated when no probe ran here yet."""
    return fit_calibration(load_points(fingerprint, model))


def machine_load() -> dict[str, float]:
    """How busy the machine is right now: the 1-minute load average per usable CPU (os.getloadavg; above
    ~1 the run shares its cores with others) — recorded beside every measurement and probe point."""
    from lowres.hardware import usable_cpus

    try:
        load1 = os.getloadavg()[0]
    except OSError:  # no load average on this platform: unknown, not zero
        return {}
    return {"load1": round(load1, 2), "cpus": usable_cpus(), "load_per_cpu": round(load1 / max(1, usable_cpus()), 2)}


def _best_within(fn: Any, budget_s: float) -> float:
    """Best time of ``fn`` over as many runs as fit in ``budget_s`` (at least one after a warm-up run): a
    measurement bounded by seconds, not by a repeat count, so a slow machine answers as fast as a quick one."""
    fn()  # warm-up: first touch, packing buffers, kernel selection
    deadline = time.perf_counter() + budget_s
    best = float("inf")
    while True:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() >= deadline:
            return best


def measure_bandwidth(size_bytes: int = 256 * 1024**2, repeats: int = 5, budget_s: float = 1.0) -> float:
    """Copy bandwidth, bytes/s: best copy of a ``size_bytes`` buffer within ``budget_s`` seconds, counted as
    read + write (2·size per copy), the STREAM "copy" convention (McCalpin 1995). (``repeats`` is kept for
    callers; the time budget bounds it.)"""
    import torch

    src = torch.empty(size_bytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * size_bytes / _best_within(lambda: dst.copy_(src), budget_s)


def measure_elementwise(dtype: str = "fp32", size_bytes: int = 64 * 1024**2, budget_s: float = 1.0) -> float:
    """Element-wise bandwidth, bytes/s: ``c = a * b`` on ``size_bytes`` tensors (read 2, write 1 — the
    traffic of the norms, activations, residual adds and casts a step does between its GEMMs), at the
    threads training uses. STREAM's "add" convention (McCalpin 1995), in ``dtype``."""
    import torch

    from lowres.train.mfu import DTYPES

    n = size_bytes // torch.empty(0, dtype=DTYPES[dtype]).element_size()
    a = torch.ones(n, dtype=DTYPES[dtype])
    b = torch.ones(n, dtype=DTYPES[dtype])
    c = torch.empty_like(a)
    return 3 * size_bytes / _best_within(lambda: torch.mul(a, b, out=c), budget_s)


def measure_op_seconds(budget_s: float = 1.0, chain: int = 200) -> float:
    """Fixed cost of one autograd op, seconds: forward + backward of a chain of ``chain`` tiny ops (8
    elements: no arithmetic to speak of), per op — the dispatch, autograd bookkeeping and allocation every
    op of a training step pays whatever its size (Python and the framework; what makes small models slow)."""
    import torch

    x = torch.ones(8, requires_grad=True)

    def run():
        y = x
        for _ in range(chain // 2):
            y = (y * 1.0001) + 0.5
        y.sum().backward()

    return _best_within(run, budget_s) / chain


def measure_attention_flops(heads: int, kv_heads: int, head_dim: int, seq_len: int, dtype: str,
                            budget_s: float = 1.5, impl: str = "sdpa") -> float | None:
    """FLOP/s of causal attention forward + backward at the run's length, one sequence, in the units of
    lowres.advisor.compute (12·s²·heads·d per sequence and layer: 4 forward, 8 backward, no causal halving):
    torch's SDPA, or with ``impl="bmm"`` lowres.train.attention's kernel as the recipe runs it (what
    ``train.attention=auto`` picks for short sequences on the CPU; block-causal where unpadded). Long sequences
    are timed at a shorter length that fits the budget (attention's rate changes little)."""
    import torch
    import torch.nn.functional as F

    from lowres.train.mfu import DTYPES

    dt = DTYPES[dtype]
    s = max(16, min(seq_len, 4096))
    q = torch.randn(1, heads, s, head_dim, dtype=dt, requires_grad=True)
    k = torch.randn(1, kv_heads, s, head_dim, dtype=dt, requires_grad=True)
    v = torch.randn(1, kv_heads, s, head_dim, dtype=dt, requires_grad=True)
    gqa = {"enable_gqa": True} if heads != kv_heads else {}
    if impl == "bmm":
        from lowres.train.attention import causal_attention

        def run():
            causal_attention(q, k, v, head_dim ** -0.5).float().sum().backward()
    else:
        def run():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa).float().sum().backward()

    try:
        return 12.0 * s * s * heads * head_dim / _best_within(run, budget_s)
    except (RuntimeError, TypeError):  # an SDPA without enable_gqa (old torch): leave it to the FLOP model
        return None


def measure_dequant_rate(quant: str, in_features: int, out_features: int, compute: str = "bf16",
                         tokens: int = 256, repeats: int = 3) -> float | None:
    """bitsandbytes' dequantisation speed here, in the units of lowres.advisor.compute.dequant_bytes_per_step
    (packed bytes + 2·in·out·e per pass): one forward and one input-gradient backward (two passes) through a
    bitsandbytes Linear of the model's largest projection, minus the same through the unquantized matmul.
    None when bitsandbytes cannot run it here. Measured on this CPU (bitsandbytes 0.50, 2 threads): a
    576×1536 NF4 linear added ~23 ms per pass at 256 tokens — 0.12 GB/s in these units, against 34 GB/s of
    copy bandwidth — which is why the bandwidth roofline alone predicted SmolLM2-135M's NF4 steps 22× too fast.
    """
    try:
        import torch

        from lowres.advisor.memory import DTYPE_BYTES, quantized_linear_bytes
        from lowres.train.mfu import DTYPES

        dt = DTYPES[compute] if quant != "int8" else torch.float32
        w = torch.randn(out_features, in_features)
        if quant in ("nf4", "fp4"):
            import bitsandbytes as bnb

            lin = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dt, quant_type=quant)
            lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=quant)
        elif quant == "int8":
            import bitsandbytes as bnb

            lin = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
            lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            return None
        lin = lin.to("cpu")
        x = torch.randn(tokens, in_features, dtype=dt, requires_grad=True)
        wd = w.to(dt)
        quantized = _best_within(lambda: lin(x).float().sum().backward(), 1.0)
        plain = _best_within(lambda: (x @ wd.T).float().sum().backward(), 0.5)
        n_bytes = quantized_linear_bytes(in_features, out_features, quant, DTYPE_BYTES[compute]) + \
            2 * in_features * out_features * DTYPE_BYTES[compute]
        if quantized <= plain * 1.05:
            return None  # no measurable cost over noise (a busy machine): leave it to the probes' calibration
        return 2 * n_bytes / (quantized - plain)
    except Exception:  # no bitsandbytes backend here: the step time of a quantized base stays unknown
        return None


@dataclass
class MachineRoofline:
    """What the step-time estimate runs on, measured here: peak FLOP/s per dtype on the model's GEMM shapes,
    copy bandwidth, and bitsandbytes' dequantisation rate per quantization (bytes/s, see above)."""

    fp32_flops: float | None
    bf16_flops: float | None
    mem_bandwidth_bytes_s: float | None
    dequant_bytes_s: dict[str, float]
    source: str = "measured"
    note: str = ""
    fp16_flops: float | None = None
    # the machine model of the non-matmul work (lowres.advisor.compute.machine_step_seconds)
    elementwise_bytes_s: dict[str, float] | None = None   # per dtype
    op_seconds: float | None = None                       # fixed cost of one autograd op, forward + backward
    attention_flops_s: dict[str, float] | None = None     # causal SDPA fwd+bwd at the run's length, per dtype
    load: dict[str, float] | None = None                  # machine load while measuring (machine_load)


# A measurement taken while other programs used more than this share of the CPUs is not kept: it would
# describe a busy machine, not this one (a roofline measured at load 2 on 2 cores read half the real peak).
BUSY_LOAD_PER_CPU = 1.5


def usable_dtypes(hw: Any) -> tuple[str, ...]:
    """The compute dtypes training may use on ``hw``: fp32, and bf16 only where it is native (an emulated
    bf16 is never chosen, so it is never measured: its GEMMs ran at ~2 GFLOP/s on an AVX2-only CPU)."""
    from lowres.advisor.estimate import slow_precision

    return ("fp32",) if hw is not None and slow_precision(hw, "bf16") else ("fp32", "bf16")


def machine_model(fingerprint: str, spec: Any, seq_len: int, dtypes: tuple[str, ...], *,
                  measure: bool = True) -> dict[str, Any]:
    """Element-wise bandwidth and attention rate per dtype, and the per-op cost, for the machine model of
    step time: from the cache (``<fingerprint>|machine``), measured (each within a second or two) for what is
    missing when ``measure``. A figure measured on a busy machine (load per CPU above ``BUSY_LOAD_PER_CPU``)
    is used for this run but not cached, and the load is kept beside every cached figure."""
    data = _read()
    key = f"{fingerprint}|machine"
    entry = data.get(key) or {}
    # the attention kernel train.attention=auto runs at this length, per dtype (bmm keyed apart from sdpa)
    impl = {dt: resolve_attention("auto", "cpu", dt, seq_len) for dt in dtypes}
    s_key = f"{spec.num_heads}x{spec.num_kv_heads}x{spec.head_dim}|s{_length_bucket(seq_len)}"
    a_key = {dt: ("attention-bmm" if impl[dt] == "bmm" else "attention") + f"|{s_key}|{dt}" for dt in dtypes}
    wanted = [f"elementwise|{dt}" for dt in dtypes] + ["op_seconds"] + [a_key[dt] for dt in dtypes]
    missing = [k for k in wanted if k not in entry]
    fresh: dict[str, Any] = {}
    if missing and measure:
        import torch

        from lowres.hardware import usable_cpus

        torch.set_num_threads(usable_cpus())
        before = machine_load()
        for k in missing:
            kind, *rest = k.split("|")
            if kind == "elementwise":
                value = measure_elementwise(rest[0])
            elif kind == "op_seconds":
                value = measure_op_seconds()
            else:
                value = measure_attention_flops(spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                                _length_bucket(seq_len), rest[-1], impl=impl[rest[-1]])
            fresh[k] = {"value": value, "measured_at": time.time(), **machine_load()}
        busy = max(before.get("load_per_cpu", 0.0), *(v.get("load_per_cpu", 0.0) for v in fresh.values()))
        if busy <= BUSY_LOAD_PER_CPU:
            data = _read()
            data.setdefault(key, {}).update(fresh)
            _write(data)
    merged = {**entry, **fresh}
    return {
        "elementwise_bytes_s": {dt: merged[f"elementwise|{dt}"]["value"] for dt in dtypes
                                if f"elementwise|{dt}" in merged} or None,
        "op_seconds": (merged.get("op_seconds") or {}).get("value"),
        "attention_flops_s": {dt: merged[a_key[dt]]["value"] for dt in dtypes
                              if (merged.get(a_key[dt]) or {}).get("value")} or None,
    }


def _length_bucket(seq_len: int) -> int:
    """Attention is measured at a power of two near the run's length (64 ... 4096), so nearby lengths share it."""
    s = 64
    while s < min(seq_len, 4096):
        s *= 2
    return s


def machine_roofline(spec: Any, fingerprint: str, tokens: int = 512, threads: int | None = None, *,
                     hw: Any = None, seq_len: int = 256, quant: bool = True) -> MachineRoofline:
    """This machine's roofline for ``spec``: peak FLOP/s on the model's own GEMM shapes for each dtype
    training may use here (``usable_dtypes(hw)``: never an emulated bf16) (lowres.train.mfu.roofline, cached
    per machine), copy bandwidth, the machine model of the non-matmul work (``machine_model``) and
    dequantisation rates (cached here, per machine; on the model's largest projection; ``quant`` False skips
    them). Every measurement is bounded by seconds; ``threads``: what training uses."""
    import torch

    from lowres.advisor.estimate import resolve_compute
    from lowres.advisor.memory import linear_shapes
    from lowres.hardware import usable_cpus
    from lowres.train.mfu import roofline

    torch.set_num_threads(threads or usable_cpus())
    dtypes = usable_dtypes(hw)
    load = machine_load()
    flops = {dt: roofline(spec, dt, tokens, fingerprint=fingerprint).flops_per_s for dt in dtypes}
    data = _read()
    key = f"{fingerprint}|bandwidth"
    bandwidth = (data.get(key) or {}).get("bytes_per_s")
    if bandwidth is None:
        bandwidth = measure_bandwidth()
        after = machine_load()
        if max(load.get("load_per_cpu", 0.0), after.get("load_per_cpu", 0.0)) <= BUSY_LOAD_PER_CPU:
            data[key] = {"bytes_per_s": bandwidth, "measured_at": time.time(), **after}  # busy: not kept
            _write(data)
    in_f, out_f = max(linear_shapes(spec).values(), key=lambda s: s[0] * s[1])
    dq_compute = resolve_compute(hw, "auto") if hw is not None else "bf16"
    dq_key = f"{fingerprint}|dequant2|{in_f}x{out_f}" + ("" if dq_compute == "bf16" else f"|{dq_compute}")
    if quant and dq_key not in data:
        rates = {q: measure_dequant_rate(q, in_f, out_f, compute=dq_compute) for q in ("nf4", "int8")}
        data = _read()
        data[dq_key] = rates
        _write(data)
    mm = machine_model(fingerprint, spec, seq_len, dtypes)
    return MachineRoofline(fp32_flops=flops["fp32"], bf16_flops=flops.get("bf16"),
                           mem_bandwidth_bytes_s=bandwidth,
                           dequant_bytes_s={q: r for q, r in (data.get(dq_key) or {}).items() if r}, load=load,
                           note=f"GEMMs of {spec.name}'s shapes at {tokens} tokens, {torch.get_num_threads()} threads"
                                f" ({', '.join(dtypes)})", **mm)


def cached_roofline(spec: Any, fingerprint: str, tokens: int = 512, threads: int | None = None,
                    device: str = "cpu", seq_len: int | None = None) -> MachineRoofline | None:
    """The roofline ``machine_roofline`` measured earlier on this machine for ``spec``, read from the caches
    without measuring or importing torch (for `lowres advise`, which loads nothing); None when the peak
    FLOP/s were never measured here. Dequantisation rates are included where they were measured."""
    from lowres.advisor.memory import linear_shapes
    from lowres.hardware import usable_cpus
    from lowres.train.roofline_cache import cache_key, cache_path as roofline_path, gemm_shapes, read_cache

    threads = threads or usable_cpus()
    shapes = gemm_shapes(spec, min(max(1, tokens), 2048))
    cache = read_cache(roofline_path())
    flops = {dt: (cache.get(cache_key(f"{fingerprint}:{device}", dt, threads, shapes)) or {}).get("flops_per_s")
             for dt in ("fp32", "bf16")}
    if not any(flops.values()):
        return None
    data = _read()
    in_f, out_f = max(linear_shapes(spec).values(), key=lambda s: s[0] * s[1])
    rates = data.get(f"{fingerprint}|dequant2|{in_f}x{out_f}") or data.get(
        f"{fingerprint}|dequant2|{in_f}x{out_f}|fp32") or {}
    mm = machine_model(fingerprint, spec, seq_len or tokens,
                       tuple(dt for dt in ("fp32", "bf16") if flops.get(dt)), measure=False)
    return MachineRoofline(fp32_flops=flops["fp32"], bf16_flops=flops["bf16"],
                           mem_bandwidth_bytes_s=(data.get(f"{fingerprint}|bandwidth") or {}).get("bytes_per_s"),
                           dequant_bytes_s={q: r for q, r in rates.items() if r}, source="cache",
                           note=f"measured here earlier: GEMMs of {spec.name}'s shapes at {tokens} tokens, "
                                f"{threads} threads", **mm)
