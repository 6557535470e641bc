"""Federations: live and past `lowres fed` runs, several at once — rounds, bytes, centralised and federated eval
(loss and token accuracy per round), each client's health (online/offline by its last report) and failures.

Read from MLflow: a federation is a parent run (tag ``lowres.command=fed``), each client a child run; its
``fed/...`` metrics are plotted whatever they are named. With Prometheus configured, a client's last report
comes from ``lowres_fed_client_last_report_timestamp_seconds`` instead of its newest MLflow metric.

Each federation's health (lowres.federated.health): running, stalled (beating, no round progress), crashed
(RUNNING without an end marker and no heartbeat, or its server process gone), finished or failed. A crashed
one still RUNNING in MLflow is ended FAILED here, tagged crashed, when the page notices."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from profiler.sinks.mlflow import redact_uri

import queries
import queries_index
import queries_live

# lowres.federated.monitor's per-round keys worth a chart by default; the picker offers every fed/ key
PER_ROUND = ["fed/central_eval_loss", "fed/federated_eval_loss", "fed/train_loss", "fed/round_seconds",
             "fed/bytes_down", "fed/bytes_up", "fed/clients_accepted", "fed/clients_failed"]
# centralised (the server's holdout) beside federated (the clients' own eval data) eval, per figure
EVAL = {"eval loss": ("fed/central_eval_loss", "fed/federated_eval_loss"),
        "token accuracy": ("fed/central_eval_accuracy", "fed/federated_eval_accuracy")}

st.title("Federations")
uri = queries.mlflow_uri()
feds, clients = queries.federations(uri)
st.caption(f"MLflow: `{redact_uri(uri)}`")
ended = queries.end_crashed_federations(uri, feds) if not feds.empty else []
if ended:
    st.warning(f"Crashed, ended FAILED just now: {', '.join(ended)} (no heartbeat, or the server process is gone).")
    feds, clients = queries.federations(uri)
if feds.empty:
    st.info(queries.store_missing(uri) or "No federations yet: `lowres fed` logs one parent run per federation and a child run per client.")
    st.stop()

top = st.columns([3, 1])
names = feds["federation"].tolist()
chosen = top[0].multiselect("Federations", names, default=names[:5], key="fed_pick")
offline_after = top[1].number_input("Offline after (s) without a report", min_value=5, max_value=86400, value=120,
                                    key="fed_offline")
feds = feds[feds["federation"].isin(chosen)]
clients = clients.merge(feds[["run_id", "federation"]], left_on="federation_run_id", right_on="run_id",
                        suffixes=("", "_fed")).drop(columns=["run_id_fed"])

prom_last = None
prom = queries.prometheus_url()
if prom:
    try:
        prom_last = {(lb.get("federation"), lb.get("client")): v for lb, v in
                     queries_live.prometheus_instant(prom, "lowres_fed_client_last_report_timestamp_seconds")}
    except (OSError, RuntimeError, ValueError) as exc:
        st.warning(f"Prometheus at {prom} does not answer ({exc}); last reports come from MLflow.")
health = queries.client_health(clients, offline_after, prometheus_last=prom_last)

c1, c2, c3, c4 = st.columns(4)
c1.metric("Federations", len(feds))
c2.metric("Running", int((feds["health"] == "running").sum()))
c3.metric("Clients online", int((health["health"] == "online").sum()))
c4.metric("Clients offline", int((health["health"] == "offline").sum()))

HEALTH_COLOURS = {"running": "#d1e7dd", "finished": "#cfe2ff", "stalled": "#fff3cd", "crashed": "#f8d7da",
                  "failed": "#f8d7da"}
st.subheader("Federations")
stalled = feds[feds["health"] == "stalled"]  # alive and stuck: someone should look now
for name, why in zip(stalled["federation"], stalled["health_reason"]):
    st.error(f"{name} is stalled: {why}")
st.dataframe(feds[["federation", "health", "health_reason", "status", "rounds", "eval_loss", "train_loss",
                   "clients_accepted", "bytes_sent", "bytes_received", "failures", "rejected", "started",
                   "heartbeat_age_s", "run_id"]].style.map(
    lambda h: f"background-color: {HEALTH_COLOURS[h]}" if h in HEALTH_COLOURS else "", subset=["health"]),
    hide_index=True,
    column_config={"heartbeat_age_s": st.column_config.NumberColumn("seconds since heartbeat", format="%.0f")})

st.subheader("Clients")
health = health.assign(last_report=pd.to_datetime(health["last_report_s"], unit="s", utc=True))
order = ["federation", "client", "health", "seconds_since_report", "last_report", "status", "failures",
         "train_loss", "tokens_per_s", "bytes_up", "run_id"]
st.dataframe(health[order].style.map(
    lambda h: "background-color: #f8d7da" if h == "offline" else "background-color: #d1e7dd", subset=["health"]),
    hide_index=True, column_config={
        "seconds_since_report": st.column_config.NumberColumn("seconds since report", format="%.0f")})

st.subheader("Evaluation per round")
st.caption("Centralised: the global adapter on the server's held-out records after each round. Federated: the "
           "same adapter on each client's own eval data, weighted by the examples each read (clients evaluate the "
           "global they receive, so round r's figure arrives with round r+1). Round 0 is the starting adapter. "
           "Token accuracy: top-1 next-token accuracy on the label tokens.")
eval_keys = tuple(k for pair in EVAL.values() for k in pair)
ev = queries.metric_history(uri, tuple(feds["run_id"]), eval_keys).merge(feds[["run_id", "federation"]], on="run_id")
if ev.empty:
    st.info("No eval figures logged yet (a federation without a central holdout or client eval data has none).")
else:
    ev = ev.assign(eval=ev["key"].map({k: ("centralised" if i == 0 else "federated")
                                       for pair in EVAL.values() for i, k in enumerate(pair)}))
    cols = st.columns(2)
    for col, (title, pair) in zip(cols, EVAL.items()):
        part = ev[ev["key"].isin(pair)]
        with col:
            st.markdown(f"**{title}**")
            if part.empty:
                st.caption("not logged")
                continue
            st.altair_chart(alt.Chart(part).mark_line(point=True).encode(
                x=alt.X("step:Q", title="round"), y=alt.Y("value:Q", title=title, scale=alt.Scale(zero=False)),
                color="federation:N", strokeDash=alt.StrokeDash("eval:N", title="eval"),
                tooltip=["federation", "eval", "step", "value"]).properties(height=220), width="stretch")

keys = sorted({k for ks in feds["fed_metrics"] for k in ks.split(",") if k and not k.endswith("_total")})
preferred = [k for k in PER_ROUND if k in keys] or keys[:6]
shown = st.multiselect("Per-round metrics", keys, default=preferred, key="fed_metrics")
if shown:
    st.subheader("Per round")
    hist = queries.metric_history(uri, tuple(feds["run_id"]), tuple(shown))
    hist = hist.merge(feds[["run_id", "federation"]], on="run_id")
    grid = st.columns(2)
    for i, key in enumerate(shown):
        part = hist[hist["key"] == key]
        with grid[i % 2]:
            st.markdown(f"**{key}**")
            st.altair_chart(alt.Chart(part).mark_line(point=True).encode(
                x=alt.X("step:Q", title="round"), y=alt.Y("value:Q", title=None), color="federation:N"
            ).properties(height=180), width="stretch")

# ---------------------------------------------------------------------------------------------- the index
st.subheader("Joinable federations (index)")
try:
    entries, reports = queries_index.index_entries(uri)
except Exception as exc:  # an MLflow server that does not answer: the rest of the page still shows
    entries, reports = None, None
    st.warning(f"The federation index on {redact_uri(uri)} could not be read ({type(exc).__name__}: {exc}).")
if entries is not None and entries.empty:
    st.info("No federation is announced: `lowres fed run --superlink HOST:PORT --announce` lists one here, and "
            "nodes join it with `lowres fed join NAME --data-path FILE`.")
elif entries is not None:
    live = queries.federations(uri)[0][["run_id", "health", "rounds", "eval_loss", "clients_accepted"]].rename(
        columns={"run_id": "fed_run_id", "rounds": "rounds_done"})
    shown_entries = entries.merge(live, on="fed_run_id", how="left")
    st.caption("Join one with `lowres fed join NAME --data-path FILE --tracking-uri <this MLflow>`; only a running "
               "federation with a fresh heartbeat is joinable.")
    st.dataframe(shown_entries[["federation", "state", "joinable", "joins", "clients_wanted", "rounds_done", "rounds",
                                "eval_loss", "clients_accepted", "superlink", "model", "codec", "tls",
                                "heartbeat_age_s", "reports", "index_run_id"]], hide_index=True,
                 column_config={"heartbeat_age_s": st.column_config.NumberColumn("seconds since heartbeat",
                                                                                 format="%.0f")})
    st.markdown("**Failure reports**")
    if reports.empty:
        st.caption("No reports yet.")
    else:
        st.dataframe(reports.sort_values("time", ascending=False), hide_index=True)
    if "report_filed" in st.session_state:
        st.success(f"Report filed with {st.session_state.pop('report_filed')}.")
    with st.form("fed_report", clear_on_submit=True):
        st.markdown("Report a failure (also: `lowres fed report NAME --category … --text …`)")
        cols = st.columns([2, 1])
        target = cols[0].selectbox("Federation", sorted(set(entries["federation"])), key="report_fed")
        category = cols[1].selectbox("Category", ["bug", "connection", "malicious"], key="report_category")
        text = st.text_area("What went wrong", max_chars=2000, key="report_text")
        if st.form_submit_button("File report"):
            from lowres.errors import LowresError

            try:
                queries_index.file_report(uri, target, category, text)
                st.session_state["report_filed"] = target
                st.rerun()  # the reports table above shows it
            except LowresError as exc:
                st.error(str(exc))
