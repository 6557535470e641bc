"""Everything the dashboard reads, behind ``st.cache_data`` with a TTL, so pages only lay out and a rerun
(every widget change, every live tick) does not hit the stores again. Readers return DataFrames or dicts.

This module: where the data lives, MLflow runs (compare, regressions) and federations. Beside it:
queries_live.py (a run's JSONL file, Prometheus) and queries_advisor.py (hardware profiles, estimates).

Where the data lives comes from the sidebar (``streamlit_app.py``) or, when a page runs on its own, from the
environment that ``lowres dash`` sets: ``MLFLOW_TRACKING_URI``, ``LOWRES_PROMETHEUS_URL``, ``LOWRES_RUNS_DIR``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from typing import Any

import pandas as pd
import streamlit as st

RUNS_TTL_S = 30  # MLflow history: runs finish in minutes; a 30 s lag is fine and spares the store
LIVE_TTL_S = 1  # live readings: short enough that each refresh of the Live page shows the newest samples
GIB = 1024**3

FED_PREFIX = "fed/"
TAG_COMMAND = "lowres.command"
TAG_FEDERATION = "lowres.federation"
CLIENT_TAGS = ("lowres.client", "lowres.fed.client")
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own tag of a nested run


# ---------------------------------------------------------------------------------------------- sources
def mlflow_uri() -> str:
    """The tracking URI the sidebar names, else lowres's rule (``$MLFLOW_TRACKING_URI``, else ./mlflow.db)."""
    from profiler.sinks.mlflow import resolve_tracking_uri

    return st.session_state.get("mlflow_uri") or resolve_tracking_uri(None)


def prometheus_url() -> str | None:
    """Base URL of a Prometheus server, or None when none is configured (the Live page then reads JSONL)."""
    url = st.session_state.get("prometheus_url", os.environ.get("LOWRES_PROMETHEUS_URL", ""))
    return url.rstrip("/") or None


def runs_dir() -> str:
    """Where the Live page looks for ``*/profile.jsonl`` files (the output_dir of runs)."""
    return st.session_state.get("runs_dir") or os.environ.get("LOWRES_RUNS_DIR", "runs")


