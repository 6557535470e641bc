"""Regressions: per machine and config, is the newest run slower than the ones before it?

Until the statistical check (`lowres regress`) exists this is a plain threshold: the newest finished run's
tokens/s against the median of the earlier runs of the same config on the same machine (fingerprint)."""

from __future__ import annotations

import os

import streamlit as st

import queries

st.title("Regressions")
uri = queries.mlflow_uri()
threshold = st.number_input("Flag when slower than the baseline by more than (%)", min_value=0.0, max_value=100.0,
                            value=float(os.environ.get("LOWRES_REGRESSION_THRESHOLD_PCT", "10")), step=1.0,
                            key="reg_threshold")
runs = queries.training_runs(uri)
table = queries.regressions(runs, threshold)
st.caption(f"MLflow: `{uri}` · baseline: median tokens/s of the earlier finished runs with the same config "
           "on the same machine")
if table.empty:
    st.info("No finished training runs yet: `lowres train` logs them.")
    st.stop()

flagged = table[table["status"] == "regression"]
c1, c2, c3 = st.columns(3)
c1.metric("Machine × config groups", len(table))
c2.metric("With a baseline", int((table["status"] != "no baseline").sum()))
c3.metric("Regressions", len(flagged))
if len(flagged):
    for _, row in flagged.iterrows():
        st.error(f"{row['machine']} ({row['fingerprint']}), {row['model']} r{row['rank']} b{row['batch']}: "
                 f"run {row['latest_run']} at {row['latest_tokens_per_s']:.1f} tokens/s is "
                 f"{-row['change_pct']:.1f}% slower than the baseline {row['baseline_tokens_per_s']:.1f}")
else:
    st.success(f"No run is more than {threshold:g}% slower than its baseline.")


def _color(status: str) -> str:
    return {"regression": "background-color: #f8d7da", "ok": "background-color: #d1e7dd"}.get(status, "")


st.dataframe(table.style.map(_color, subset=["status"]), hide_index=True, column_config={
    "latest_tokens_per_s": st.column_config.NumberColumn("latest tokens/s", format="%.1f"),
    "baseline_tokens_per_s": st.column_config.NumberColumn("baseline tokens/s", format="%.1f"),
    "change_pct": st.column_config.NumberColumn("change %", format="%+.1f")})
