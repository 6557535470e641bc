"""Log preprocessing: mask what varies or is private, group lines into sessions, render sessions as text.

    mask("... blk_-695 ... 10.251.73.220:50010 ...")   -> "... <*> ... <*> ..."
    sessions = group_sessions(lines)                     # {block id: [masked message, ...]} (HDFS)
    text = join_session(messages)                        # messages joined by " ;-; "
    templates = read_templates(path)                     # {"E5": "Receiving block <*> src: <*> dest: <*>", ...}
    rows = read_labeled_sessions(path)                   # [(["E5", "E22", ...], label), ...]

Raw lines and template-id sequences end in the same form (the shipped sessions were parsed from the same HDFS
logs with the same templates), so a model trained on one reads the other. Masking happens before anything
leaves this module: block ids, addresses and paths are private, and numbers only add vocabulary noise.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from pathlib import Path

from lowres.errors import DataError

SEP = " ;-; "  # the message separator: rare in logs, a few tokens, marks event boundaries for the model
WILDCARD = "<*>"
DATA_DIR = Path(__file__).parent / "data"

BLOCK_RE = re.compile(r"blk_-?\d+")
# Order matters: whole structured tokens first (URLs, paths, IP:port), then bare numbers, so that an IP is
# one <*> rather than four.
_MASKS = [
    re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+"),                    # URLs
    re.compile(r"/?\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?"),               # IPv4 with optional port (and leading /)
    re.compile(r"(?<![\w.])/(?:[\w.\-$]+/)*[\w.\-$]*"),              # absolute paths (/mnt/hadoop/...)
    BLOCK_RE,                                                       # HDFS block ids
    re.compile(r"(?<![A-Za-z])[-+]?\d+(?:\.\d+)?"),                  # numbers (not the digits inside E5, blk_)
]
_HEADER_RE = re.compile(r"^\d{6} \d{6} \d+ [A-Z]+ (?:[\w.$]+: )?")  # HDFS: date time pid level component
_COLLAPSE_RE = re.compile(r"(?:<\*>\s*){2,}")


class SessionError(DataError):
    """Input that gives no usable sessions; the message says how many were found and needed."""

    exit_code = 2


def mask(line: str) -> str:
    """``line`` with URLs, paths, IPs (with ports), block ids and numbers replaced by ``<*>``."""
    for rx in _MASKS:
        line = rx.sub(WILDCARD, line)
    line = _COLLAPSE_RE.sub(WILDCARD + " ", line)  # "<*>:<*>" runs say nothing more than one <*>
    return " ".join(line.split())


def message_of(line: str) -> str:
    """The message part of a raw HDFS line, masked. The header (date, time, pid, level, component) is dropped:
    timestamps and pids are not behaviour, and without it a line reads like its template."""
    return mask(_HEADER_RE.sub("", line.strip()))


def group_sessions(lines: list[str], key: re.Pattern = BLOCK_RE, min_sessions: int = 1) -> dict[str, list[str]]:
    """{session key: masked messages in order}. A line naming several blocks joins each of their sessions.

    Lines with no key are dropped; SessionError when fewer than ``min_sessions`` sessions come out (saying how
    many lines matched)."""
    sessions: dict[str, list[str]] = {}
    unmatched = 0
    for line in lines:
        if not line.strip():
            continue
        ids = list(dict.fromkeys(key.findall(line)))
        if not ids:
            unmatched += 1
            continue
        msg = message_of(line)
        for b in ids:
            sessions.setdefault(b, []).append(msg)
    if len(sessions) < min_sessions:
        total = sum(1 for x in lines if x.strip())
        raise SessionError(f"found {len(sessions)} sessions in {total} non-empty lines ({unmatched} match no "
                           f"session key /{key.pattern}/); need at least {min_sessions}",
                           hint="pass raw HDFS log lines that name block ids (blk_...)")
    return sessions


def join_session(messages: list[str]) -> str:
    """One session as text: its messages joined by the separator. SessionError for an empty session."""
    messages = [m for m in messages if m.strip()]
    if not messages:
        raise SessionError("an empty session: 0 messages found, at least 1 needed")
    return SEP.join(messages)


def _read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise SessionError(f"{str(p)!r} is {'a folder' if p.is_dir() else 'not there'}, not a log or sessions file",
                           hint="give a `Sequence,label` CSV or a file of raw log lines")
    try:
        if p.suffix == ".gz":
            return gzip.decompress(p.read_bytes()).decode("utf-8")
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise SessionError(f"{str(p)!r} is not UTF-8 text ({type(exc).__name__})",
                           hint="give a `Sequence,label` CSV or a file of raw log lines") from None


def data_file(name: str) -> Path:
    """A shipped file in lowres/anomaly/data (``.gz`` copies are found by their plain name too)."""
    for cand in (DATA_DIR / name, DATA_DIR / (name + ".gz")):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no {name} in {DATA_DIR}")


def read_templates(path: str | Path | None = None) -> dict[str, str]:
    """{event id: readable template}: leading/trailing wildcards dropped, ``<*>`` spaced as in masked lines."""
    text = _read_text(path or data_file("HDFS_templates.csv"))
    out = {}
    for row in csv.DictReader(io.StringIO(text)):
        t = row["EventTemplate"].replace(WILDCARD, f" {WILDCARD} ")
        words = t.split()
        while words and words[0] == WILDCARD:
            words.pop(0)
        while words and words[-1] == WILDCARD:
            words.pop()
        out[row["EventId"]] = " ".join(words)
    return out


def _ids(seq: str) -> list[str]:
    return [t if t.startswith("E") else f"E{t}" for t in seq.split()]


def read_labeled_sessions(path: str | Path | None = None) -> list[tuple[list[str], int]]:
    """[(event ids, label)] from a ``Sequence,label`` CSV (ids as ``5`` or ``E5``; label 0 normal, 1 anomaly)."""
    text = _read_text(path or data_file("hdfs_sessions_labeled.csv"))
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"Sequence", "label"} <= set(reader.fieldnames):
        raise SessionError(f"{path}: expected columns Sequence,label, found {reader.fieldnames}")
    rows = []
    for line, r in enumerate(reader, start=2):
        label = (r["label"] or "").strip()
        if label not in ("0", "1"):
            raise SessionError(f"{path}:{line}: label {label!r} is not 0 or 1", hint="0 marks normal, 1 anomalous")
        rows.append((_ids(r["Sequence"] or ""), int(label)))
    return [(ids, y) for ids, y in rows if ids]


def read_id_sessions(path: str | Path | None = None) -> list[list[str]]:
    """Sessions of event ids, one per line (``hdfs_train_normal_sessions.txt``)."""
    text = _read_text(path or data_file("hdfs_train_normal_sessions.txt"))
    return [_ids(line) for line in text.splitlines() if line.strip()]


def render_ids(ids: list[str], templates: dict[str, str]) -> str:
    """A session of event ids as text, the templates joined by the separator."""
    unknown = sorted({i for i in ids if i not in templates})
    if unknown:
        raise SessionError(f"unknown event ids {unknown[:5]} ({len(unknown)} in all); templates know "
                           f"{len(templates)} ids")
    return join_session([templates[i] for i in ids])


def window(text: str, tokenizer, max_length: int) -> str:
    """``text`` cut to its first ``max_length`` tokens — what the model sees (sessions longer than that are
    judged on their beginning, which in HDFS carries the allocation and the first errors)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_length:
        return text
    return tokenizer.decode(ids[:max_length])