def store_missing(uri: str) -> str | None:
    """A sentence when ``uri`` names a SQLite store that does not exist, else None. Opening it would create an
    empty database (MLflow does) wherever the dashboard happens to run; the pages say so instead."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    if os.path.exists(path):
        return None
    return (f"No MLflow store at `{os.path.abspath(path)}` yet: nothing has been logged there. Run `lowres train` "
            "in that folder, or point the dashboard at your store (`lowres dash --tracking-uri URI`, or the sidebar).")


def _client(uri: str):
    from lowres.tracking.runs import client

    return client(uri)


# ---------------------------------------------------------------------------------------------- MLflow runs
def _param_int(params: dict, key: str) -> int | None:
    try:
        return int(params[key])
    except (KeyError, ValueError):
        return None


def _config_key(params: dict[str, str]) -> str:
    """A short hash of the params that decide a run's results: the logged config minus where it writes and
    logs (as ``RunConfig.config_hash`` leaves out output_dir and tracking), so reruns of one config group
    together even when their output folders differ."""
    kept = {k: v for k, v in params.items() if k.startswith("config.")
            and k != "config.output_dir" and not k.startswith("config.tracking.")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def _history(c, run_id: str, key: str) -> list:
    return sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)


def _run_figures(uri: str, run) -> dict[str, Any]:
    # A run that has ended never changes: its figures are read once. A running one is read again each TTL.
    version = run.info.end_time if run.info.status != "RUNNING" else int(time.time() // RUNS_TTL_S)
    return _figures(uri, run.info.run_id, version, {k: v for k, v in run.data.params.items()
                                                     if k.startswith("mfu.") or k.endswith("warmup_ignore_steps")})


@st.cache_data(max_entries=5000, show_spinner=False)
def _figures(uri: str, rid: str, version: int | None, params: dict[str, str]) -> dict[str, Any]:
    """Throughput, MFU and peak memory of one run, computed as ``lowres train`` reports them: tokens/s is all
    tokens over all seconds of the steps after ``warmup_ignore_steps`` (tokens = tokens/s × seconds per
    step), MFU that throughput × FLOPs per token ÷ the roofline logged with the run, peak the largest step.
    ``version`` only keys the cache."""
    c = _client(uri)
    tps = _history(c, rid, "train/tokens_per_second")
    secs = {m.step: m.value for m in _history(c, rid, "train/step_seconds")}
    skip = _param_int(params, "config.train.warmup_ignore_steps") or 0
    timed = [m for m in tps if m.step in secs][skip:] or [m for m in tps if m.step in secs]
    seconds = sum(secs[m.step] for m in timed)
    tokens_per_s = sum(m.value * secs[m.step] for m in timed) / seconds if seconds > 0 else None
    try:
        fpt, peak_flops = float(params["mfu.flops_per_token"]), float(params["mfu.roofline_flops_per_s"])
        mfu = tokens_per_s * fpt / peak_flops if tokens_per_s and peak_flops > 0 else None
    except (KeyError, ValueError):
        mfu = None
    peaks, scale = _history(c, rid, "train/peak_memory_megabytes"), 1e6
    if not peaks:  # a run logged before memory went to MLflow in megabytes
        peaks, scale = _history(c, rid, "train/peak_memory_bytes"), 1.0
    return {"tokens_per_s": tokens_per_s, "mfu": mfu,
            "peak_memory_gib": max(m.value for m in peaks) * scale / GIB if peaks else None,
            "steps": max((m.step for m in tps), default=0)}


def _search_runs(uri: str, max_results: int = 500) -> list:
    if store_missing(uri):
        return []
    c = _client(uri)
    exps = {e.experiment_id: e.name for e in c.search_experiments()}
    if not exps:
        return []
    runs = c.search_runs(list(exps), max_results=max_results, order_by=["attributes.start_time DESC"])
    for r in runs:
        r.experiment_name = exps.get(r.info.experiment_id, r.info.experiment_id)
    return runs


@st.cache_data(ttl=RUNS_TTL_S, show_spinner="reading MLflow runs")
def training_runs(uri: str) -> pd.DataFrame:
    """One row per training run (a run that logged ``train/tokens_per_second``), newest first."""
    rows = []
    for r in _search_runs(uri):
        m, p, t = r.data.metrics, r.data.params, r.data.tags
        if "train/tokens_per_second" not in m:
            continue
        rows.append({
            "run_id": r.info.run_id, "run": r.info.run_name, "experiment": r.experiment_name,
            "status": r.info.status, "started": pd.to_datetime(r.info.start_time, unit="ms", utc=True),
            "machine": t.get("lowres.hardware.tier", "unknown"),
            "fingerprint": t.get("lowres.hardware.fingerprint", "unknown"),
            # the run's own lowres.config_hash (what `lowres regress` groups by); older runs: a hash of params
            "config": t.get("lowres.config_hash") or _config_key(p), "config_hash_tag": t.get("lowres.config_hash"),
            "model": p.get("config.model.name", "unknown"),
            # the dtype the run resolved ("auto" in the config becomes bf16 or fp32 on the machine)
            "precision": p.get("model.dtype") or p.get("config.precision.compute", "unknown"),
            "quant": p.get("config.precision.quant", "unknown"),
            "rank": _param_int(p, "config.lora.rank"), "batch": _param_int(p, "config.train.batch_size"),
            "seq_len": _param_int(p, "config.data.max_length"),
            **_run_figures(uri, r),
            "loss": m.get("train/loss"), "eval_loss": m.get("eval/loss"),
            "weights": t.get("weights", "unknown"),
        })
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


RUN_COLUMNS = ["run_id", "run", "experiment", "status", "started", "machine", "fingerprint", "config",
               "config_hash_tag", "model", "precision", "quant", "rank", "batch", "seq_len", "tokens_per_s",
               "mfu", "peak_memory_gib", "steps", "loss", "eval_loss", "weights"]


@st.cache_data(ttl=LIVE_TTL_S * 5, show_spinner=False)
def metric_history(uri: str, run_ids: tuple[str, ...], keys: tuple[str, ...]) -> pd.DataFrame:
    """Long table (run_id, key, step, value, ts) of the given metrics of the given runs."""
    if store_missing(uri):
        return pd.DataFrame(columns=["run_id", "key", "step", "value", "ts"])
    c = _client(uri)
    rows = [{"run_id": rid, "key": key, "step": m.step, "value": m.value,
             "ts": pd.to_datetime(m.timestamp, unit="ms", utc=True)}
            for rid in run_ids for key in keys for m in c.get_metric_history(rid, key)]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value", "ts"])


@st.cache_data(ttl=RUNS_TTL_S, show_spinner="reading step times")
def step_seconds(uri: str, run_ids: tuple[str, ...]) -> dict[str, list[float]]:
    """Per run, ``train/step_seconds`` of each step after the run's ``warmup_ignore_steps``: the values
    `lowres regress` compares for a train run."""
    if store_missing(uri) or not run_ids:
        return {}
    c = _client(uri)
    out = {}
    for rid in run_ids:
        warmup = _param_int(c.get_run(rid).data.params, "config.train.warmup_ignore_steps")
        warmup = 2 if warmup is None else warmup
        out[rid] = [m.value for m in _history(c, rid, "train/step_seconds") if m.step > warmup]
    return out


def regressions(runs: pd.DataFrame, threshold: float, steps: dict[str, list[float]],
                confidence: float = 0.95) -> pd.DataFrame:
    """Per machine (fingerprint) and config (the run's ``lowres.config_hash``): the newest finished run against
    the earlier ones by `lowres regress`'s rule — the Hodges–Lehmann ratio of step times (candidate over the
    pooled baseline steps) with its distribution-free interval; ``regression`` when the ratio is above
    1 + ``threshold`` and its whole interval above 1, ``improved`` for the mirror image. A group with one run
    has ``no baseline``; fewer than 2 steps on a side, ``too few steps``."""
    from lowres.bench.stats import ratio_test

    cols = ["machine", "fingerprint", "config", "model", "precision", "rank", "batch", "latest_run",
            "latest_run_id", "latest_tokens_per_s", "baseline_tokens_per_s", "baseline_runs", "ratio", "low", "high",
            "change_pct", "status"]
    done = runs[(runs["status"] == "FINISHED") & runs["tokens_per_s"].notna()] if len(runs) else runs
    rows = []
    for (fp, cfg), group in done.groupby(["fingerprint", "config"], sort=True) if len(done) else []:
        group = group.sort_values("started")
        latest, earlier = group.iloc[-1], group.iloc[:-1]
        row = {"machine": latest["machine"], "fingerprint": fp, "config": cfg, "model": latest["model"],
               "precision": latest["precision"], "rank": latest["rank"], "batch": latest["batch"],
               "latest_run": latest["run"], "latest_run_id": latest["run_id"],
               "latest_tokens_per_s": latest["tokens_per_s"],
               "baseline_tokens_per_s": statistics.median(earlier["tokens_per_s"]) if len(earlier) else None,
               "baseline_runs": len(earlier), "ratio": None, "low": None, "high": None, "change_pct": None,
               "status": "no baseline"}
        if len(earlier):
            base = [v for rid in earlier["run_id"] for v in steps.get(rid, [])]
            cand = steps.get(latest["run_id"], [])
            if len(base) < 2 or len(cand) < 2:
                row["status"] = "too few steps"
            else:
                t = ratio_test(base, cand, confidence=confidence)
                row.update(ratio=t.ratio, low=t.low, high=t.high, change_pct=100.0 * (t.ratio - 1.0),
                           status="regression" if t.regressed(threshold) else
                           "improved" if t.improved(threshold) else "no change")
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------------------------------------- federations
def _is_federation(run) -> bool:
    tags = run.data.tags
    if TAG_PARENT in tags:
        return False
    return tags.get(TAG_COMMAND) == "fed" or TAG_FEDERATION in tags or any(
        k.startswith(FED_PREFIX) for k in run.data.metrics)


def _last_report_s(run) -> float | None:
    """Unix time of a client's newest metric (its last report), else its end or start time."""
    objs = getattr(run.data, "_metric_objs", None) or []
    stamps = [m.timestamp for m in objs]
    ms = max(stamps) if stamps else (run.info.end_time or run.info.start_time)
    return None if ms is None else ms / 1000.0


