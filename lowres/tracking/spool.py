"""The local spool: what lowres writes when the tracking server cannot take it, for ``lowres sync`` later.

One format, owned by the profiler's MLflow sink (``profiler/sinks/mlflow.py``): JSONL files in
``.lowres/spool/``, one record per line. A line without ``kind`` is a metric point with the sink's fields
``run_id, key, value, timestamp (ms), step, tracking_uri``; this module adds records that carry ``kind``:

- ``param`` (key, value), ``tag`` (key, value), ``end`` (status, end_time);
- ``artifact`` (file: a copy inside the spool dir, relative to it; artifact_path: where it goes in the run).

Files: the sink writes ``<run_id>.mlflow.jsonl``, :class:`SpoolingLogger` writes ``<run_id>.lowres.jsonl``
(separate files because the sink may write from another process, and appends from two processes could
interleave inside a line). A run started while the server is down gets a local id ``local-<hex>`` and a
pending-run file ``<local id>.run.json``; ``lowres sync`` creates the run on the server, tags it with
``lowres.spool.local_run_id`` (so a second sync finds it instead of creating another) and writes the server's
id back into that file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from profiler.sinks.mlflow import append_jsonl, default_spool_path

LOWRES_SUFFIX = ".lowres.jsonl"
PENDING_SUFFIX = ".run.json"
LOCAL_RUN_PREFIX = "local-"
TAG_LOCAL_RUN_ID = "lowres.spool.local_run_id"
METRIC, PARAM, TAG, ARTIFACT, END = "metric", "param", "tag", "artifact", "end"


def default_spool_dir() -> Path:
    """The sink's spool directory: ``.lowres/spool`` in the working directory."""
    return default_spool_path("x").parent


def new_local_run_id() -> str:
    """An id for a run the server has not seen yet; never looks like MLflow's 32-hex run ids."""
    return LOCAL_RUN_PREFIX + uuid.uuid4().hex


def is_local_run_id(run_id: str) -> bool:
    """True for ids made by :func:`new_local_run_id`."""
    return run_id.startswith(LOCAL_RUN_PREFIX)


def kind(record: Mapping[str, Any]) -> str:
    """A record's kind; the sink's metric lines carry none."""
    return record.get("kind", METRIC)


def metric_record(run_id: str, key: str, value: float, timestamp: int, step: int, tracking_uri: str) -> dict:
    """A metric point, field for field as the sink writes it (``profiler.sinks.mlflow.read_spool`` reads it)."""
    return {"run_id": run_id, "key": key, "value": value, "timestamp": timestamp, "step": step,
            "tracking_uri": tracking_uri}


def append_records(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Append records as JSON lines with one ``write`` (a torn last line is closed first); returns how many.
    The profiler's MLflow sink spools through the same function."""
    return append_jsonl(path, records)


def read_records(path: Path, offset: int = 0) -> list[tuple[dict, int]]:
    """Records from byte ``offset`` on, each with the byte offset just past its line.

    Only complete lines count: a last line without its newline may still be being written, so it is left
    for a later sync. Unparseable complete lines (torn by a crash) are skipped.
    """
    out: list[tuple[dict, int]] = []
    with open(path, "rb") as f:
        f.seek(offset)
        pos = offset
        for line in f:
            if not line.endswith(b"\n"):
                break
            pos += len(line)
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append((rec, pos))
    return out


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON so a reader sees the old file or the new one, never half of one (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_pending_run(spool_dir: Path, run_id: str, *, experiment: str, run_name: str | None,
                      tags: Mapping[str, str], tracking_uri: str, start_time: int | None = None) -> Path:
    """Record a run the server has not created yet; ``lowres sync`` creates it and maps ``run_id`` to it."""
    path = Path(spool_dir) / f"{run_id}{PENDING_SUFFIX}"
    write_json_atomic(path, {"run_id": run_id, "experiment": experiment, "run_name": run_name,
                             "tags": dict(tags), "tracking_uri": tracking_uri,
                             "start_time": int(time.time() * 1000) if start_time is None else start_time,
                             "server_run_id": None})
    return path


def read_pending_runs(spool_dir: Path) -> dict[str, tuple[Path, dict]]:
    """Pending-run records by local id: (file, record)."""
    from lowres.errors import DataError

    out = {}
    for path in sorted(Path(spool_dir).glob(f"*{PENDING_SUFFIX}")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
            rec, why = None, str(exc).splitlines()[0][:120]
        else:
            why = "it holds no run_id"
        if not isinstance(rec, dict) or not isinstance(rec.get("run_id"), str):
            raise DataError(f"pending-run file {str(path)!r} in the spool is damaged ({why}); nothing was uploaded",
                            hint="move it out of the spool (its run's figures stay there) and sync again")
        out[rec["run_id"]] = (path, rec)
    return out


def spool_artifact(spool_dir: Path, run_id: str, local_path: str | Path, artifact_path: str | None) -> dict:
    """Copy a file or directory into the spool (the original may change or vanish before sync); return its
    record."""
    src = Path(local_path)
    rel = Path(f"{run_id}.artifacts") / uuid.uuid4().hex[:12] / src.name
    dst = Path(spool_dir) / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return {"kind": ARTIFACT, "run_id": run_id, "file": rel.as_posix(), "artifact_path": artifact_path}
