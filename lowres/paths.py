"""Where lowres finds its shipped configs (models, hardware profiles, runs, federations)."""

from __future__ import annotations

import os
from pathlib import Path

import lowres


def configs_dir() -> Path:
    """The configs folder: ``$LOWRES_CONFIGS`` if set, else ``<repo root>/configs`` next to the package.

    The environment variable comes first so that tests and installed copies can point at their own folder;
    the package-relative path serves a source checkout (editable install), where the configs live.
    """
    override = os.environ.get("LOWRES_CONFIGS")
    if override:
        return Path(override).expanduser()
    return Path(lowres.__file__).resolve().parents[1] / "configs"
