"""`lowres regress`: did the candidate get slower or hungrier than the baseline? Distributions, not one number.

Runs are compared only with runs of the same config hash and hardware fingerprint: a different model, shape
or machine is a different experiment, not a regression. Each side may hold several runs per (config,
machine) — a git sha benchmarked three times — and their per-step values are pooled.

Per-step values: ``bench/step_seconds`` and ``bench/peak_memory_bytes`` of `lowres bench` runs (warm-up
already dropped); for a plain `lowres train` run, ``train/step_seconds`` / ``train/peak_memory_megabytes`` without
its first ``train.warmup_ignore_steps`` steps.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from lowres.bench import measure
from lowres.bench.selection import SelectionError, run_key
from lowres.bench.stats import RatioTest, ratio_test
from lowres.tracking.runs import TAG_GIT_SHA, TAG_VERSION_PREFIX

METRICS = {"step_time": (measure.STEP_SECONDS, "train/step_seconds"),
           "peak_memory": (measure.PEAK_MEMORY, "train/peak_memory_megabytes")}
_LEGACY = {"train/peak_memory_megabytes": ("train/peak_memory_bytes", 1e-6)}  # train runs logged before megabytes
_WATCHED_TAGS = (TAG_GIT_SHA, "lowres.bench.injected_sleep_s", "weights")


@dataclass
class Comparison:
    """One (config hash, fingerprint) present on both sides: a test per metric."""

    config_hash: str
    fingerprint: str
    workload: str
    baseline_runs: list[str]
    candidate_runs: list[str]
    tests: dict[str, RatioTest] = field(default_factory=dict)


@dataclass
class Report:
    """Everything `lowres regress` prints; ``regressions`` decides its exit code."""

    threshold: float
    comparisons: list[Comparison]
    unmatched: list[str]  # runs of either side with no partner (other config or machine)
    changes: list[tuple[str, str, str]]  # (what, baseline, candidate)

    @property
    def regressions(self) -> list[tuple[Comparison, str]]:
        return [(c, m) for c in self.comparisons for m, t in c.tests.items() if t.regressed(self.threshold)]


def regress(client, baseline: list, candidate: list, *, metrics: list[str], threshold: float = 0.05,
            confidence: float = 0.95) -> Report:
    """Compare the two sides' distributions for each (config hash, fingerprint) they share."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise SelectionError(f"unknown metric {unknown[0]!r}", hint=f"choose from {', '.join(METRICS)}")
    overlap = {r.info.run_id for r in baseline} & {r.info.run_id for r in candidate}
    if overlap:
        raise SelectionError(f"run {sorted(overlap)[0]} is on both sides",
                             hint="a run compared with itself says nothing; select different runs")
    base_groups, cand_groups = _groups(baseline), _groups(candidate)
    shared = [k for k in cand_groups if k in base_groups and None not in k]
    if not shared:
        raise SelectionError(
            "baseline and candidate share no config hash and hardware fingerprint, so nothing can be compared: "
            f"baseline has {_describe(base_groups)}; candidate has {_describe(cand_groups)}",
            hint="compare runs of the same workload on the same machine (lowres compare lists them)")
    comparisons = []
    for key in shared:
        b_runs, c_runs = base_groups[key], cand_groups[key]
        comp = Comparison(key[0], key[1], _workload(c_runs[0]), [r.info.run_id for r in b_runs],
                          [r.info.run_id for r in c_runs])
        for metric in metrics:
            b, c = _pooled(client, b_runs, metric), _pooled(client, c_runs, metric)
            if len(b) < 2 or len(c) < 2:
                raise SelectionError(f"{comp.workload}: too few {metric} values to compare ({len(b)} baseline, "
                                     f"{len(c)} candidate)", hint="benchmark with more steps or --repeats")
            comp.tests[metric] = ratio_test(b, c, confidence=confidence)
        comparisons.append(comp)
    unmatched = [r.info.run_id for k, rs in {**base_groups, **cand_groups}.items() if k not in shared for r in rs]
    return Report(threshold, comparisons, unmatched, what_changed(baseline, candidate))


def _groups(runs: list) -> dict[tuple, list]:
    out: dict[tuple, list] = defaultdict(list)
    for r in runs:
        out[run_key(r)].append(r)
    return dict(out)


def _describe(groups: dict[tuple, list]) -> str:
    return "; ".join(f"config {k[0] or '(none)'} on machine {k[1] or '(none)'} ({len(v)} runs)"
                     for k, v in groups.items())


def _workload(run) -> str:
    return run.data.tags.get("lowres.bench.workload") or run.info.run_name or run.info.run_id[:8]


def _pooled(client, runs: list, metric: str) -> list[float]:
    bench_key, train_key = METRICS[metric]
    out: list[float] = []
    for r in runs:
        if bench_key in r.data.metrics:
            out += [m.value for m in client.get_metric_history(r.info.run_id, bench_key)]
        else:  # a plain train run: its own series without the warm-up steps it leaves out of its means
            warmup = int(r.data.params.get("config.train.warmup_ignore_steps", 2))
            key, scale = (train_key, 1.0) if train_key in r.data.metrics or train_key not in _LEGACY \
                else _LEGACY[train_key]
            out += [m.value * scale for m in client.get_metric_history(r.info.run_id, key) if m.step > warmup]
    return out


def what_changed(baseline: list, candidate: list) -> list[tuple[str, str, str]]:
    """Versions, git sha, watched tags and params that differ between the sides (each side's values joined)."""
    def values(runs, get) -> str:
        return ", ".join(sorted({str(get(r)) for r in runs if get(r) is not None})) or "—"

    keys = sorted({k for r in baseline + candidate for k in r.data.tags if k.startswith(TAG_VERSION_PREFIX)})
    keys += [k for k in _WATCHED_TAGS if any(k in r.data.tags for r in baseline + candidate)]
    out = []
    for k in keys:
        b, c = values(baseline, lambda r: r.data.tags.get(k)), values(candidate, lambda r: r.data.tags.get(k))
        if b != c:
            out.append((k.removeprefix(TAG_VERSION_PREFIX) if k.startswith(TAG_VERSION_PREFIX) else k, b, c))
    for p in sorted({k for r in baseline + candidate for k in r.data.params}):
        b, c = values(baseline, lambda r: r.data.params.get(p)), values(candidate, lambda r: r.data.params.get(p))
        if b != c:
            out.append((f"param {p}", b, c))
    return out
