"""The lowres dashboard: `lowres dash` runs it (or `streamlit run dashboards/streamlit_app.py`).

This file only sets up the page, the data sources in the sidebar and the navigation; each page lives in
views/ (not pages/: Streamlit would also serve a pages/ folder by itself, so a bookmarked /compare
opened that page without this navigation and the data-source sidebar) and reads its data through queries.py.
"""

from __future__ import annotations

import os

import streamlit as st

st.set_page_config(page_title="lowres", layout="wide")

PAGES = [
    st.Page("views/advisor.py", title="Advisor", default=True),
    st.Page("views/live.py", title="Live"),
    st.Page("views/compare.py", title="Compare"),
    st.Page("views/regressions.py", title="Regressions"),
    st.Page("views/federations.py", title="Federations"),
]
page = st.navigation(PAGES)

with st.sidebar.expander("Data sources"):
    # Keys are read by queries.py; the defaults come from the environment `lowres dash` sets.
    from profiler.sinks.mlflow import resolve_tracking_uri

    st.text_input("MLflow tracking URI", value=resolve_tracking_uri(None), key="mlflow_uri")
    st.text_input("Prometheus URL (empty: read the run's JSONL file)",
                  value=os.environ.get("LOWRES_PROMETHEUS_URL", ""), key="prometheus_url")
    st.text_input("Runs folder (profile.jsonl files)", value=os.environ.get("LOWRES_RUNS_DIR", "runs"),
                  key="runs_dir")

page.run()
