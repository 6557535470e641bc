"""The federation index, kept on the lab's shared MLflow server (no server of its own).

A federation that announces itself (``index.announce: true``, or ``lowres fed run --superlink … --announce``)
gets one run in the experiment ``lowres-fed-index`` (``index.experiment``), named after the federation and
holding everything a node needs to join as tags:

    lowres.index.federation      name                      lowres.index.superlink   HOST:PORT nodes dial
    lowres.index.model           model preset / hub id      lowres.index.rounds      rounds planned
    lowres.index.codec           uplink/downlink codecs     lowres.index.clients_wanted  min_available
    lowres.index.status          running | finished | failed
    lowres.index.heartbeat       unix seconds of the last beat (every ``index.heartbeat_s``)
    lowres.index.heartbeat_s     the beat interval          lowres.index.fed_run_id  the federation's parent run
    lowres.index.root_cert       the SuperLink's public CA certificate (PEM), empty for plain HTTP

Never a key or a password: only the CA certificate, which is public. The run itself is RUNNING while the
federation runs and ends FINISHED or FAILED with it. A heartbeat is one tag write (``set_tag``) that replaces
the last one, so the store does not grow with time. An entry whose heartbeat is older than
``STALE_BEATS`` intervals is ``silent`` (its server crashed or hangs) and not joinable.

Joins: each ``lowres fed join`` logs one point of the metric ``index/join`` (value 1), so the join count is
the length of that history — appends never race the way a read-modify-write counter would. Failure reports
(``lowres fed report`` or the Federations page) are tags ``lowres.report.<ms>-<random>`` whose value is JSON
``{"category", "text", "time"}``, on the same run.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INDEX_EXPERIMENT = "lowres-fed-index"
PREFIX = "lowres.index."
REPORT_PREFIX = "lowres.report."
JOIN_METRIC = "index/join"
CATEGORIES = ("bug", "connection", "malicious")
STALE_BEATS = 3  # beats missed before an entry counts as silent
MAX_REPORT_CHARS = 2000


@dataclass
class Entry:
    """One announced federation as the index holds it."""

    run_id: str
    federation: str
    superlink: str
    status: str
    heartbeat: float | None
    heartbeat_s: float
    model: str = ""
    rounds: int | None = None
    codec: str = ""
    clients_wanted: int | None = None
    root_cert: str = ""
    fed_run_id: str = ""
    started: float | None = None
    reports: list[dict] = field(default_factory=list)

    def age(self, now: float | None = None) -> float | None:
        """Seconds since the last heartbeat."""
        return None if self.heartbeat is None else max(0.0, (now or time.time()) - self.heartbeat)

    def state(self, now: float | None = None) -> str:
        """``running`` with a fresh heartbeat, ``silent`` when it stopped beating, else the status it ended with."""
        if self.status != "running":
            return self.status
        age = self.age(now)
        return "running" if age is not None and age <= STALE_BEATS * self.heartbeat_s else "silent"

    @property
    def joinable(self) -> bool:
        return self.state() == "running"


def _client(uri: str | None):
    from lowres.tracking.runs import client

    return client(uri)


def _float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _entry(run) -> Entry:
    t = run.data.tags
    reports = []
    for k, v in t.items():
        if k.startswith(REPORT_PREFIX):
            try:
                reports.append(json.loads(v))
            except ValueError:
                continue  # a tag someone wrote by hand: not a report
    reports.sort(key=lambda r: r.get("time", 0))
    rounds, wanted = _float(t.get(PREFIX + "rounds")), _float(t.get(PREFIX + "clients_wanted"))
    return Entry(run_id=run.info.run_id, federation=t.get(PREFIX + "federation", run.info.run_name or ""),
                 superlink=t.get(PREFIX + "superlink", ""), status=t.get(PREFIX + "status", "unknown"),
                 heartbeat=_float(t.get(PREFIX + "heartbeat")), heartbeat_s=_float(t.get(PREFIX + "heartbeat_s")) or 30.0,
                 model=t.get(PREFIX + "model", ""), rounds=int(rounds) if rounds is not None else None,
                 codec=t.get(PREFIX + "codec", ""), clients_wanted=int(wanted) if wanted is not None else None,
                 root_cert=t.get(PREFIX + "root_cert", ""), fed_run_id=t.get(PREFIX + "fed_run_id", ""),
                 started=run.info.start_time / 1000 if run.info.start_time else None, reports=reports)


def entries(uri: str | None, experiment: str = INDEX_EXPERIMENT, max_results: int = 200) -> list[Entry]:
    """Every announced federation, newest first (one entry per run: a name announced twice appears twice)."""
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{PREFIX}federation` != ''",
                         max_results=max_results, order_by=["attributes.start_time DESC"])
    return [_entry(r) for r in runs]


def join_count(uri: str | None, entry: Entry) -> int:
    """How many ``lowres fed join`` went to this entry."""
    return len(_client(uri).get_metric_history(entry.run_id, JOIN_METRIC))


def lookup(uri: str | None, name: str, experiment: str = INDEX_EXPERIMENT) -> Entry:
    """The newest entry of federation ``name``; UsageError naming the joinable ones when there is none."""
    from lowres.errors import UsageError
    from profiler.sinks.mlflow import resolve_tracking_uri

    resolved = resolve_tracking_uri(uri)
    if resolved.startswith("sqlite:///") and not Path(resolved[len("sqlite:///"):]).exists():
        # opening it would create an empty store here; the index is on the lab's server
        raise UsageError(f"no MLflow store at {resolved}, so no federation index",
                         hint="give the lab's server: --tracking-uri http://HOST:5000 or $MLFLOW_TRACKING_URI")
    all_entries = entries(uri, experiment)
    for e in all_entries:
        if e.federation == name:
            return e
    joinable = sorted({e.federation for e in all_entries if e.joinable})
    raise UsageError(f"no federation {name!r} is announced in the index on {_shown(uri)}",
                     hint=f"joinable now: {', '.join(joinable)}" if joinable else "no federation is joinable now")


def joinable_entry(uri: str | None, name: str, experiment: str = INDEX_EXPERIMENT) -> Entry:
    """``lookup`` that also refuses a federation which ended or stopped beating (UsageError, exit 2)."""
    from lowres.errors import UsageError

    e = lookup(uri, name, experiment)
    state = e.state()
    if state == "running":
        return e
    others = sorted({x.federation for x in entries(uri, experiment) if x.joinable and x.federation != name})
    hint = f"joinable now: {', '.join(others)}" if others else "no federation is joinable now"
    if state == "silent":
        raise UsageError(f"federation {name!r} has sent no heartbeat for {e.age():.0f} s (every {e.heartbeat_s:g} s "
                         "expected): its server crashed or hangs", hint=hint)
    raise UsageError(f"federation {name!r} is {state}; it takes no new nodes", hint=hint)


def record_join(uri: str | None, entry: Entry) -> None:
    """One point of ``index/join`` (the join count is the history's length; random step: no two collide)."""
    from mlflow.entities import Metric

    _client(uri).log_batch(entry.run_id, metrics=[Metric(JOIN_METRIC, 1.0, int(time.time() * 1000),
                                                         secrets.randbelow(2**31))])


def report(uri: str | None, name: str, category: str, text: str, experiment: str = INDEX_EXPERIMENT) -> Entry:
    """Store a failure report (bug / connection / malicious) with federation ``name``'s newest entry."""
    from lowres.errors import UsageError

    if category not in CATEGORIES:
        raise UsageError(f"--category {category!r} is not one of {', '.join(CATEGORIES)}")
    text = text.strip()
    if not text:
        raise UsageError("a report needs --text saying what went wrong")
    if len(text) > MAX_REPORT_CHARS:
        raise UsageError(f"the report's text has {len(text)} characters; at most {MAX_REPORT_CHARS}",
                         hint="summarise it, and link a log instead of pasting it")
    e = lookup(uri, name, experiment)
    now = time.time()
    key = f"{REPORT_PREFIX}{int(now * 1000)}-{secrets.token_hex(3)}"
    _client(uri).set_tag(e.run_id, key, json.dumps({"category": category, "text": text, "time": now}))
    return e


def _shown(uri: str | None) -> str:
    from profiler.sinks.mlflow import redact_uri, resolve_tracking_uri

    return redact_uri(resolve_tracking_uri(uri))


# ---------------------------------------------------------------------------------------------- the server's side
def announcement_tags(fed: Any, fed_run_id: str | None) -> dict[str, str]:
    """The tags of a new entry for FedConfig ``fed`` (the CA certificate read from ``index.root_cert``)."""
    from lowres.errors import UsageError

    ix = fed.index
    cert = ""
    if ix.root_cert:
        path = Path(ix.root_cert).expanduser()
        if not path.is_file():
            raise UsageError(f"index.root_cert {ix.root_cert!r} does not exist on the server",
                             hint="give the SuperLink's ca.crt (public), or leave it empty for plain HTTP")
        cert = path.read_text()
        if "PRIVATE KEY" in cert or "BEGIN CERTIFICATE" not in cert:
            raise UsageError(f"index.root_cert {ix.root_cert!r} is not a certificate (or holds a private key)",
                             hint="give the CA certificate ca.crt, never a key")
    run = fed.run_config()
    return {PREFIX + "federation": fed.federation, PREFIX + "superlink": ix.superlink or "",
            PREFIX + "model": run.model.name, PREFIX + "rounds": str(fed.rounds),
            PREFIX + "codec": f"{fed.compression.up}/{fed.compression.down}",
            PREFIX + "clients_wanted": str(fed.robustness.min_available), PREFIX + "status": "running",
            PREFIX + "heartbeat": f"{time.time():.3f}", PREFIX + "heartbeat_s": f"{ix.heartbeat_s:g}",
            PREFIX + "root_cert": cert, PREFIX + "fed_run_id": fed_run_id or "",
            "lowres.command": "fed-index"}


class Announcer:
    """The federation server's entry in the index: created at start, a heartbeat thread, ended with the run.

    Like all tracking it never kills the federation (DESIGN rule 8): a failed write is counted and retried
    at the next beat; only a bad ``index`` section (a missing certificate) raises, before any round."""

    def __init__(self, fed: Any, fed_run_id: str | None, console: Any = None):
        from lowres.tracking.runs import start_run

        self.uri, self.console, self.failures = fed.index.mlflow_uri or fed.tracking.mlflow_uri, console, 0
        self.interval = fed.index.heartbeat_s
        tags = announcement_tags(fed, fed_run_id)
        handle = start_run(fed.index.experiment, run_name=fed.federation, tracking_uri=self.uri, tags=tags)
        self.run_id, self.uri = handle.run_id, handle.tracking_uri
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="fed-index", daemon=True)
        self._thread.start()
        if console is not None:
            console.print(f"announced federation {fed.federation!r} in the index ({INDEX_EXPERIMENT}, run "
                          f"{self.run_id})", highlight=False)

    def _set(self, key: str, value: str) -> None:
        try:
            _client(self.uri).set_tag(self.run_id, PREFIX + key, value)
        except Exception:  # the lab server may be down for a while: count, beat again later
            self.failures += 1

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self._set("heartbeat", f"{time.time():.3f}")

    def close(self, status: str = "FINISHED") -> None:
        """Stop beating; the entry ends ``finished`` or ``failed`` (and its run FINISHED / FAILED)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._set("status", "finished" if status == "FINISHED" else "failed")
        try:
            _client(self.uri).set_terminated(self.run_id, status=status)
        except Exception:
            self.failures += 1


def announcer(fed: Any, fed_run_id: str | None, console: Any = None) -> Announcer | None:
    """An ``Announcer`` when the federation asks to be announced (``index.announce``), else None."""
    from lowres.errors import LowresError

    if getattr(fed, "index", None) is None or not fed.index.announce:
        return None
    try:
        return Announcer(fed, fed_run_id, console)
    except LowresError:
        raise
    except Exception as exc:  # the lab server unreachable: the federation runs, unannounced
        if console is not None:
            console.print(f"warning: could not announce {fed.federation!r} in the index: {type(exc).__name__}: "
                          f"{str(exc)[:200]}", highlight=False)
        return None
