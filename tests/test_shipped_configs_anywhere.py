"""Every shipped anomaly and federation config loads — also from another working directory, where the configs
they name (`base:`, `fed_config:`) are found among the shipped ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowres.paths import configs_dir

ANOMALY = sorted((configs_dir() / "anomaly").glob("hdfs-*.yaml"))
FED = sorted((configs_dir() / "fed").glob("*.yaml"))


@pytest.mark.parametrize("path", ANOMALY, ids=lambda p: p.name)
def test_anomaly_configs_and_their_teachers_load_from_anywhere(path, tmp_path, monkeypatch):
    from lowres.anomaly.pipeline import load_anomaly_config
    from lowres.anomaly.teachers import teacher_fed_config

    monkeypatch.chdir(tmp_path)
    cfg = load_anomaly_config(path)
    fed = teacher_fed_config(tmp_path / "normal.txt", tmp_path / "teachers", cfg.clients, cfg.fedavg_rounds,
                             cfg.fedavg_local_steps, cfg.fed_config)
    run = fed.run_config(0)
    assert run.model.name  # the teachers' recipe resolved through base: → a run config
    if "smollm2" in path.name:
        assert run.model.name == "SmolLM2-135M-Instruct" and run.model.weights == "pretrained"


@pytest.mark.parametrize("path", FED, ids=lambda p: p.name)
def test_fed_configs_load_from_another_directory(path, tmp_path, monkeypatch):
    from lowres.federated.config import load_fed_config

    monkeypatch.chdir(tmp_path)
    fed = load_fed_config(path)
    assert fed.base is None or Path(fed.base).is_file()
    fed.run_config(0)
