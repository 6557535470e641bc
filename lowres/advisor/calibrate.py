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

        def factor(ps: list[ProbePoint]) -> float:
            return statistics.median([(p.measured_step_s - overhead) / p.predicted_step_s for p in ps])

        factors = {q: f for q, ps in by_quant.items() if (f := factor(ps)) > 0}
        per_compute = {c: f for c, ps in by_compute.items() if (f := factor(ps)) > 0} if "none" in by_quant else {}
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


def measure_bandwidth(size_bytes: int = 256 * 1024**2, repeats: int = 5) -> float:
    """Copy bandwidth, bytes/s: best of ``repeats`` copies of a ``size_bytes`` buffer, counted as read +
    write (2·size per copy), the STREAM "copy" convention (McCalpin 1995)."""
    import torch

    src = torch.empty(size_bytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * size_bytes / best


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
        quantized = _best(lambda: lin(x).float().sum().backward(), repeats)
        plain = _best(lambda: (x @ wd.T).float().sum().backward(), repeats)
        n_bytes = quantized_linear_bytes(in_features, out_features, quant, DTYPE_BYTES[compute]) + \
            2 * in_features * out_features * DTYPE_BYTES[compute]
        if quantized <= plain * 1.05:
            return None  # no measurable cost over noise (a busy machine): leave it to the probes' calibration
        return 2 * n_bytes / (quantized - plain)
    except Exception:  # no bitsandbytes backend here: the step time of a quantized base stays unknown
        return None


def _best(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


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


def machine_roofline(spec: Any, fingerprint: str, tokens: int = 512, threads: int | None = None) -> MachineRoofline:
    """This machine's roofline for ``spec``: fp32 and bf16 peak FLOP/s on the model's own GEMM shapes
    (lowres.train.mfu.roofline, cached per machine), copy bandwidth and dequantisation rates (cached here,
    per machine; the rates on the model's largest projection). ``threads``: what training uses."""
    import torch

    from lowres.advisor.memory import linear_shapes
    from lowres.hardware import usable_cpus
    from lowres.train.mfu import roofline

    torch.set_num_threads(threads or usable_cpus())
    flops = {dt: roofline(spec, dt, tokens, fingerprint=fingerprint).flops_per_s for dt in ("fp32", "bf16")}
    data = _read()
    key = f"{fingerprint}|bandwidth"
    if key not in data:
        data[key] = {"bytes_per_s": measure_bandwidth(), "measured_at": time.time()}
        _write(data)
    in_f, out_f = max(linear_shapes(spec).values(), key=lambda s: s[0] * s[1])
    dq_key = f"{fingerprint}|dequant2|{in_f}x{out_f}"
    if dq_key not in data:
        data = _read()
        data[dq_key] = {q: measure_dequant_rate(q, in_f, out_f) for q in ("nf4", "int8")}
        _write(data)
    return MachineRoofline(fp32_flops=flops["fp32"], bf16_flops=flops["bf16"],
                           mem_bandwidth_bytes_s=data[key]["bytes_per_s"],
                           dequant_bytes_s={q: r for q, r in data[dq_key].items() if r},
                           note=f"GEMMs of {spec.name}'s shapes at {tokens} tokens, {torch.get_num_threads()} threads")


def cached_roofline(spec: Any, fingerprint: str, tokens: int = 512, threads: int | None = None,
                    device: str = "cpu") -> MachineRoofline | None:
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
    rates = data.get(f"{fingerprint}|dequant2|{in_f}x{out_f}") or {}
    return MachineRoofline(fp32_flops=flops["fp32"], bf16_flops=flops["bf16"],
                           mem_bandwidth_bytes_s=(data.get(f"{fingerprint}|bandwidth") or {}).get("bytes_per_s"),
                           dequant_bytes_s={q: r for q, r in rates.items() if r}, source="cache",
                           note=f"measured here earlier: GEMMs of {spec.name}'s shapes at {tokens} tokens, "
                                f"{threads} threads")
