"""read_records(): a DataConfig's examples as a list of dicts, from local files, the hub, or a shipped sample.

Formats: .jsonl (one JSON object per line), .json (a list of objects), .csv (a header row), .txt (one record
``{"text": line}`` per non-empty line, as the `datasets` text loader reads lines). A folder reads every such
file in it, sorted by path. Problems are DataErrors naming the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lowres.errors import DataError

FORMATS = (".jsonl", ".json", ".csv", ".txt")
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "sample_data"


def list_samples() -> list[str]:
    """Names of the sample datasets shipped in lowres/sample_data/."""
    return sorted(p.stem for p in SAMPLES_DIR.iterdir() if p.suffix in FORMATS) if SAMPLES_DIR.is_dir() else []


def sample_path(name: str) -> Path:
    """The file of the shipped sample ``name``; DataError listing the samples when there is none."""
    for ext in FORMATS:
        path = SAMPLES_DIR / f"{name}{ext}"
        if path.is_file():
            return path
    raise DataError(f"no sample dataset named {name!r}",
                    hint=f"use one of {', '.join(list_samples())}, or give data.path")


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})",
                                hint="each line of a .jsonl file must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: a JSON {type(obj).__name__}, not an object",
                                hint='each line must look like {"text": "..."}')
            records.append(obj)
    return records


def _read_json(path: Path) -> list[dict]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]}, as some exports wrap their rows
    if not isinstance(obj, list):
        raise DataError(f"{path}: a .json file must hold a list of objects, not a {type(obj).__name__}",
                        hint="or write one object per line as .jsonl")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i} is a {type(item).__name__}, not an object")
    return obj


def _read_csv(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            return []
        try:
            for row in reader:
                if None in row or None in row.values():
                    raise DataError(f"{path}:{reader.line_num}: {len(reader.fieldnames)} columns in the header, "
                                    "a different number on this line", hint="quote fields that contain commas")
                records.append(row)
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    return records


def _read_txt(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8", errors="strict")
    return [{"text": line} for line in text.splitlines() if line.strip()]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".txt": _read_txt}


def read_file(path: Path) -> list[dict]:
    """Records of one file, by its extension."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}", hint=f"use one of {', '.join(FORMATS)}")
    try:
        return reader(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_hub(spec: str) -> list[dict]:
    """``hf:<name>`` or ``hf:<name>:<split>`` through `datasets` (split defaults to train)."""
    name, _, split = spec[3:].partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # offline, unknown name, missing split: one message for all of them
        raise DataError(f"Hugging Face dataset {name!r} could not be loaded: {type(exc).__name__}: {exc}",
                        hint="check the name and the network (HF_DATASETS_OFFLINE), or give a local file "
                        "or data.sample") from None
    return [dict(row) for row in ds]


def read_records(cfg: Any) -> list[dict]:
    """All examples a DataConfig names: ``cfg.path`` (file, folder or ``hf:<name>``), else the shipped sample
    ``cfg.sample``; capped at ``cfg.max_examples``. DataError when missing, malformed or empty."""
    if cfg.path:
        if cfg.path.startswith("hf:"):
            records, where = _read_hub(cfg.path), cfg.path
        else:
            root = Path(cfg.path).expanduser()
            if root.is_dir():
                files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
                if not files:
                    raise DataError(f"data folder {str(root)!r} holds no {'/'.join(FORMATS)} files")
                records = [r for f in files for r in read_file(f)]
            elif root.is_file():
                records = read_file(root)
            else:
                raise DataError(f"data file {str(root)!r} does not exist",
                                hint="check data.path, or leave it out to use a shipped sample")
            where = str(root)
    elif cfg.sample:
        path = sample_path(cfg.sample)
        records, where = read_file(path), f"sample {cfg.sample!r} ({path.name})"
    else:
        raise DataError("no data given: data.path and data.sample are both empty",
                        hint=f"set data.path, or data.sample to one of {', '.join(list_samples())}")
    if not records:
        raise DataError(f"{where} holds no examples", hint="the dataset is empty; check the file")
    if cfg.max_examples:
        records = records[: cfg.max_examples]
    return records
