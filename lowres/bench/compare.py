"""`lowres compare`: benchmark results across machines and versions, from MLflow.

One row per workload × hardware fingerprint × version (lowres version and git sha): the median over that
group's runs of each run's own median tokens/s and MFU, the largest peak memory, and how many runs it holds.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lowres.bench import measure
from lowres.bench.suite import TAG_PRECISION, TAG_PRESET, TAG_WORKLOAD
from lowres.errors import UsageError
from lowres.tracking.runs import TAG_FINGERPRINT, TAG_GIT_SHA, TAG_TIER, TAG_VERSION_PREFIX

_SUMMARY = measure.SUMMARY_PREFIX


@dataclass
class Row:
    """One workload on one machine at one version."""

    workload: str
    fingerprint: str
    tier: str
    version: str  # lowres version + short git sha
    runs: int
    tokens_per_s: float | None
    mfu: float | None
    peak_memory_bytes: float | None
    step_seconds: float | None


def bench_filter(tier: str | None = None, preset: str | None = None, precision: str | None = None) -> str:
    """The MLflow filter for finished benchmark runs, narrowed by tier, preset and precision."""
    parts = ["attributes.status = 'FINISHED'", f"tags.`{TAG_WORKLOAD}` LIKE '%'"]
    for tag, value in ((TAG_TIER, tier), (TAG_PRESET, preset), (TAG_PRECISION, precision)):
        if value:
            parts.append(f"tags.`{tag}` = '{value}'")
    return " and ".join(parts)


def rows(client, experiment_ids: list[str], *, tier: str | None = None, preset: str | None = None,
         precision: str | None = None, max_runs: int = 5000) -> list[Row]:
    """Grouped benchmark results, sorted by workload, then tokens/s (fastest first)."""
    runs = client.search_runs(experiment_ids, filter_string=bench_filter(tier, preset, precision),
                              max_results=max_runs)
    groups: dict[tuple, list] = defaultdict(list)
    for r in runs:
        t = r.data.tags
        sha = (t.get(TAG_GIT_SHA) or "")[:10]
        version = t.get(TAG_VERSION_PREFIX + "lowres", "?") + (f" @{sha}" if sha else "")
        groups[(t[TAG_WORKLOAD], t.get(TAG_FINGERPRINT, "?"), t.get(TAG_TIER, "?"), version)].append(r)
    out = []
    for (workload, fingerprint, tier_, version), rs in groups.items():
        def med(key):
            vals = [r.data.metrics[_SUMMARY + key] for r in rs if _SUMMARY + key in r.data.metrics]
            return statistics.median(vals) if vals else None
        peaks = [r.data.metrics[_SUMMARY + "peak_memory_bytes_max"] for r in rs
                 if _SUMMARY + "peak_memory_bytes_max" in r.data.metrics]
        out.append(Row(workload, fingerprint, tier_, version, len(rs), med("tokens_per_second_median"),
                       med("mfu_ratio_median"), max(peaks) if peaks else None, med("step_seconds_median")))
    return sorted(out, key=lambda r: (r.workload, -(r.tokens_per_s or 0)))


def plot(table: list[Row], path: str | Path) -> Path:
    """A bar chart of median tokens/s per workload, one bar per machine × version, written to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed",
                         hint="pip install matplotlib, or leave out --plot") from None
    workloads = sorted({r.workload for r in table})
    series = sorted({(r.fingerprint, r.version) for r in table})
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(workloads) * max(1, len(series)) ** 0.5), 4.5))
    for i, (fp, ver) in enumerate(series):
        ys = [next((r.tokens_per_s or 0 for r in table if (r.workload, r.fingerprint, r.version) == (w, fp, ver)),
                   0) for w in workloads]
        ax.bar([x + i * width for x in range(len(workloads))], ys, width, label=f"{fp} · {ver}")
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(workloads))], workloads, rotation=30,
                  ha="right")
    ax.set_ylabel("tokens/s (median of runs)")
    ax.set_title("lowres bench: throughput by machine and version")
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
