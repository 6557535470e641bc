"""The roofline cache, without torch: where measured peak FLOP/s are kept and under which key, so that
`lowres advise` (which loads nothing) can read what `lowres train`/`tune` measured here.

Keys: ``<fingerprint>:<device>|<dtype>|t<threads>|<M>x<K>x<N>,...`` (the model's GEMM shapes at the
micro-batch's tokens); values: lowres.train.mfu.RooflineResult as a dict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def gemm_shapes(spec: Any, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the forward GEMMs of one micro-batch: each distinct block projection and the lm_head."""
    from lowres.advisor.memory import linear_shapes

    shapes = {(tokens, k, n) for k, n in linear_shapes(spec).values()}
    shapes.add((tokens, spec.hidden_size, spec.vocab_size))
    return sorted(shapes)


def cache_path() -> Path:
    """``$LOWRES_CACHE_DIR/roofline.json``, else ``~/.cache/lowres/roofline.json``."""
    root = os.environ.get("LOWRES_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lowres")
    return Path(root) / "roofline.json"


def cache_key(fingerprint: str, dtype: str, threads: int, shapes: list[tuple[int, int, int]]) -> str:
    return f"{fingerprint}|{dtype}|t{threads}|" + ",".join("x".join(map(str, s)) for s in shapes)


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measure again and overwrite it


def write_cache(path: Path, cache: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, path)  # atomic: two runs measuring at once never leave half a file


def keep_if_quiet(path: Path, key: str, value: dict, before: dict, *, always: bool = False) -> None:
    """Cache ``value`` under ``key`` unless the machine was busy when the measurement began (``before``, a
    ``machine_load()``) or now: a peak measured while others held the cores would poison every later
    estimate, so it is used by the caller but not kept. ``always``: keep it anyway (a GPU is not shared)."""
    from lowres.advisor.calibrate import BUSY_LOAD_PER_CPU, machine_load

    load = machine_load()
    if always or max(before.get("load_per_cpu", 0.0), load.get("load_per_cpu", 0.0)) <= BUSY_LOAD_PER_CPU:
        cache = read_cache(path)  # read again: another run may have written since
        cache[key] = {**value, "load": load}
        write_cache(path, cache)
