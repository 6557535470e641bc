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
GIB = 1024**3


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


# ---------------------------------------------------------------------------------------------- any runs
# Where each kind of run keeps its figures, first found wins: a finished `lowres train` logs summary/ values
# (means without warm-up, as it prints them); bench runs their bench/summary/ medians; tune its chosen probe;
# a federation the clients' means of its last round; older train runs only their last step's values.
_TOKENS = ("summary/tokens_per_second", _SUMMARY + "tokens_per_second_median", "advisor/chosen_tokens_per_s",
           "fed/tokens_per_second", "train/tokens_per_second")
_MFU = ("summary/mfu_ratio", _SUMMARY + "mfu_ratio_median", "train/mfu_ratio")
_PEAK_MB = ("summary/peak_memory_megabytes", "train/peak_memory_megabytes", "system/lowres/process_rss_peak_megabytes")
_PEAK_BYTES = (_SUMMARY + "peak_memory_bytes_max", "fed/peak_rss_bytes", "train/peak_memory_bytes")
_LOSS = ("train/loss", "fed/train_loss", "fed/client/train_loss")
_EVAL = ("eval/loss", "fed/central_eval_loss", "fed/federated_eval_loss")
KINDS = ("train", "bench", "tune", "fed", "anomaly", "profile", "other")


@dataclass
class RunRow:
    """One MLflow run of any kind, with the figures `lowres compare` shows."""

    run: str
    run_id: str
    experiment: str
    kind: str
    status: str
    started: str  # ISO 8601, UTC, to the second
    model: str | None
    precision: str | None
    rank: str | None
    tier: str | None
    fingerprint: str | None
    steps: int | None
    loss: float | None
    eval_loss: float | None
    tokens_per_s: float | None
    mfu: float | None
    peak_memory_gib: float | None


def _first(metrics: dict, keys: tuple) -> float | None:
    return next((float(metrics[k]) for k in keys if k in metrics), None)


def run_kind(run, experiment: str) -> str:
    """train, bench, tune, fed, anomaly, profile or other, from the tags lowres puts on its runs."""
    t = run.data.tags
    if TAG_WORKLOAD in t:
        return "bench"
    command = t.get("lowres.command", "").split(" ")[0]
    if command in ("train", "tune", "fed"):
        return command
    if t.get("lowres.task") == "anomaly":
        return "anomaly"
    if experiment == "lowres-profile" or t.get("lowres.kind") == "profile":
        return "profile"
    return "other"


def run_row(run, experiment: str) -> RunRow:
    """A RunRow from an MLflow run (its latest metrics, params and tags only: no history is read)."""
    import datetime

    m, p, t = run.data.metrics, run.data.params, run.data.tags
    peak_mb, peak_b = _first(m, _PEAK_MB), _first(m, _PEAK_BYTES)
    peak = peak_mb * 1e6 / GIB if peak_mb is not None else (peak_b / GIB if peak_b is not None else None)
    steps = p.get("config.train.max_steps") if run.info.status == "FINISHED" else None
    started = datetime.datetime.fromtimestamp(run.info.start_time / 1000, datetime.timezone.utc)
    return RunRow(
        run=run.info.run_name or run.info.run_id[:8], run_id=run.info.run_id, experiment=experiment,
        kind=run_kind(run, experiment), status=run.info.status, started=started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        model=t.get(TAG_PRESET) or p.get("config.model.name") or p.get("model.name"),
        precision=t.get(TAG_PRECISION) or p.get("model.dtype") or p.get("config.precision.compute"),
        rank=p.get("config.lora.rank") or p.get("lora.rank"), tier=t.get(TAG_TIER),
        fingerprint=t.get(TAG_FINGERPRINT), steps=int(steps) if steps and steps.isdigit() else None,
        loss=_first(m, _LOSS), eval_loss=_first(m, _EVAL), tokens_per_s=_first(m, _TOKENS), mfu=_first(m, _MFU),
        peak_memory_gib=peak)


def run_rows(client, experiment_ids: list[str] | None = None, *, kinds: list[str] | None = None,
             tier: str | None = None, model: str | None = None, precision: str | None = None, limit: int = 20,
             nested: bool = False) -> list[RunRow]:
    """The newest ``limit`` runs of the given experiments (default: all), any kind, newest first.

    Child runs (a tune's probes, a federation's clients) are left out unless ``nested``; ``kinds`` narrows
    to train, bench, tune, fed, anomaly, profile or other; tier, model and precision filter as shown.
    """
    names = {e.experiment_id: e.name for e in client.search_experiments()}
    ids = list(experiment_ids) if experiment_ids is not None else list(names)
    if not ids:
        return []
    out: list[RunRow] = []
    token = None
    while len(out) < limit:
        page = client.search_runs(ids, max_results=500, order_by=["attributes.start_time DESC"], page_token=token)
        for r in page:
            if not nested and "mlflow.parentRunId" in r.data.tags:
                continue
            row = run_row(r, names.get(r.info.experiment_id, r.info.experiment_id))
            if ((kinds and row.kind not in kinds) or (tier and row.tier != tier) or (model and row.model != model)
                    or (precision and row.precision != precision)):
                continue
            out.append(row)
            if len(out) >= limit:
                break
        token = page.token
        if not token:
            break
    return out
