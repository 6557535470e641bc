"""Probes: real trials of the `tiny` recipe in a capped child process — one that fits is measured, one above
the cap is reported "does not fit" while this process carries on."""

from __future__ import annotations

import os

import psutil
import pytest

from lowres.advisor.probe import ProbeResult, _is_oom, probe, probe_config
from lowres.config import load_config

MIB = 1024**2
TINY = ["model.name=tiny", "data.sample=instructions", "data.tokenizer_vocab=1024", "precision.compute=fp32"]


def _cfg(*more: str):
    return load_config(None, TINY + list(more), use_env=False)


def test_a_probe_that_fits_is_measured():
    res = probe(_cfg("data.max_length=64", "train.batch_size=4"), cap_bytes=3 * 1024 * MIB, steps=3)
    assert res.fits is True, res.reason
    # python + torch alone is > 200 MiB; the tiny model at 4 × 64 tokens stays well under 2 GiB
    assert 200 * MIB < res.peak_rss_bytes < 2048 * MIB
    # the median leaves out the first (warm-up) step
    assert len(res.step_times) == 3 and min(res.step_times[1:]) <= res.step_s <= max(res.step_times[1:])
    assert res.tokens_per_s == pytest.approx(4 * 64 / res.step_s, rel=0.05)


def test_a_probe_above_the_cap_does_not_fit_and_we_survive():
    me = psutil.Process()
    before = me.memory_info().rss
    # 64 sequences × 512 tokens need several GiB of activations; a 900 MiB cap cannot hold them
    res = probe(_cfg("data.max_length=512", "train.batch_size=64"), cap_bytes=900 * MIB, steps=2)
    assert res.fits is False
    assert "memory" in res.reason.lower() or "exited" in res.reason
    assert res.cap_bytes == 900 * MIB
    assert res.step_s is None and res.tokens_per_s is None
    # the parent is untouched: alive, and its own memory did not grow by the child's attempt
    assert me.is_running() and me.memory_info().rss < before + 200 * MIB
    assert psutil.virtual_memory().available > 1024 * MIB


def test_a_child_that_times_out_is_unknown_not_a_fit():
    res = probe(_cfg("data.max_length=64", "train.batch_size=2"), cap_bytes=3 * 1024 * MIB, steps=2, timeout_s=1)
    assert res.fits is None and "timed out" in res.reason


def test_probe_config_switches_off_tracking_and_saving():
    cfg = probe_config(_cfg("checkpoint.every=5", "train.eval_every=2"), steps=3)
    assert not cfg.tracking.mlflow and cfg.tracking.profiler_mode == "off"
    assert cfg.checkpoint.every == 0 and cfg.train.eval_every == 0 and cfg.train.max_steps == 4
    assert os.path.basename(cfg.output_dir).startswith("lowres-probe-")


def test_allocation_failures_are_recognised():
    assert _is_oom(MemoryError())
    assert _is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 16777216 bytes"))
    assert not _is_oom(ValueError("bad config"))
    assert ProbeResult(fits=False).to_dict()["fits"] is False
