"""Cached readers of live figures: a run's profiler JSONL file and Prometheus (see queries.py for the rest)."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from queries import LIVE_TTL_S


# ---------------------------------------------------------------------------------------------- JSONL
@st.cache_data(ttl=LIVE_TTL_S * 5, show_spinner=False)
def jsonl_files(folder: str) -> list[str]:
    """``profile.jsonl`` files under ``folder``, most recently written first."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return []
    found = [p for p in root.rglob("profile.jsonl") if p.is_file()]
    return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def read_jsonl(path: str, max_bytes: int = 8 << 20) -> pd.DataFrame:
    """The samples of a profiler JSONL file (its last ``max_bytes``: a live view needs the recent past)."""
    p = Path(path)
    try:
        stat = p.stat()
    except OSError:
        return _samples_frame([])
    return _read_jsonl(str(p), stat.st_mtime_ns, stat.st_size, max_bytes)


@st.cache_data(ttl=LIVE_TTL_S * 60, max_entries=16, show_spinner=False)
def _read_jsonl(path: str, mtime_ns: int, size: int, max_bytes: int) -> pd.DataFrame:
    # Keyed on mtime and size: an unchanged file is parsed once however often the page refreshes.
    with open(path, "rb") as f:
        if size > max_bytes:
            f.seek(size - max_bytes)
            f.readline()  # drop the partial first line
        lines = f.read().splitlines()
    rows = []
    for line in lines:
        try:
            d = json.loads(line)
            rows.append({"ts": float(d["ts"]), "name": str(d["name"]), "value": float(d["value"]),
                         "labels": d.get("labels") or {}})
        except (ValueError, KeyError, TypeError):
            continue  # a line being written right now
    return _samples_frame(rows)


def _samples_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["ts", "name", "value", "labels"])
    df["time"] = pd.to_datetime(df["ts"], unit="s", utc=True)
    df["series"] = [_series_name(lb) for lb in df["labels"]]
    df["run"] = [lb.get("run") for lb in df["labels"]]
    return df


def _series_name(labels: dict) -> str:
    """What tells series of one metric apart in a chart: the per-device labels, not run or host."""
    parts = [f"{k}={labels[k]}" for k in ("gpu", "cpu", "device", "phase", "client") if k in labels]
    return ",".join(parts) or "value"


# ---------------------------------------------------------------------------------------------- Prometheus
def _prom_get(base: str, path: str, params: dict[str, str], timeout: float = 5.0) -> Any:
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:  # file:// would read (and show) local files
        raise ValueError(f"the Prometheus URL must be http(s)://HOST:PORT, got scheme {parts.scheme!r}")
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus {url}: {body.get('error', body)}")
    return body["data"]


@st.cache_data(ttl=LIVE_TTL_S * 5, show_spinner=False)
def prometheus_label_values(base: str, label: str, metric: str) -> list[str]:
    """Values of ``label`` on series of ``metric`` (e.g. the runs that report throughput)."""
    return sorted(_prom_get(base, f"/api/v1/label/{label}/values", {"match[]": metric}))


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def prometheus_range(base: str, query: str, minutes: float, step_s: float) -> pd.DataFrame:
    """A range query over the last ``minutes``, as (time, series, value) rows in the JSONL reader's shape."""
    end = time.time()
    data = _prom_get(base, "/api/v1/query_range", {"query": query, "start": f"{end - 60 * minutes:.3f}",
                                                   "end": f"{end:.3f}", "step": f"{step_s:g}"})
    rows = [{"ts": float(t), "name": res["metric"].get("__name__", query), "value": float(v),
             "labels": res["metric"]} for res in data["result"] for t, v in res["values"]]
    return _samples_frame(rows)


@st.cache_data(ttl=LIVE_TTL_S * 5, show_spinner=False)
def prometheus_instant(base: str, query: str) -> list[tuple[dict, float]]:
    """An instant query: (labels, value) per series."""
    data = _prom_get(base, "/api/v1/query", {"query": query})
    return [(res["metric"], float(res["value"][1])) for res in data["result"]]
