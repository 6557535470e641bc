"""locate_weights(): where a model's weights come from — a local path, the HF cache, the hub, or random init.

Order: local path > Hugging Face cache > hub (only when not offline) > random weights from the preset's
architecture (weights="auto" only). Random init is never silent: a warning goes to stderr and the caller
tags the run ``weights=random-init`` (DESIGN.md, "Model weights and tokenizers").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lowres.errors import ModelError
from lowres.models.spec import ModelSpec, list_presets, load_spec

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


@dataclass(frozen=True)
class WeightsLocation:
    """Where the weights are. ``path`` is a folder with config.json (None for random-init); ``spec`` is the
    architecture (from the preset, else from config.json); ``tried`` lists what was looked at, in order."""

    kind: Literal["local", "cache", "hub", "random-init"]
    path: str | None
    hub_id: str | None
    spec: ModelSpec
    revision: str | None = None
    trust_remote_code: bool = False
    tried: list[str] = field(default_factory=list)

    @property
    def pretrained(self) -> bool:
        return self.kind != "random-init"


def hub_offline() -> bool:
    """True when the hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # an old huggingface_hub without the constant: the environment decided above
        return False


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        next(folder.glob(p), None) is not None for p in WEIGHT_PATTERNS)


def _spec_from_folder(folder: Path, name: str, hub_id: str | None, preset: ModelSpec | None) -> ModelSpec:
    if preset is not None:
        return preset
    return ModelSpec.from_hf_config(json.loads((folder / "config.json").read_text()), name, hub_id)


def _from_cache(hub_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(hub_id, revision=revision, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or an id the hub would refuse: not here either way
        return None
    return folder if _has_weights(folder) else None


def _from_hub(hub_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(
            hub_id, revision=revision, etag_timeout=10,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
    except Exception:  # no network, unknown or gated repository: the caller reports everything tried
        return None
    return folder if _has_weights(folder) else None


def warn_random_init(spec: ModelSpec, why: str) -> None:
    """The console warning every random-init run shows (rich, stderr)."""
    from rich.console import Console

    # soft_wrap: one line per message, so logs and greps see the whole warning
    Console(stderr=True, soft_wrap=True).print(
        f"[bold yellow]warning:[/] model {spec.name!r}: {why} — building it with [bold]random weights[/] from "
        f"its architecture ({spec.param_count() / 1e6:.1f}M parameters). Memory and speed figures are real; "
        "loss and quality figures are not those of the pretrained model. The run is tagged weights=random-init.",
        highlight=False)


def locate_weights(cfg: Any) -> WeightsLocation:
    """Find the weights a ModelConfig asks for (see the module docstring for the order).

    Raises ModelError when weights="pretrained" and none are reachable, or when the name is neither a
    reachable model nor a preset — saying what was tried and how to fix it.
    """
    name, revision = cfg.name, cfg.revision
    preset = load_spec(name) if name in list_presets() else None
    hub_id = preset.hub_id if preset else name
    extra = dict(revision=revision, trust_remote_code=cfg.trust_remote_code)
    tried: list[str] = []

    if cfg.weights == "random-init" and preset is not None:
        return WeightsLocation("random-init", None, hub_id, preset, tried=["weights=random-init asked"], **extra)

    local = Path(name).expanduser()
    if preset is None and local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"model path {str(local)!r} has no config.json",
                             hint="give a folder written by save_pretrained(), a hub id or a preset name")
        spec = _spec_from_folder(local, local.name, None, None)
        if cfg.weights == "random-init":
            return WeightsLocation("random-init", str(local), None, spec, tried=[f"local {local}"], **extra)
        if not _has_weights(local):
            raise ModelError(f"model path {str(local)!r} has a config.json but no *.safetensors or *.bin weights",
                             hint="copy the weight files there, or use weights=random-init")
        return WeightsLocation("local", str(local.resolve()), None, spec, tried=[f"local path {local}"], **extra)
    tried.append(f"local path {str(local)!r}: not a folder")

    if hub_id:
        folder = _from_cache(hub_id, revision)
        if folder is not None:
            spec = _spec_from_folder(folder, preset.name if preset else name, hub_id, preset)
            if cfg.weights == "random-init":
                return WeightsLocation("random-init", str(folder), hub_id, spec, tried=tried, **extra)
            return WeightsLocation("cache", str(folder), hub_id, spec, tried=tried, **extra)
        tried.append(f"Hugging Face cache: no complete snapshot of {hub_id!r}")
        if hub_offline():
            tried.append("hub: skipped, offline (HF_HUB_OFFLINE)")
        else:
            folder = _from_hub(hub_id, revision)
            if folder is not None:
                spec = _spec_from_folder(folder, preset.name if preset else name, hub_id, preset)
                return WeightsLocation("hub", str(folder), hub_id, spec, tried=tried, **extra)
            tried.append(f"hub: {hub_id!r} could not be downloaded (no network, unknown or gated)")
    else:
        tried.append(f"preset {name!r} has no pretrained weights (no hub_id)")

    if preset is not None and cfg.weights == "auto":
        warn_random_init(preset, "no pretrained weights reachable")
        return WeightsLocation("random-init", None, hub_id, preset, tried=tried, **extra)
    if preset is not None:
        raise ModelError(f"pretrained weights of {name!r} are not reachable; tried: " + "; ".join(tried),
                         hint="download them (huggingface-cli download " + str(hub_id) + "), give a local "
                         "path, or use --set model.weights=auto to fall back to random-init")
    raise ModelError(f"model {name!r} was not found; tried: " + "; ".join(tried),
                     hint=f"give a local folder with config.json and weights, a model in the HF cache, go "
                     f"online, or use a preset ({', '.join(list_presets())})")
