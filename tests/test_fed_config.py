"""Every shipped federation config loads; mistakes are reported with their field."""

from pathlib import Path

import pytest

from lowres.errors import ConfigError
from lowres.federated.config import load_fed_config

CONFIGS = sorted(Path("configs/fed").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    fed = load_fed_config(path)
    cfg = fed.run_config()
    assert cfg.train.max_steps == fed.rounds * fed.local_steps
    assert not cfg.tracking.mlflow and cfg.tracking.profiler_mode == "off" and cfg.checkpoint.every == 0


def test_client_overrides_and_max_rank():
    fed = load_fed_config(CONFIGS[0], ["client_overrides={1: [lora.rank=16, lora.alpha=32]}"])
    assert fed.run_config(1).lora.rank == 16 and fed.run_config(0).lora.rank == 8
    assert fed.max_rank() == 16


def test_errors_name_the_field():
    with pytest.raises(ConfigError) as err:
        load_fed_config(CONFIGS[0], ["compression.up=gzip", "compression.down=topk10", "rounds=0"])
    text = str(err.value) + " ".join(getattr(err.value, "problems", []) or [])
    for needle in ("compression.up", "compression.down", "rounds"):
        assert needle in text
    with pytest.raises(ConfigError, match="lora.rank"):
        load_fed_config(CONFIGS[0], ["client_overrides={0: [lora.rank=0]}"])


def test_stalled_must_outlast_a_round_timeout():
    """A round may wait round_timeout_s for replies: the stalled threshold must be longer. Left at its default
    it follows a long timeout; set explicitly too low it is refused, naming both fields."""
    fed = load_fed_config(CONFIGS[0], ["robustness.round_timeout_s=1800"])
    assert fed.tracking.stalled_after_s == 2700
    assert load_fed_config(CONFIGS[0], ["robustness.round_timeout_s=60"]).tracking.stalled_after_s == 900
    with pytest.raises(ConfigError) as err:
        load_fed_config(CONFIGS[0], ["robustness.round_timeout_s=600", "tracking.stalled_after_s=300"])
    text = str(err.value) + " ".join(getattr(err.value, "problems", []) or [])
    assert "tracking.stalled_after_s" in text and "round_timeout_s" in text
