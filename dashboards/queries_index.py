"""The federation index (lowres.federated.index) for the Federations page: announced federations with their
join counts and state, the failure reports filed against them, and filing one. Cached like queries.py."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

INDEX_TTL_S = 10  # heartbeats come every 30 s by default: a 10 s lag shows a silent server in time

ENTRY_COLUMNS = ["federation", "state", "joinable", "superlink", "model", "rounds", "codec", "clients_wanted",
                 "joins", "heartbeat_age_s", "reports", "tls", "fed_run_id", "index_run_id"]
REPORT_COLUMNS = ["federation", "time", "category", "text", "index_run_id"]


@st.cache_data(ttl=INDEX_TTL_S, show_spinner="reading the federation index")
def index_entries(uri: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(entries, reports): every announced federation, newest first, and every report filed against one."""
    from lowres.federated import index

    now = time.time()
    rows, reports = [], []
    for e in index.entries(uri):
        rows.append({"federation": e.federation, "state": e.state(now), "joinable": e.state(now) == "running",
                     "superlink": e.superlink, "model": e.model, "rounds": e.rounds, "codec": e.codec,
                     "clients_wanted": e.clients_wanted, "joins": index.join_count(uri, e),
                     "heartbeat_age_s": e.age(now), "reports": len(e.reports), "tls": bool(e.root_cert),
                     "fed_run_id": e.fed_run_id, "index_run_id": e.run_id})
        reports += [{"federation": e.federation, "time": pd.to_datetime(r.get("time", 0), unit="s", utc=True),
                     "category": r.get("category", ""), "text": r.get("text", ""), "index_run_id": e.run_id}
                    for r in e.reports]
    return pd.DataFrame(rows, columns=ENTRY_COLUMNS), pd.DataFrame(reports, columns=REPORT_COLUMNS)


def file_report(uri: str, federation: str, category: str, text: str) -> None:
    """Store a report with the federation's index entry (LowresError on bad input) and refresh the cache."""
    from lowres.federated import index

    index.report(uri, federation, category, text)
    index_entries.clear()
