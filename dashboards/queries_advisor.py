"""Cached readers for the Advisor page: hardware profiles, presets, estimates; and its one write, the RunConfig."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import streamlit as st

ADVICE_TTL_S = 600  # estimates are pure arithmetic on fixed inputs; the TTL only bounds the cache's size
HARDWARE_TTL_S = 60  # detect() reads available RAM, which changes while other programs run
GIB = 1024**3


@st.cache_data(ttl=HARDWARE_TTL_S, show_spinner="reading the hardware profile")
def hardware(name: str | None) -> dict[str, Any]:
    """A hardware profile as a plain dict: this machine when ``name`` is None, else a saved profile."""
    from lowres.hardware import detect, load_profile

    hw = load_profile(name) if name else detect()
    return hw.model_dump(mode="json") | {"is_estimate_only": hw.is_estimate_only, "source": hw.source}


@st.cache_data(ttl=ADVICE_TTL_S, show_spinner=False)
def choices() -> dict[str, list[str]]:
    """Model presets and saved hardware profiles to pick from."""
    from lowres.hardware import list_profiles
    from lowres.models import list_presets

    return {"models": list(list_presets()), "hardware": list(list_profiles())}


def _profile(hw: dict[str, Any]):
    from lowres.hardware import HardwareProfile

    hwp = HardwareProfile.model_validate({k: v for k, v in hw.items() if k != "is_estimate_only"})
    hwp.is_estimate_only = hw["is_estimate_only"]
    return hwp


@st.cache_data(ttl=ADVICE_TTL_S, show_spinner="estimating")
def advice(model: str, hw: dict[str, Any], candidate: dict[str, Any], headroom: float) -> dict[str, Any]:
    """The estimate of ``candidate``, the same at batch sizes 1, 2, 4, … past the largest that fits (for the
    charts: the curve crosses the limit), that largest batch, and the precision × quantization × rank grid."""
    from lowres.advisor import Candidate, estimate, largest_fitting_batch
    from lowres.advisor.grid import candidate_grid
    from lowres.models.spec import resolve_spec  # a preset, a local folder with config.json, or a hub id

    spec, hwp, cand = resolve_spec(model), _profile(hw), Candidate.model_validate(candidate)
    est = estimate(spec, hwp, cand, headroom=headroom)
    largest = largest_fitting_batch(spec, hwp, cand, headroom=headroom)
    sweep_to = min(4096, max(64, 2 * largest, cand.batch_size))
    batches = sorted({2**i for i in range(int(math.log2(sweep_to)) + 1)} | {cand.batch_size})
    sweep = [estimate(spec, hwp, cand.model_copy(update={"batch_size": b}), headroom=headroom).to_dict()
             for b in batches]
    grid = candidate_grid(spec, hwp, cand, headroom=headroom)
    grid_rows = [{"precision": g.compute, "quant": g.quant, "rank": g.rank, "largest batch": g.max_batch,
                  **{f"peak GiB @ batch {b}": e.peak_bytes / GIB for b, e in g.by_batch.items()},
                  "step s @ largest": None if g.at_max is None else g.at_max.step_time_s,
                  "slow here": g.by_batch[next(iter(g.by_batch))].slow_precision} for g in grid]
    return {"model": spec.name, "parameters": spec.param_count(), "estimate": est.to_dict(), "sweep": sweep,
            "largest_batch": largest, "grid": grid_rows}


def run_config_yaml(model: str, candidate: dict[str, Any], output_dir: str) -> str:
    """The RunConfig the Advisor's what-if settings describe, as YAML (validated by RunConfig itself)."""
    from lowres.config import RunConfig

    c = candidate
    targets = c["lora_targets"] if isinstance(c["lora_targets"], str) else list(c["lora_targets"])
    cfg = RunConfig.model_validate({
        "output_dir": output_dir, "model": {"name": model},
        "precision": {"compute": c["compute"], "quant": c["quant"], "double_quant": c["double_quant"],
                      "gradient_checkpointing": c["gradient_checkpointing"]},
        "lora": {"rank": c["lora_rank"], "targets": targets},
        "data": {"max_length": c["seq_len"]},
        "train": {"batch_size": c["batch_size"], "loss_chunk_tokens": c["loss_chunk_tokens"],
                  "optimizer": c["optimizer"]}})
    return cfg.to_yaml()


def write_run_config(path: str, text: str, runs_dir: str | Path) -> Path:
    """Write the Advisor's RunConfig YAML to ``path`` (folders created); the one write the dashboard makes.

    Only inside ``runs_dir``, the runs folder `lowres dash` was started with (a relative ``path`` is taken
    relative to it), and only a .yaml/.yml file: a page anyone on the port can reach must not write anywhere
    else. ValueError otherwise, saying where it may write."""
    root = Path(runs_dir).expanduser().resolve()
    out = Path(path).expanduser()
    out = (out if out.is_absolute() else root / out).resolve()  # resolve(): no ../ or symlink way out
    if root not in out.parents:
        raise ValueError(f"{path!r} is outside the runs folder {root}; the dashboard writes only there")
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise ValueError(f"{path!r} is not a .yaml file")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
