"""Splitting one dataset among simulated clients: IID, or Dirichlet non-IID over a label/domain field.

Real deployments do not partition: each SuperNode points its client at its own files (``data.path`` in the
node config). For experiments on one dataset:

    records = read_records(cfg.data)
    central, rest = holdout(records, 0.1, seed)           # the server's centralised eval set
    labels = labels_of(rest, label="auto")
    parts = dirichlet(labels, n_clients=10, alpha=0.5, seed=0)   # or iid(len(rest), 10, seed)
    files = write_partitions(rest, parts, folder)          # client-00.jsonl …

Labels: ``label="auto"`` uses a ``label``/``category``/``domain`` field where records have one. The shipped
samples have none, so instruction records fall back to the *instruction category* — the first word of the
prompt, lower-cased ("convert", "what", "how", "write", …) — and plain-text records (logs) to the *component*
— their second whitespace token (``dfs.DataNode$PacketResponder:`` in HDFS logs). ``label="hash:8"`` buckets
records by a stable hash of their text into 8 pseudo-domains, for data with no usable structure.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

LABEL_FIELDS = ("label", "category", "domain")


def _text_of(record: dict) -> str:
    for key in ("instruction", "prompt", "text"):
        if isinstance(record.get(key), str):
            return record[key]
    return json.dumps(record, sort_keys=True)


def label_of(record: dict, label: str = "auto") -> str:
    """The partitioning label of one record (see the module docstring for the rules)."""
    if label.startswith("hash:"):
        buckets = int(label.split(":", 1)[1])
        digest = hashlib.sha256(_text_of(record).encode()).digest()
        return f"h{int.from_bytes(digest[:4], 'big') % buckets}"
    if label != "auto":
        if label not in record:
            raise KeyError(f"records have no field {label!r} to partition by (fields: {sorted(record)})")
        return str(record[label])
    for key in LABEL_FIELDS:
        if key in record:
            return str(record[key])
    words = _text_of(record).split()
    if "instruction" in record or "prompt" in record:
        return words[0].lower().rstrip(":") if words else ""
    return words[1] if len(words) > 1 else (words[0] if words else "")


def labels_of(records: list[dict], label: str = "auto") -> list[str]:
    return [label_of(r, label) for r in records]


def holdout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(held-out, rest): a seeded random ``fraction`` of the records for the server's centralised eval."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(records))
    n = int(round(fraction * len(records)))
    return [records[i] for i in sorted(perm[:n])], [records[i] for i in sorted(perm[n:])]


def iid(n_records: int, n_clients: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle cut into ``n_clients`` near-equal parts."""
    if n_clients < 1 or n_records < n_clients:
        raise ValueError(f"cannot give {n_clients} clients at least one of {n_records} records each")
    perm = np.random.default_rng(seed).permutation(n_records)
    return [np.sort(p) for p in np.array_split(perm, n_clients)]


def dirichlet(labels: list[str], n_clients: int, alpha: float, seed: int, min_records: int = 2,
              tries: int = 100) -> list[np.ndarray]:
    """Non-IID split (Hsu et al. 2019): for each label, client shares drawn from Dirichlet(α·1); small α
    gives each client few labels. Redrawn until every client holds ≥ ``min_records`` (ValueError after
    ``tries`` draws: lower min_records or raise α)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    classes = sorted(set(labels))
    for _ in range(tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels_arr == c))
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_records:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet(α={alpha}) split of {len(labels)} records gave each of {n_clients} clients "
                     f"≥ {min_records} records in {tries} draws; raise alpha or use fewer clients")


def write_partitions(records: list[dict], parts: list[np.ndarray], folder: str | Path) -> list[Path]:
    """One JSONL file per client (``client-00.jsonl`` …); returns their paths."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, idx in enumerate(parts):
        path = d / f"client-{i:02d}.jsonl"
        path.write_text("".join(json.dumps(records[j], ensure_ascii=False) + "\n" for j in idx))
        paths.append(path)
    return paths
