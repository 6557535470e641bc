"""Streaming statistics per metric and per phase, and the :class:`Summary` a profiler run ends with."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Iterable

from profiler.reading import Sample

# Values kept per series for the percentiles. Past this the series keeps every other value (and then every
# fourth...), an even thinning over time, so an hour at 10 Hz costs a few hundred kB, not a few MB per metric.
MAX_KEPT = 8192


def series_key(s: Sample) -> str:
    """``name`` or ``name{k=v,...}``: one summary row per labelled series."""
    if not s.labels:
        return s.name
    return s.name + "{" + ",".join(f"{k}={v}" for k, v in s.labels) + "}"


class Stats:
    """Mean and max over every value; p50 and p95 over an evenly thinned copy."""

    __slots__ = ("n", "total", "max", "_kept", "_stride", "_skip")

    def __init__(self) -> None:
        self.n, self.total, self.max = 0, 0.0, -math.inf
        self._kept, self._stride, self._skip = array("d"), 1, 0

    def add(self, v: float) -> None:
        """Fold in one value."""
        self.n += 1
        self.total += v
        if v > self.max:
            self.max = v
        self._skip += 1
        if self._skip >= self._stride:
            self._skip = 0
            self._kept.append(v)
            if len(self._kept) >= MAX_KEPT:
                self._kept = self._kept[::2]
                self._stride *= 2

    def to_dict(self) -> dict:
        """``{mean, p50, p95, max, n}``."""
        kept = sorted(self._kept)
        return {"mean": self.total / self.n, "p50": _quantile(kept, 0.50), "p95": _quantile(kept, 0.95),
                "max": self.max, "n": self.n}


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class Aggregator:
    """Folds batches of samples into per-series stats, overall and for each phase active at sample time."""

    def __init__(self) -> None:
        self.metrics: dict[str, Stats] = {}
        self.phases: dict[str, dict[str, Stats]] = {}

    def add(self, batch: Iterable[Sample], active_phases: Iterable[str] = ()) -> None:
        """Fold a batch into the overall stats and into each active phase's."""
        targets = [self.metrics] + [self.phases.setdefault(p, {}) for p in active_phases]
        for s in batch:
            key = series_key(s)
            for t in targets:
                st = t.get(key)
                if st is None:
                    st = t[key] = Stats()
                st.add(s.value)

    def metric_dicts(self) -> dict[str, dict]:
        """Overall stats per series, sorted by name."""
        return {k: v.to_dict() for k, v in sorted(self.metrics.items())}

    def phase_dicts(self) -> dict[str, dict]:
        """``{phase: {"metrics": {series: stats}}}`` for phases in which a tick happened."""
        return {p: {"metrics": {k: v.to_dict() for k, v in sorted(m.items())}} for p, m in self.phases.items()}


@dataclass
class Summary:
    """What a profiler run measured.

    ``metrics[series] -> {mean, p50, p95, max, n}``; ``phases[name] -> {count, wall_s, cpu_s, peak_rss_bytes,
    [cuda_peak_allocated_bytes], metrics: {series: stats of the samples taken in that phase}}``;
    ``self_cost -> {sampler_cpu_s, ticks, expected_ticks, overhead_ratio, ms_per_tick}``; ``errors`` counts
    failures of samplers and sinks by name (they never stop the run); ``unavailable`` says which samplers
    this machine lacks and why.
    """

    metrics: dict[str, dict] = field(default_factory=dict)
    phases: dict[str, dict] = field(default_factory=dict)
    self_cost: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    sinks: list[dict] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        """Plain JSON-serialisable form (NaN where a series had no values kept)."""
        return {"wall_s": self.wall_s, "metrics": self.metrics, "phases": self.phases,
                "self_cost": self.self_cost, "errors": self.errors, "unavailable": self.unavailable,
                "sinks": self.sinks}

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
        """Inverse of :meth:`to_dict`."""
        return cls(metrics=d.get("metrics", {}), phases=d.get("phases", {}), self_cost=d.get("self_cost", {}),
                   errors=d.get("errors", {}), unavailable=d.get("unavailable", {}), sinks=d.get("sinks", []),
                   wall_s=d.get("wall_s", 0.0))

    def value(self, name: str, stat: str = "max", default: float | None = None) -> float | None:
        """One statistic of one series, e.g. ``value("lowres_process_resident_memory_peak_bytes")``."""
        return self.metrics.get(name, {}).get(stat, default)

    def table(self):
        """A rich Table that fits 80 columns: each series' mean/p50/p95/max (per-core rows are left to
        ``to_dict``: 64 of them would bury the rest), then phases, then the profiler's own cost."""
        from rich import box
        from rich.table import Table

        t = Table(title=f"lowres profile — {self.wall_s:.1f} s", box=box.SIMPLE_HEAD, pad_edge=False)
        t.add_column("metric", overflow="fold")  # a long name folds; the figures beside it stay whole
        for col in ("mean", "p50", "p95", "max"):
            t.add_column(col, justify="right", no_wrap=True, min_width=8)
        for name, st in self.metrics.items():
            if "{cpu=" in name:
                continue
            t.add_row(name.removeprefix("lowres_"), *(_fmt(name, st[k]) for k in ("mean", "p50", "p95", "max")))
        for pname, ph in self.phases.items():
            t.add_row(f"[bold]phase {pname}[/] ×{ph.get('count', 0)} wall/cpu/peak",
                      f"{ph.get('wall_s', 0):.3g} s", f"{ph.get('cpu_s', 0):.3g} s", "",
                      _fmt("bytes", ph.get("peak_rss_bytes", 0)))
        sc = self.self_cost
        if sc:
            t.add_row("[dim]profiler: ms/tick, ticks, of run CPU[/]", f"{sc.get('ms_per_tick', 0):.3f}",
                      f"{sc.get('ticks', 0)}/{sc.get('expected_ticks', 0)}", f"{sc.get('overhead_ratio', 0):.2%}", "")
        for name, count in self.errors.items():
            t.add_row(f"[red]errors {name}[/]", str(count), "", "", "")
        return t


def _fmt(name: str, v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if "bytes" in name:
        # binary units, as every other lowres output (hw, advise, train) prints memory
        for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if abs(v) >= scale:
                return f"{v / scale:.3g} {unit}"
        return f"{v:.0f} B"
    return f"{v:.3g}"
