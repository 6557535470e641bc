"""Compare: MLflow runs side by side across machines (hardware fingerprints), precisions and ranks."""

from __future__ import annotations

import altair as alt
import streamlit as st

from profiler.sinks.mlflow import redact_uri

import queries

st.title("Compare")
uri = queries.mlflow_uri()
runs = queries.training_runs(uri)
st.caption(f"MLflow: `{redact_uri(uri)}` · tokens/s and MFU leave out each run's warm-up steps, as `lowres train` reports")
if runs.empty:
    st.info(queries.store_missing(uri) or "No training runs in this MLflow store yet: `lowres train` logs one.")
    st.stop()

filters = st.columns(5)
picked = {}
for col, (field, label) in zip(filters, [("machine", "Machine"), ("model", "Model"), ("precision", "Precision"),
                                          ("quant", "Quantization"), ("rank", "LoRA rank")]):
    values = sorted(runs[field].dropna().unique().tolist())
    picked[field] = col.multiselect(label, values, default=values, key=f"cmp_{field}")
view = runs
for field, values in picked.items():
    view = view[view[field].isin(values)]
only_finished = st.checkbox("Finished runs only", value=False, key="cmp_finished")
if only_finished:
    view = view[view["status"] == "FINISHED"]

st.metric("Runs shown", len(view))
table = view[["run", "run_id", "machine", "fingerprint", "model", "precision", "quant", "rank", "batch", "seq_len",
              "steps", "tokens_per_s", "mfu", "peak_memory_gib", "loss", "eval_loss", "status", "started"]]
st.dataframe(table, hide_index=True, column_config={
    "tokens_per_s": st.column_config.NumberColumn("tokens/s", format="%.1f"),
    "mfu": st.column_config.NumberColumn("MFU", format="%.4f"),
    "peak_memory_gib": st.column_config.NumberColumn("peak memory (GiB)", format="%.3f"),
    "loss": st.column_config.NumberColumn("loss", format="%.4f"),
    "eval_loss": st.column_config.NumberColumn("eval loss", format="%.4f")})
if view.empty:
    st.stop()

label = view.assign(label=view["run"] + " · " + view["machine"] + " · r" + view["rank"].astype(str))
a, b = st.columns(2)
for col, field, title in ((a, "tokens_per_s", "tokens/s"), (b, "mfu", "MFU")):
    col.subheader(title)
    col.altair_chart(alt.Chart(label).mark_bar().encode(
        x=alt.X(f"{field}:Q", title=title), y=alt.Y("label:N", title=None, sort="-x"),
        color=alt.Color("machine:N"), tooltip=["run", "machine", "precision", "rank", field]),
        width="stretch")
a.subheader("Peak memory against throughput")
a.altair_chart(alt.Chart(label).mark_circle(size=90).encode(
    x=alt.X("peak_memory_gib:Q", title="peak memory (GiB)"), y=alt.Y("tokens_per_s:Q", title="tokens/s"),
    color="machine:N", shape="precision:N", tooltip=["run", "machine", "precision", "quant", "rank", "batch"]),
    width="stretch")

history = queries.metric_history(uri, tuple(view["run_id"].head(20)), ("train/loss",))
b.subheader("Training loss (up to 20 runs)")
if history.empty:
    b.info("No loss history logged.")
else:
    names = dict(zip(label["run_id"], label["label"]))
    history = history.assign(run=history["run_id"].map(names))
    b.altair_chart(alt.Chart(history).mark_line().encode(
        x="step:Q", y=alt.Y("value:Q", title="loss"), color=alt.Color("run:N", legend=alt.Legend(orient="bottom"))),
        width="stretch")
