"""Where lowres finds its shipped configs (models, hardware profiles, runs, federations)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lowres


def configs_dir() -> Path:
    """The configs folder: ``$LOWRES_CONFIGS`` if set, else ``<repo root>/configs`` next to the package (a
    source checkout or editable install), else ``<prefix>/share/lowres/configs`` (a wheel install puts its
    copy there: pyproject's data-files).

    The environment variable comes first so that tests and installed copies can point at their own folder.
    """
    override = os.environ.get("LOWRES_CONFIGS")
    if override:
        return Path(override).expanduser()
    checkout = Path(lowres.__file__).resolve().parents[1] / "configs"
    if checkout.is_dir():
        return checkout
    for prefix in (sys.prefix, sys.base_prefix):
        shared = Path(prefix) / "share" / "lowres" / "configs"
        if shared.is_dir():
            return shared
    return checkout  # neither: callers name this path in their "not found" errors


def cache_dir() -> Path:
    """lowres' cache root: ``$LOWRES_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowres``, else ``~/.cache/lowres``."""
    root = os.environ.get("LOWRES_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lowres")
    return Path(root)


def find_config_file(name: str | Path, beside: str | Path | None = None) -> Path:
    """A config file one config names (a federation's ``base:``, an anomaly run's ``fed_config:``): as given
    (absolute, or relative to the working directory), else relative to the folder of the YAML that names it
    (``beside``), else a shipped one — ``configs/…`` read under :func:`configs_dir` — so shipped configs work
    from any working directory and from a wheel install. Returns the path as given when none exists (the
    reader's "does not exist" error then names it)."""
    p = Path(name).expanduser()
    if p.is_absolute() or p.is_file():
        return p
    if beside is not None and (Path(beside).parent / p).is_file():
        return Path(beside).parent / p
    parts = p.parts
    if parts and parts[0] == "configs" and (configs_dir().joinpath(*parts[1:])).is_file():
        return configs_dir().joinpath(*parts[1:])
    return p
