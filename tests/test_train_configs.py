"""Every shipped run config loads and validates, and names a model preset that exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowres.config import load_config
from lowres.models import list_presets
from lowres.paths import configs_dir

RUNS = sorted((configs_dir() / "runs").glob("*.yaml"))


@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_run_config_loads(path: Path):
    cfg = load_config(path, use_env=False)
    assert cfg.model.name in list_presets()
    assert cfg.data.sample or cfg.data.path
