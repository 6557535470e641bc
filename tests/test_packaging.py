"""A wheel carries the shipped configs (pyproject data-files), and lowres finds them without a checkout."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import lowres
from lowres.paths import configs_dir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_file_is_in_the_wheels_data_files():
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data_files = doc["tool"]["setuptools"]["data-files"]
    packaged = {Path(f) for patterns in data_files.values() for p in patterns for f in glob.glob(str(ROOT / p))}
    shipped = {p for p in (ROOT / "configs").rglob("*") if p.is_file()}
    assert shipped and shipped == packaged, f"not in pyproject data-files: {sorted(map(str, shipped - packaged))}"
    for target, patterns in data_files.items():  # each lands under share/lowres/ + its own folder
        assert all(target == "share/lowres/" + str(Path(p).parent) for p in patterns), target


def test_configs_dir_falls_back_to_the_installed_share_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWRES_CONFIGS", raising=False)
    assert configs_dir() == ROOT / "configs"  # a checkout: its own folder
    site = tmp_path / "site-packages" / "lowres"
    site.mkdir(parents=True)
    monkeypatch.setattr(lowres, "__file__", str(site / "__init__.py"))  # a wheel install: no configs beside it
    share = tmp_path / "prefix" / "share" / "lowres" / "configs"
    (share / "models").mkdir(parents=True)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    assert configs_dir() == share
    monkeypatch.setenv("LOWRES_CONFIGS", str(tmp_path / "mine"))
    assert configs_dir() == tmp_path / "mine"
