"""The global adapter on disk: one safetensors file per round, written atomically; a restarted server resumes.

    <fed dir>/global/round-0003.safetensors   the LoRA tensors after round 3 (peft names, float32),
                                              with metadata {"round": "3", "federation": …, "rank": …}

Written to a temp name and renamed into place (atomic on one filesystem), so a server killed mid-write
leaves the previous round readable. ``keep`` newest files stay.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PREFIX = "round-"


def save_global(folder: str | Path, round_no: int, tensors: dict[str, np.ndarray], meta: dict | None = None,
                keep: int = 3) -> Path:
    """Write round ``round_no``'s global adapter; return its path."""
    from safetensors.numpy import save_file

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{PREFIX}{round_no:04d}.safetensors"
    tmp = path.with_suffix(".tmp")
    metadata = {"round": str(round_no), **{k: str(v) for k, v in (meta or {}).items()}}
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp), metadata)
    os.replace(tmp, path)
    for old in sorted(d.glob(f"{PREFIX}*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest_global(folder: str | Path) -> tuple[int, dict[str, np.ndarray], dict] | None:
    """(round, tensors, metadata) of the newest saved round in ``folder``, or None if there is none."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    files = sorted(Path(folder).glob(f"{PREFIX}*.safetensors"))
    if not files:
        return None
    path = files[-1]
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
    return int(meta.get("round", path.stem[len(PREFIX):])), load_file(str(path)), meta
