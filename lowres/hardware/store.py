"""Saved hardware profiles: YAML files under configs/hardware/, for what-if advice about other machines."""

from __future__ import annotations

import datetime
from pathlib import Path

import yaml
from pydantic import ValidationError

from lowres.errors import ConfigError, UsageError
from lowres.hardware.profile import HardwareProfile
from lowres.paths import configs_dir

# Where a profile came from is not a trait of the machine: it is set on load, not saved.
_NOT_SAVED = {"source", "is_estimate_only"}


def profiles_dir() -> Path:
    """The folder of saved profiles: ``<configs>/hardware``."""
    return configs_dir() / "hardware"


def list_profiles() -> list[str]:
    """Names (file stems) of the saved profiles, sorted."""
    folder = profiles_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _resolve(name_or_path: str | Path) -> Path:
    """A path as given when it names a file (or looks like one), else ``<configs>/hardware/<name>.yaml``."""
    given = Path(name_or_path)
    if given.is_file() or given.suffix in (".yaml", ".yml") or len(given.parts) > 1:
        if not given.is_file():
            raise UsageError(f"hardware profile file not found: {given}",
                             hint="give a saved profile's name or an existing YAML path")
        return given
    for suffix in (".yaml", ".yml"):
        candidate = profiles_dir() / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    available = ", ".join(list_profiles()) or "none"
    raise UsageError(
        f"unknown hardware profile {str(name_or_path)!r} (looked in {profiles_dir()})",
        hint=f"available: {available}; or save this machine's with `lowres hw --save PATH`",
    )


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """Load a saved profile by name (stem under configs/hardware/) or path.

    ``source`` becomes the file's path; ``is_estimate_only`` is True unless the profile is of this machine
    (same fingerprint), since advice from it cannot be verified by running here.
    """
    from lowres.hardware.detection import this_machine_fingerprint

    path = _resolve(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"hardware profile {path} is not UTF-8 text (byte {exc.start})",
                          hint="give a YAML file written by `lowres hw --save`") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"hardware profile {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"hardware profile {path} must be a mapping of fields, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in _NOT_SAVED}
    try:
        profile = HardwareProfile.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"hardware profile {path} does not validate", problems) from exc
    profile.source = str(path)
    profile.is_estimate_only = profile.fingerprint != this_machine_fingerprint()
    return profile


def profile_to_yaml(profile: HardwareProfile) -> str:
    """The profile as YAML, fields in declaration order, under a comment saying where it came from."""
    data = profile.model_dump(mode="json", exclude=_NOT_SAVED)
    header = (
        f"# Hardware profile saved by `lowres hw --save` on {datetime.date.today().isoformat()}.\n"
        "# fingerprint and tier are derived from the other fields when the file is loaded.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def save_profile(profile: HardwareProfile, path: str | Path) -> Path:
    """Write the profile to ``path`` as YAML (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile_to_yaml(profile))
    return path
