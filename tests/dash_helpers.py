"""Data for the dashboard tests: a temp MLflow store seeded by real `lowres train` runs of `tiny`, once per
test session (both dashboard test files share it), plus federation runs laid out as `lowres fed` logs them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from train_helpers import write_corpus

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
APP = DASHBOARDS / "streamlit_app.py"
PAGES = ("advisor", "live", "compare", "regressions", "federations")


@dataclass
class Seeded:
    """The store and what `lowres train --json` printed for each run (the figures the pages must show)."""

    root: Path
    uri: str
    runs_dir: Path
    results: dict[str, dict] = field(default_factory=dict)  # name -> `lowres train --json` output
    federations: dict[str, str] = field(default_factory=dict)  # federation name -> parent run id
    federations_at: float = 0.0  # when the last federation report was logged


_SEEDED: Seeded | None = None


def load_queries():
    """dashboards/queries.py as the app imports it (Streamlit puts the app's folder on sys.path)."""
    import importlib
    import sys

    if str(DASHBOARDS) not in sys.path:
        sys.path.insert(0, str(DASHBOARDS))
    return importlib.import_module("queries")


def _train(root: Path, data: Path, uri: str, name: str, rank: int, profiled: bool) -> dict:
    from lowres.cli.app import main

    sets = {"data.path": str(data), "data.tokenizer_vocab": 512, "tracking.mlflow_uri": uri,
            "tracking.experiment": "dash-test", "tracking.run_name": name, "train.warmup_steps": 1,
            "tracking.profiler_mode": "process" if profiled else '"off"', "tracking.jsonl": profiled,
            "tracking.profiler_interval": 0.2}
    args = ["train", "-q", "--json", "--model", "tiny", "--steps", "4", "--seq-len", "64", "--batch-size", "2",
            "--rank", str(rank), "-o", str(root / "runs" / name)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    return json.loads(out.getvalue())


def seed_federations(uri: str) -> dict[str, str]:
    """Two federations logged by the real lowres.federated.monitor.FedMonitor, as a `lowres fed` server logs
    them: "alpha" (clients c1, c2; c2 fails round 2) is left running, "beta" (client c1) is closed."""
    from lowres.federated.monitor import FedMonitor

    out = {}
    for fed, clients, finish in (("alpha", ("c1", "c2"), False), ("beta", ("c1",), True)):
        mon = FedMonitor(fed, tracking_uri=uri, experiment="dash-test-fed")
        for rnd in (1, 2, 3):
            mon.round_started(rnd)
            failed = 0
            for client in clients:
                mon.sent(client, 1000 * rnd)
                if (fed, client, rnd) == ("alpha", "c2", 2):
                    mon.failure(rnd, client, "timed out")
                    failed += 1
                else:
                    mon.reply(rnd, client, 400 * rnd, {"train_loss": 3.0 - rnd / 10, "tokens_per_second": 100.0})
            mon.round_done(rnd, {"round_seconds": 1.5, "bytes_down": 1000.0 * rnd * len(clients),
                                 "bytes_up": 400.0 * rnd * (len(clients) - failed),
                                 "clients_accepted": float(len(clients) - failed), "clients_failed": float(failed),
                                 "central_eval_loss": 3.0 - rnd / (10 if fed == "alpha" else 4),
                                 "central_eval_accuracy": 0.1 * rnd, "federated_eval_loss": 3.2 - rnd / 10,
                                 "federated_eval_accuracy": 0.05 * rnd})
        if finish:
            mon.close("FINISHED", step=3)
        else:
            mon.flush()  # left running: its queued MLflow writes are in the store before the page reads them
        out[fed] = mon.run_id
    return out


def seeded_store(base: Path) -> Seeded:
    """Three real runs — a (rank 4, profiled: profile.jsonl), b (rank 8), c (rank 4 again: a's config, so a is
    its regression baseline) — and two federations; made once per session."""
    global _SEEDED
    if _SEEDED is not None:
        return _SEEDED
    root = base / "dash-store"
    root.mkdir(parents=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    data = write_corpus(root, lines=60)
    saved = os.environ.get("LOWRES_CACHE_DIR")
    os.environ["LOWRES_CACHE_DIR"] = str(root / "cache")
    try:
        seeded = Seeded(root, uri, root / "runs")
        for name, rank, profiled in (("a", 4, True), ("b", 8, False), ("c", 4, False)):
            seeded.results[name] = _train(root, data, uri, name, rank, profiled)
    finally:
        if saved is None:
            os.environ.pop("LOWRES_CACHE_DIR", None)
        else:
            os.environ["LOWRES_CACHE_DIR"] = saved
    seeded.federations = seed_federations(uri)
    seeded.federations_at = time.time()
    _SEEDED = seeded
    return seeded
