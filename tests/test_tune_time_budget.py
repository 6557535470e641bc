"""`lowres tune --auto --time-budget`: training steps cut to what the measured step time allows, said in a reason."""

from __future__ import annotations

import pytest

from lowres.advisor.tune import MIN_STEPS, TRAIN_SETUP_S, steps_for_time
from lowres.cli.tune import parse_duration
from lowres.config import load_config
from lowres.errors import UsageError


def _cfg(steps: int = 50, eval_batches: int = 8):
    return load_config(None, [f"train.max_steps={steps}", f"train.eval_batches={eval_batches}"], use_env=False)


def test_steps_are_cut_to_the_time_left_after_setup_and_evaluations():
    cfg = _cfg(50, eval_batches=6)
    step_s = 2.0
    evals = 2 * 6 * step_s / 3  # two evaluations of 6 forward-only batches at ~1/3 of a step each
    steps, why = steps_for_time(cfg, step_s, remaining_s=TRAIN_SETUP_S + evals + 31 * step_s + 1.0)
    assert steps == 31
    assert "cut from 50 to 31" in why and "2.00 s per step" in why


def test_all_steps_when_they_fit_and_a_floor_when_nothing_does():
    cfg = _cfg(20)
    assert steps_for_time(cfg, 1.0, remaining_s=10_000)[0] == 20
    steps, why = steps_for_time(cfg, 30.0, remaining_s=40.0)
    assert steps == MIN_STEPS and "overrun" in why


@pytest.mark.parametrize("text, seconds", [("5m", 300), ("300s", 300), ("300", 300), ("1h", 3600),
                                           ("1.5m", 90), ("0", 0)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["five minutes", "5d", "-3m", ""])
def test_bad_durations_are_usage_errors(text):
    with pytest.raises(UsageError, match="duration"):
        parse_duration(text)
