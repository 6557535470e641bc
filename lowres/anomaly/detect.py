"""Scoring new logs with a saved student: labelled session CSVs (``Sequence,label``) or raw log lines.

    res = detect_file("runs/anomaly/hdfs-tiny/student", "sessions.csv")
    res.keys, res.proba, res.flags, res.labels (None for raw lines), res.metrics (F1 … when labelled)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowres.anomaly.preprocess import (SessionError, _read_text, group_sessions, join_session,
                                       read_labeled_sessions, read_templates, render_ids)
from lowres.anomaly.scoring import prf


@dataclass
class Detection:
    keys: list[str]
    proba: np.ndarray
    flags: np.ndarray
    labels: np.ndarray | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    kind: str = "raw"
    # what scoring cost here: seconds (all sessions, batched), seconds_per_session, peak_rss_bytes (the
    # process' peak resident memory, model load included)
    cost: dict[str, float] = field(default_factory=dict)


def read_sessions(path: str | Path) -> tuple[str, list[str], list[str], np.ndarray | None]:
    """(kind, keys, texts, labels or None): a ``Sequence,label`` CSV of event ids, else raw HDFS log lines
    grouped into block sessions."""
    text = _read_text(path)
    first = text.lstrip().split("\n", 1)[0].strip().lower()
    if first.replace(" ", "").startswith("sequence,label"):
        templates = read_templates()
        rows = read_labeled_sessions(path)
        if not rows:
            raise SessionError(f"{path}: 0 sessions found, at least 1 needed")
        return ("sessions", [f"row-{i + 1}" for i in range(len(rows))], [render_ids(ids, templates) for ids, _ in rows],
                np.array([y for _, y in rows]))
    sessions = group_sessions(text.splitlines())
    return "raw", list(sessions), [join_session(m) for m in sessions.values()], None


def detect_file(model_dir: str | Path, path: str | Path, threshold: float = 0.5) -> Detection:
    """Score every session of ``path`` with the student in ``model_dir``; metrics when labels are present."""
    from lowres.anomaly.student import load_student, predict_proba
    from lowres.errors import UsageError
    from lowres.train.timing import peak_memory

    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold {threshold} is not a probability", hint="give a value in [0, 1], e.g. 0.5")
    d = Path(model_dir)
    missing = [n for n in ("meta.json", "base", "adapter", "tokenizer") if not (d / n).exists()]
    if missing:  # checked before the file is read and the model loads
        raise UsageError(f"--model {str(d)!r} holds no saved student (missing {', '.join(missing)})",
                         hint="give the student folder of a `lowres anomaly run`, e.g. runs/anomaly/hdfs-tiny/student")
    kind, keys, texts, labels = read_sessions(path)  # SessionError (exit 2): not a file, not text, bad labels
    student = load_student(model_dir)
    t0 = time.perf_counter()
    proba = predict_proba(student, texts)
    seconds = time.perf_counter() - t0
    flags = (proba >= threshold).astype(int)
    res = Detection(keys, proba, flags, labels, kind=kind,
                    cost={"seconds": seconds, "seconds_per_session": seconds / max(len(texts), 1),
                          "peak_rss_bytes": float(peak_memory(cuda=False))})
    if labels is not None:
        f1, p, r = prf(labels, flags)
        res.metrics = {"f1": f1, "precision": p, "recall": r, "sessions": float(len(labels)),
                       "anomalies_true": float(labels.sum()), "anomalies_flagged": float(flags.sum())}
    return res
