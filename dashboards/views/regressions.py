"""Regressions: per machine and config, is the newest run slower than the ones before it?

The rule of `lowres regress`: step times of the newest finished run against the pooled steps of the earlier
runs of the same config hash on the same machine (fingerprint) — the Hodges–Lehmann ratio with its
distribution-free interval; a regression is a ratio above 1 + threshold whose whole interval lies above 1."""

from __future__ import annotations

import os

import streamlit as st

from profiler.sinks.mlflow import redact_uri

import queries

st.title("Regressions")
uri = queries.mlflow_uri()
threshold = st.number_input("Relative change that counts (0.05 = 5 %, as `lowres regress --threshold`)",
                            min_value=0.0, max_value=0.99, step=0.01, format="%.2f",
                            value=float(os.environ.get("LOWRES_REGRESSION_THRESHOLD", "0.05")), key="reg_threshold")
runs = queries.training_runs(uri)
done = runs[runs["status"] == "FINISHED"] if len(runs) else runs
steps = queries.step_seconds(uri, tuple(done["run_id"])) if len(done) else {}
table = queries.regressions(runs, threshold, steps)
st.caption(f"MLflow: `{redact_uri(uri)}` · per machine and config hash: the newest finished run's step times against "
           "the earlier runs' (Hodges–Lehmann ratio, 95 % interval), as `lowres regress` judges them")
if table.empty:
    st.info(queries.store_missing(uri) or "No finished training runs yet: `lowres train` logs them.")
    st.stop()

flagged = table[table["status"] == "regression"]
judged = table[~table["status"].isin(["no baseline", "too few steps"])]
c1, c2, c3 = st.columns(3)
c1.metric("Machine × config groups", len(table))
c2.metric("With a baseline", len(judged))
c3.metric("Regressions", len(flagged))
if len(flagged):
    for _, row in flagged.iterrows():
        st.error(f"{row['machine']} ({row['fingerprint']}), {row['model']} r{row['rank']} b{row['batch']}: "
                 f"run {row['latest_run']} takes ×{row['ratio']:.3f} the baseline's step time "
                 f"({row['low']:.3f}–{row['high']:.3f})")
elif judged.empty:
    # nothing was compared: saying "all clear" here would claim a check that did not happen
    st.warning("Nothing to compare yet: no machine × config has two finished runs. Run the same config again "
               "(e.g. `lowres train` twice) and the newest is judged against the earlier ones.")
else:
    st.success(f"No regression in {len(judged)} group{'s' if len(judged) != 1 else ''} with a baseline: no run's "
               f"step time is clearly more than {threshold:.0%} above its baseline's.")


def _color(status: str) -> str:
    return {"regression": "background-color: #f8d7da", "no change": "background-color: #d1e7dd",
            "improved": "background-color: #d1e7dd"}.get(status, "")


st.dataframe(table.style.map(_color, subset=["status"]), hide_index=True, column_config={
    "latest_tokens_per_s": st.column_config.NumberColumn("latest tokens/s", format="%.1f"),
    "baseline_tokens_per_s": st.column_config.NumberColumn("baseline tokens/s", format="%.1f"),
    "ratio": st.column_config.NumberColumn("step time ratio", format="%.3f"),
    "low": st.column_config.NumberColumn("interval low", format="%.3f"),
    "high": st.column_config.NumberColumn("interval high", format="%.3f"),
    "change_pct": st.column_config.NumberColumn("change %", format="%+.1f")})
