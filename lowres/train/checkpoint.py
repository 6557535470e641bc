"""Checkpoints that survive a kill: written whole into a temp folder, then renamed into place.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00000042/`` holding

    adapter_model.safetensors, adapter_config.json   the LoRA weights (peft's own format)
    optimizer.pt                                     optimizer state (tensors and numbers only)
    trainer_state.pt                                 scheduler, RNG states (torch, python, numpy, cuda), data position
    state.json                                       step, MLflow run id, config hash, tokens seen — written last

``os.rename`` of a folder is atomic on one filesystem, so a reader sees a whole checkpoint or none; a kill
mid-write leaves only a ``.tmp`` folder, removed on the next save. The ``.pt`` files are our own, written
here, and read back with ``torch.load(weights_only=True)``: tensors and plain containers, no pickled code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowres.errors import CheckpointError

STATE_FILE = "state.json"
PREFIX = "step-"


def checkpoints_dir(output_dir: str | Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    """Every RNG a step draws from, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(gauss)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                    data_state: dict, meta: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically under ``root``; keep the newest ``keep``; return its folder.

    ``meta`` holds at least ``run_id`` and ``config_hash``; it goes into state.json with ``step``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".*.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)  # what a killed save left behind
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    tmp.mkdir()
    model.save_pretrained(str(tmp), safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state(), "data": data_state},
               tmp / "trainer_state.pt")
    state = dict(meta, step=int(step), saved_at=time.time())
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (a resumed run ending where it was stopped)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: str | Path) -> dict:
    """state.json of a checkpoint (cheap: for checks before any heavy work)."""
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {str(Path(path) / STATE_FILE)!r} cannot be read: {exc}",
                              hint="delete it to start over, or resume from an older one") from None


def check_safetensors(file: str | Path, what: str = "adapter file", hint: str | None = None) -> list[str]:
    """The tensor names in a safetensors file; CheckpointError when it is missing, truncated or not safetensors.
    Cheap: the header and the file size are checked, no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return list(f.keys())
    except Exception as exc:  # SafetensorError (truncated, bad header), OSError (missing, unreadable)
        why = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200]
        raise CheckpointError(f"{what} {str(file)!r} cannot be read: {why}", hint=hint) from None


def check_loadable(path: str | Path) -> None:
    """CheckpointError unless every file of checkpoint ``path`` is whole — before any model loads."""
    import zipfile

    path = Path(path)
    hint = "delete that folder; --resume then takes the one before it"
    check_safetensors(path / "adapter_model.safetensors", "checkpoint file", hint)
    for name in ("optimizer.pt", "trainer_state.pt"):
        if not zipfile.is_zipfile(path / name):  # torch.save writes a zip archive
            raise CheckpointError(f"checkpoint file {str(path / name)!r} is missing or damaged", hint=hint)


def check_compatible(meta: dict, config_hash: str, path: str | Path) -> None:
    """Refuse a checkpoint written by a run with another config: its weights would not mean the same."""
    found = meta.get("config_hash")
    if found != config_hash:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by a run with config hash {found}, this config has "
            f"{config_hash}",
            hint="resume with the config that wrote it, or pick a new --output-dir to start a fresh run")


def load_checkpoint(path: str | Path, model: Any, optimizer: Any, scheduler: Any) -> dict:
    """Load adapter, optimizer, scheduler and RNG states in place; return state.json plus ``data`` state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    try:
        adapter = load_file(str(path / "adapter_model.safetensors"))
        optim_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        trainer = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {exc}",
                              hint="delete that folder; --resume then takes the one before it") from None
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"checkpoint {str(path)!r} holds adapter weights this model does not have: "
                              f"{result.unexpected_keys[:3]}")
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return dict(meta, data=trainer["data"])


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)
