"""Live: a running job's CPU, memory, GPU, throughput, loss and phases, refreshed in place.

Readings come from Prometheus when one is configured (sidebar or LOWRES_PROMETHEUS_URL), else from the run's
profiler JSONL file (``<output_dir>/profile.jsonl``). Only the panel below the pickers is a fragment with
``run_every``: it reruns on its own, so the page neither reloads nor loses the pickers' state."""

from __future__ import annotations

import time

import altair as alt
import pandas as pd
import streamlit as st

import queries
import queries_live

GIB = 1024**3
PHASES = ("data", "forward", "backward", "optimizer")
# (title, [(metric, legend name)], divisor, unit)
PANELS = [
    ("CPU (cores busy)", [("lowres_process_cpu_utilization_ratio", "run's processes")], 1, "cores"),
    ("Memory", [("lowres_process_resident_memory_bytes", "run RSS"),
                ("lowres_system_memory_used_bytes", "system used")], GIB, "GiB"),
    ("GPU", [("lowres_gpu_utilization_ratio", "busy fraction")], 1, "ratio"),
    ("GPU memory", [("lowres_gpu_memory_used_bytes", "used")], GIB, "GiB"),
    ("Throughput", [("lowres_train_tokens_per_second", "tokens/s")], 1, "tokens/s"),
    ("Loss", [("lowres_train_loss", "loss")], 1, "nats"),
]
METRICS = [m for _, series, _, _ in PANELS for m, _ in series]

st.title("Live")
prom = queries.prometheus_url()
top = st.columns([3, 1, 1])
refresh_s = top[1].number_input("Refresh every (s)", min_value=1, max_value=60, value=2, key="live_refresh")
minutes = top[2].number_input("Window (min)", min_value=1, max_value=240, value=15, key="live_minutes")
if prom:
    try:
        choices = queries_live.prometheus_label_values(prom, "run", "lowres_train_tokens_per_second")
    except (OSError, RuntimeError, ValueError) as exc:
        st.error(f"Prometheus at {prom} does not answer ({exc}); clear its URL in the sidebar to read JSONL files.")
        st.stop()
    source = top[0].selectbox("Run (Prometheus label `run`)", choices, key="live_run")
    st.caption(f"Prometheus: `{prom}`")
else:
    choices = queries_live.jsonl_files(queries.runs_dir())
    source = top[0].selectbox("Profiler file (newest first)", choices, key="live_file")
    st.caption(f"Reading `profile.jsonl` files under `{queries.runs_dir()}` (no Prometheus configured)")
if not source:
    st.info("No running or recent job found. Start one with `lowres train` (it writes profile.jsonl into its "
            "output_dir, and serves Prometheus metrics with `--set tracking.prometheus_port=0`).")
    st.stop()


def samples() -> pd.DataFrame:
    """The recent readings of the chosen run, in one long table."""
    if prom:
        step = max(1.0, 60 * minutes / 300)  # ~300 points per series whatever the window
        frames = [queries_live.prometheus_range(prom, f'{m}{{run="{source}"}}', minutes, step) for m in METRICS]
        return pd.concat(frames, ignore_index=True)
    df = queries_live.read_jsonl(source)
    # The window ends at the newest reading, not now: a finished run's file still shows its last minutes.
    return df[df["ts"] >= df["ts"].max() - 60 * minutes] if len(df) else df


@st.fragment(run_every=refresh_s)
def panel() -> None:
    try:
        df = samples()
    except (OSError, RuntimeError, ValueError) as exc:  # the server went away between two refreshes
        st.warning(f"cannot read the readings: {exc}")
        return
    if df.empty:
        st.info("No readings yet.")
        return
    last = df["ts"].max()
    run_id = next((r for r in df["run"].dropna().unique()), None)
    st.caption(f"{len(df)} readings · newest {time.time() - last:.0f} s ago · MLflow run `{run_id or 'none'}`")
    latest = df.sort_values("ts").groupby("name")["value"].last()
    cols = st.columns(4)
    for col, (label, name, div, fmt) in zip(cols, [
            ("tokens/s", "lowres_train_tokens_per_second", 1, "{:,.0f}"), ("loss", "lowres_train_loss", 1, "{:.4f}"),
            ("run RSS", "lowres_process_resident_memory_bytes", GIB, "{:.2f} GiB"),
            ("CPU cores busy", "lowres_process_cpu_utilization_ratio", 1, "{:.2f}")]):
        col.metric(label, fmt.format(latest[name] / div) if name in latest else "—")
    grid = st.columns(2)
    for i, (title, series, div, unit) in enumerate(PANELS):
        names = dict(series)
        part = df[df["name"].isin(names)]
        with grid[i % 2]:
            st.markdown(f"**{title}**")
            if part.empty:
                st.caption("no readings" + (" (no GPU sampler on this machine)" if "GPU" in title else ""))
                continue
            part = part.assign(what=part["name"].map(names) + part["series"].map(lambda s: "" if s == "value"
                                                                                   else f" [{s}]"),
                               y=part["value"] / div)
            st.altair_chart(alt.Chart(part).mark_line().encode(
                x=alt.X("time:T", title=None, axis=alt.Axis(format="%H:%M:%S")), y=alt.Y("y:Q", title=unit), color=alt.Color("what:N", title=None)
            ).properties(height=180), width="stretch")
    st.markdown("**Phases: seconds per step (from MLflow)**")
    if not run_id:
        st.caption("the run logs no MLflow run id")
        return
    hist = queries.metric_history(queries.mlflow_uri(), (run_id,), tuple(f"train/{p}_seconds" for p in PHASES))
    if hist.empty:
        st.caption("no phase timings logged yet")
        return
    hist = hist.assign(phase=hist["key"].str.removeprefix("train/").str.removesuffix("_seconds"))
    st.altair_chart(alt.Chart(hist).mark_bar().encode(
        x=alt.X("step:O"), y=alt.Y("sum(value):Q", title="seconds"), color=alt.Color("phase:N", sort=list(PHASES))
    ).properties(height=200), width="stretch")


panel()
