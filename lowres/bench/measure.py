"""From a benchmark's per-step history to its figures and MLflow series: repeats, medians, spread.

Pure functions of the recipe's step records, so they are tested without training anything.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

# Metric keys that `lowres regress` and `lowres compare` read back: change them only together.
STEP_SECONDS = "bench/step_seconds"  # one point per timed step (warm-up dropped), steps 1..n
PEAK_MEMORY = "bench/peak_memory_bytes"  # the same steps' peak memory (RSS high-water mark, or CUDA peak)
TOKENS_PER_SECOND = "bench/tokens_per_second"  # one point per repeat, steps 1..repeats
MFU = "bench/mfu_ratio"  # one point per repeat
SUMMARY_PREFIX = "bench/summary/"  # one value per run, step 0


@dataclass
class Figures:
    """A workload's measurement: per repeat and overall (medians over repeats, spread as min–max)."""

    tokens_per_s: list[float] = field(default_factory=list)
    mfu: list[float | None] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: list[int] = field(default_factory=list)
    profiler_overhead_ratio: float | None = None

    def summary(self) -> dict[str, float]:
        """The one-number view (each with its spread) that `lowres compare` tabulates."""
        out = {"tokens_per_second_median": statistics.median(self.tokens_per_s),
               "tokens_per_second_min": min(self.tokens_per_s), "tokens_per_second_max": max(self.tokens_per_s),
               "step_seconds_median": statistics.median(self.step_seconds),
               "step_seconds_p90": quantile(self.step_seconds, 0.9),
               "peak_memory_bytes_max": float(max(self.peak_memory_bytes)),
               "repeats": float(len(self.tokens_per_s)), "timed_steps": float(len(self.step_seconds))}
        mfus = [m for m in self.mfu if m is not None]
        if mfus:
            out["mfu_ratio_median"] = statistics.median(mfus)
        if self.profiler_overhead_ratio is not None:
            out["profiler_overhead_ratio"] = self.profiler_overhead_ratio
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile of a non-empty list."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def figures(history: list[dict], warmup: int, steps_per_repeat: int, flops_per_token: float,
            peak_flops_per_s: float | None) -> Figures:
    """Drop ``warmup`` steps, cut the rest into repeats of ``steps_per_repeat``; tokens/s per repeat is total
    tokens over total seconds (not a mean of per-step rates, which would overweight fast steps)."""
    timed = history[warmup:]
    if len(timed) < steps_per_repeat:
        raise ValueError(f"{len(timed)} timed steps, fewer than one repeat of {steps_per_repeat}")
    f = Figures(step_seconds=[r["step_seconds"] for r in timed],
                peak_memory_bytes=[int(r["peak_memory_bytes"]) for r in timed])
    for i in range(0, len(timed) - steps_per_repeat + 1, steps_per_repeat):
        chunk = timed[i:i + steps_per_repeat]
        tps = sum(r["tokens"] for r in chunk) / sum(r["step_seconds"] for r in chunk)
        f.tokens_per_s.append(tps)
        # MFU = achieved FLOP/s ÷ this machine's measured roofline (lowres.train.mfu); unknown without one
        f.mfu.append(tps * flops_per_token / peak_flops_per_s if peak_flops_per_s else None)
    return f


def points(f: Figures, timestamp_ms: int) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp, step) for MLflow: the distributions as series, the summary at step 0."""
    out = [(STEP_SECONDS, s, timestamp_ms, i) for i, s in enumerate(f.step_seconds, 1)]
    out += [(PEAK_MEMORY, float(m), timestamp_ms, i) for i, m in enumerate(f.peak_memory_bytes, 1)]
    out += [(TOKENS_PER_SECOND, t, timestamp_ms, i) for i, t in enumerate(f.tokens_per_s, 1)]
    out += [(MFU, m, timestamp_ms, i) for i, m in enumerate(f.mfu, 1) if m is not None]
    out += [(SUMMARY_PREFIX + k, v, timestamp_ms, 0) for k, v in f.summary().items()]
    return out
