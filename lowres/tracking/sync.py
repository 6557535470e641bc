"""``lowres sync``: upload the spool to the tracking server — everything once, nothing twice.

Two guards make a sync idempotent by run, key and step:

1. A marker per spool file, ``<file>.synced`` (JSON ``{"offset": N}``), says "bytes before N are on the server".
   It is rewritten atomically after each batch the server confirmed, so a sync killed half-way resumes at the
   last confirmed batch and a second sync reads nothing.
2. Before uploading a metric, sync reads the run's history of that key once and skips every (key, step) the
   server already holds: that covers the window between a confirmed batch and its marker, and points that a
   writer's request delivered although the writer saw a timeout and spooled them. MLflow's SQL store also
   ignores exact duplicates (same key, value, timestamp, step), a last line of defence only.

Pending runs (made while the server was down, ``local-…`` ids) are created first, tagged with their local
id; a sync that finds a run with that tag reuses it instead of creating a second one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import logging

from lowres.errors import LowresError
from lowres.tracking import runs, spool
from lowres.tracking.logger import server_alive
from profiler.sinks.mlflow import redact_uri, resolve_tracking_uri, scrub

# MLflow's limits per log_batch (mlflow/utils/validation.py)
BATCH_LIMITS = {spool.METRIC: 1000, spool.PARAM: 100, spool.TAG: 100}
MARKER_SUFFIX = ".synced"
log = logging.getLogger("lowres.sync")


class TrackingUnavailable(LowresError):
    """The tracking server does not answer; nothing was uploaded and the spool is unchanged."""


@dataclass
class SyncReport:
    """What a sync uploaded (or, with ``dry_run``, would upload) and what it skipped as already there."""

    dry_run: bool = False
    files: int = 0
    runs_created: int = 0
    metrics_uploaded: int = 0
    metrics_skipped: int = 0
    params_uploaded: int = 0
    params_skipped: int = 0
    tags_set: int = 0
    artifacts_uploaded: int = 0
    artifacts_skipped: int = 0
    runs_ended: int = 0
    run_ids: dict[str, str] = field(default_factory=dict)  # local id -> server id
    problems: list[str] = field(default_factory=list)

    @property
    def uploaded(self) -> int:
        """Everything written to the server (0 on a second sync)."""
        return (self.runs_created + self.metrics_uploaded + self.params_uploaded + self.tags_set
                + self.artifacts_uploaded + self.runs_ended)


def sync(spool_dir: str | Path | None = None, tracking_uri: str | None = None, dry_run: bool = False,
         lock_wait_s: float = 600.0) -> SyncReport:
    """Upload every spool file in ``spool_dir`` (default ``.lowres/spool``).

    Records go to ``tracking_uri`` if given, else to the server each record was meant for. Raises
    :class:`TrackingUnavailable` when that server does not answer; other failures (a refused param change, a
    missing artifact copy) are listed in ``problems`` and the rest goes on.
    """
    sdir = Path(spool_dir) if spool_dir else spool.default_spool_dir()
    syncer = _Syncer(sdir, tracking_uri, SyncReport(dry_run=dry_run))
    if sdir.is_dir():
        # One sync per spool at a time: a second one waits, then finds everything uploaded (two at once could
        # create a pending run twice, or upload a file's points twice between reading and writing its marker).
        with _spool_lock(sdir, lock_wait_s):
            syncer.pending_runs()
            for path in sorted(sdir.glob("*.jsonl")):
                syncer.file(path)
    return syncer.report


def _spool_lock(sdir: Path, wait_s: float):
    from lowres.locks import FolderLock

    lock = FolderLock(sdir, "spool", name=".sync.lock",
                      hint="another `lowres sync` is uploading it; run this one again when it has finished")
    return lock.acquire(wait_s, on_wait=lambda holder: log.warning("waiting for %s to finish its sync", holder))


class _Syncer:
    def __init__(self, spool_dir: Path, uri: str | None, report: SyncReport):
        self.dir, self.uri_override, self.report = spool_dir, uri, report
        self.run_map: dict[str, str | None] = {}  # local id -> server id (None: created at a real sync)
        self._clients: dict[str, object] = {}
        self._steps: dict[tuple, set[int]] = {}  # (uri, run, key) -> steps on the server
        self._params: dict[tuple, dict] = {}  # (uri, run) -> params on the server
        self._marker = Path()  # the current file's marker

    def uri(self, rec: dict) -> str:
        return self.uri_override or rec.get("tracking_uri") or resolve_tracking_uri(None)

    def client(self, uri: str):
        if uri not in self._clients:
            if uri.startswith(("http://", "https://")) and not server_alive(uri, 10.0):
                raise TrackingUnavailable(f"the tracking server at {redact_uri(uri)} does not answer",
                                          hint="start it (mlflow/start-server.sh) or pass --tracking-uri; "
                                               "the spool is kept and nothing was uploaded")
            self._clients[uri] = runs.client(uri)
        return self._clients[uri]

    # -- runs created while the server was down ------------------------------------------------------------
    def pending_runs(self) -> None:
        for local_id, (path, rec) in spool.read_pending_runs(self.dir).items():
            if rec.get("server_run_id"):
                self.run_map[local_id] = rec["server_run_id"]
                continue
            c = self.client(self.uri(rec))
            found = self._find_created(c, rec)
            if found:
                self.run_map[local_id] = found
            elif self.report.dry_run:
                self.run_map[local_id] = None
                self.report.runs_created += 1
                continue
            else:
                self.run_map[local_id] = self._create(c, rec)
                self.report.runs_created += 1
            rec["server_run_id"] = self.run_map[local_id]
            if not self.report.dry_run:
                spool.write_json_atomic(path, rec)
            self.report.run_ids[local_id] = self.run_map[local_id]

    @staticmethod
    def _find_created(c, rec: dict) -> str | None:
        """A run an earlier, interrupted sync created for this local id (found by its tag)."""
        exp = c.get_experiment_by_name(rec["experiment"])
        if exp is None:
            return None
        hits = c.search_runs([exp.experiment_id], max_results=1,
                             filter_string=f"tags.`{spool.TAG_LOCAL_RUN_ID}` = '{rec['run_id']}'")
        return hits[0].info.run_id if hits else None

    def _create(self, c, rec: dict) -> str:
        exp = c.get_experiment_by_name(rec["experiment"])
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            exp_id = c.create_experiment(rec["experiment"], artifact_location=runs._artifact_location(
                self.uri(rec), rec["experiment"]), tags=dict([runs.EXPERIMENT_KIND_TAG]))
        tags = {**rec.get("tags", {}), spool.TAG_LOCAL_RUN_ID: rec["run_id"]}
        run = c.create_run(exp_id, start_time=rec.get("start_time"), tags=tags, run_name=rec.get("run_name"))
        return run.info.run_id

    # -- one spool file ----------------------------------------------------------------------------------------
    def file(self, path: Path) -> None:
        marker = path.with_name(path.name + MARKER_SUFFIX)
        offset = _read_marker(marker)
        if offset > path.stat().st_size:  # the file was replaced: start over, history checks prevent duplicates
            offset = 0
        records = spool.read_records(path, offset)
        if not records:
            return
        self.report.files += 1
        self._marker = marker
        batch: list[dict] = []
        try:
            for rec, end in records:
                run_id = self._server_run(rec["run_id"])
                kind = spool.kind(rec)
                key = (kind, self.uri(rec), run_id)
                if batch and (key != batch[0]["_key"] or len(batch) >= BATCH_LIMITS.get(kind, 0)):
                    self._flush(batch)
                    batch = []
                if kind in BATCH_LIMITS:
                    batch.append({**rec, "_key": key, "_end": end})
                    continue
                self._flush(batch)
                batch = []
                self._single(kind, rec, run_id)
                self._mark(end)
            self._flush(batch)
        except TrackingUnavailable:
            raise
        except Exception as exc:  # stop this file at its last confirmed batch; the others still go
            # What this file's failed batch claimed may not be on the server: read the server again.
            self._steps.clear()
            self._params.clear()
            self.report.problems.append(f"{path.name}: {type(exc).__name__}: {scrub(str(exc), self.uri({}))[:300]}")

    def _server_run(self, run_id: str) -> str | None:
        if not spool.is_local_run_id(run_id):
            return run_id
        if run_id not in self.run_map:
            raise LowresError(f"run {run_id} has no pending-run record ({run_id}{spool.PENDING_SUFFIX})")
        return self.run_map[run_id]

    def _flush(self, batch: list[dict]) -> None:
        """Upload one batch of metrics, params or tags of one run, then move the file's marker past it."""
        if not batch:
            return
        kind, uri, run_id = batch[0]["_key"]
        c = self.client(uri)
        from mlflow.entities import Metric, Param, RunTag

        if kind == spool.METRIC:
            new = [r for r in batch if self._new_metric(c, uri, run_id, r)]
            self.report.metrics_skipped += len(batch) - len(new)
            if new and not self.report.dry_run:
                c.log_batch(run_id, metrics=[Metric(r["key"], float(r["value"]), int(r["timestamp"]),
                                                    int(r["step"])) for r in new])
            self.report.metrics_uploaded += len(new)
        elif kind == spool.PARAM:
            new = [r for r in batch if self._new_param(c, uri, run_id, r)]
            self.report.params_skipped += len(batch) - len(new)
            if new and not self.report.dry_run:
                c.log_batch(run_id, params=[Param(r["key"], str(r["value"])) for r in new])
            self.report.params_uploaded += len(new)
        else:
            if not self.report.dry_run:
                c.log_batch(run_id, tags=[RunTag(r["key"], str(r["value"])) for r in batch])
            self.report.tags_set += len(batch)
        self._mark(batch[-1]["_end"])

    def _new_metric(self, c, uri: str, run_id: str | None, rec: dict) -> bool:
        """False when the server (or an earlier record of this sync) already has this key at this step."""
        hkey = (uri, run_id, rec["key"])
        steps = self._steps.get(hkey)
        if steps is None:
            steps = set()
            if run_id is not None:
                steps = {m.step for m in c.get_metric_history(run_id, rec["key"])}
            self._steps[hkey] = steps
        step = int(rec["step"])
        if step in steps:
            return False
        steps.add(step)
        return True

    def _new_param(self, c, uri: str, run_id: str | None, rec: dict) -> bool:
        have = self._params.get((uri, run_id))
        if have is None:
            have = self._params[(uri, run_id)] = dict(c.get_run(run_id).data.params) if run_id else {}
        value = str(rec["value"])
        if rec["key"] not in have:
            have[rec["key"]] = value
            return True
        if have[rec["key"]] != value:  # MLflow refuses to change a param; say so and go on
            self.report.problems.append(f"run {run_id}: param {rec['key']!r} is {have[rec['key']]!r} on the "
                                        f"server, the spool has {value!r}; kept the server's")
        return False

    def _single(self, kind: str, rec: dict, run_id: str | None) -> None:
        c = self.client(self.uri(rec))
        if kind == spool.ARTIFACT:
            src = self.dir / rec["file"]
            if not src.exists():
                raise LowresError(f"the spooled artifact {src} is missing")
            if run_id is not None and _has_artifact(c, run_id, src, rec.get("artifact_path")):
                self.report.artifacts_skipped += 1
                return
            if not self.report.dry_run:
                c.log_artifact(run_id, str(src), rec.get("artifact_path"))
            self.report.artifacts_uploaded += 1
        elif kind == spool.END:
            if not self.report.dry_run:
                c.set_terminated(run_id, status=rec.get("status", "FINISHED"), end_time=rec.get("end_time"))
            self.report.runs_ended += 1
        else:
            raise LowresError(f"unknown spool record kind {kind!r} (written by a newer lowres?)")

    def _mark(self, end: int) -> None:
        """Everything in the current file before byte ``end`` is on the server."""
        if not self.report.dry_run:
            spool.write_json_atomic(self._marker, {"offset": end})


def _read_marker(marker: Path) -> int:
    try:
        with open(marker, encoding="utf-8") as f:
            return int(json.load(f)["offset"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _has_artifact(c, run_id: str, src: Path, artifact_path: str | None) -> bool:
    """True when the run already has an artifact of this name (and, for a file, this size)."""
    target = f"{artifact_path.strip('/')}/{src.name}" if artifact_path else src.name
    for info in c.list_artifacts(run_id, artifact_path or None):
        if info.path == target:
            return info.is_dir or info.file_size == src.stat().st_size
    return False
