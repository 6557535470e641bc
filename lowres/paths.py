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