def _first(metrics: dict[str, float], *keys: str) -> float | None:
    return next((metrics[k] for k in keys if k in metrics), None)


def _sum(c, run_id: str, key: str) -> float | None:
    """Sum over rounds of a per-round metric (bytes, failures), None if never logged."""
    hist = c.get_metric_history(run_id, key)
    return sum(m.value for m in hist) if hist else None


def _rounds(run) -> int | None:
    """The highest round (step) of the federation's per-round ``fed/...`` metrics."""
    steps = [m.step for m in getattr(run.data, "_metric_objs", None) or [] if m.key.startswith(FED_PREFIX)
             and not m.key.endswith("_total")]  # the totals are logged once, at close
    return max(steps) if steps else None


@st.cache_data(ttl=RUNS_TTL_S, show_spinner="reading federations")
def federations(uri: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(federations, clients), as lowres.federated.monitor logs them: a federation is a top-level run tagged
    ``lowres.command=fed`` with ``fed/...`` metrics per round (step = round); each client a child run
    (``mlflow.parentRunId``, tag ``lowres.client``) with ``fed/client/...`` metrics. Missing tags and metrics
    give empty cells, never errors."""
    from lowres.federated.health import classify_run

    runs = _search_runs(uri, max_results=2000)
    c = _client(uri) if runs else None
    parents = {r.info.run_id: r for r in runs if _is_federation(r)}
    fed_rows, client_rows = [], []
    for rid, r in parents.items():
        m = r.data.metrics
        health = classify_run(r)  # running | stalled | crashed | finished | failed, by heartbeat and end marker
        fed_rows.append({
            "run_id": rid, "federation": r.data.tags.get(TAG_FEDERATION) or r.info.run_name,
            "status": r.info.status, "started": pd.to_datetime(r.info.start_time, unit="ms", utc=True),
            "health": health.state, "health_reason": health.reason, "heartbeat_age_s": health.heartbeat_age_s,
            "rounds": _rounds(r),
            "eval_loss": _first(m, "fed/central_eval_loss", "fed/federated_eval_loss", "fed/eval_loss"),
            "train_loss": _first(m, "fed/train_loss"),
            "clients_accepted": _first(m, "fed/clients_accepted"),
            # totals are logged when the federation closes; while it runs, add up the rounds
            "bytes_sent": _first(m, "fed/bytes_sent_total") or _sum(c, rid, "fed/bytes_down"),
            "bytes_received": _first(m, "fed/bytes_received_total") or _sum(c, rid, "fed/bytes_up"),
            "failures": _sum(c, rid, "fed/clients_failed"), "rejected": _sum(c, rid, "fed/clients_rejected"),
            "fed_metrics": ",".join(sorted(k for k in m if k.startswith(FED_PREFIX)))})
    for r in runs:
        parent = r.data.tags.get(TAG_PARENT)
        if parent not in parents:
            continue
        m, tags, cid = r.data.metrics, r.data.tags, r.info.run_id
        client_rows.append({
            "federation_run_id": parent, "run_id": cid, "status": r.info.status,
            "client": next((tags[k] for k in CLIENT_TAGS if tags.get(k)), None) or r.info.run_name,
            "last_report_s": _last_report_s(r), "failures": _sum(c, cid, "fed/client/failed") or 0.0,  # logged only when one fails
            "bytes_up": _sum(c, cid, "fed/client/bytes_up"), "train_loss": _first(m, "fed/client/train_loss"),
            "tokens_per_s": _first(m, "fed/client/tokens_per_second")})
    feds = pd.DataFrame(fed_rows, columns=["run_id", "federation", "status", "started", "health", "health_reason",
                                           "heartbeat_age_s", "rounds", "eval_loss",
                                           "train_loss", "clients_accepted", "bytes_sent", "bytes_received",
                                           "failures", "rejected", "fed_metrics"])
    clients = pd.DataFrame(client_rows, columns=["federation_run_id", "client", "run_id", "status",
                                                 "last_report_s", "failures", "bytes_up", "train_loss",
                                                 "tokens_per_s"])
    return feds, clients


def end_crashed_federations(uri: str, feds: pd.DataFrame) -> list[str]:
    """End the RUNNING federations found crashed as FAILED, tagged crashed (lowres.federated.health), so the
    page never leaves one RUNNING. Each is judged again from a fresh read first (``feds`` may be 30 s old).
    Returns their names; the cached federations are dropped when one was ended."""
    from lowres.federated.health import classify_run, end_crashed

    ended = []
    dead = feds[(feds["status"] == "RUNNING") & (feds["health"] == "crashed")]
    for rid, name in zip(dead["run_id"], dead["federation"]):
        health = classify_run(_client(uri).get_run(rid))
        if health.state == "crashed":
            end_crashed(rid, health, "the dashboard's Federations page", uri)
            ended.append(name)
    if ended:
        federations.clear()
    return ended


def client_health(clients: pd.DataFrame, offline_after_s: float, now: float | None = None,
                  prometheus_last: dict[tuple[str, str], float] | None = None) -> pd.DataFrame:
    """Clients with a ``health``: ``finished`` when its run finished; ``offline`` when its last report
    (Prometheus' gauge when given, else its newest MLflow metric) is older than ``offline_after_s`` or its run
    failed; else ``online``. ``clients`` needs a ``federation`` (name) column."""
    now = time.time() if now is None else now
    out = clients.copy()
    if prometheus_last:
        out["last_report_s"] = [prometheus_last.get((f, c), s) for f, c, s in
                                zip(out["federation"], out["client"], out["last_report_s"])]
    out["seconds_since_report"] = [None if s is None or (isinstance(s, float) and math.isnan(s)) else now - s
                                   for s in out["last_report_s"]]
    out["health"] = [_health(status, age, offline_after_s)
                     for status, age in zip(out["status"], out["seconds_since_report"])]
    return out


def _health(status: str, age: float | None, offline_after_s: float) -> str:
    if status == "FINISHED":
        return "finished"  # a client that completed its part is not missing
    if status in ("FAILED", "KILLED") or age is None or age > offline_after_s:
        return "offline"
    return "online"
