"""FLOPs per token and the cached roofline behind MFU."""

from __future__ import annotations

import json

import pytest

from lowres.models import load_spec
from lowres.train.mfu import gemm_shapes, mfu, raise_to_achieved, roofline, train_flops_per_token


def test_flops_per_token_of_smollm2_135m():
    spec = load_spec("SmolLM2-135M")
    # 30 layers × (q,k,v,o: 576·576·2 + 576·192·2; gate,up,down: 3·576·1536) = 106.2M block weights,
    # lm_head 49152·576 = 28.3M. Frozen: forward 2N + backward 2N = 4 per weight; attention 12·L·s·d.
    block = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    head = 49152 * 576
    expected = 4 * (block + head) + 12 * 30 * 256 * 9 * 64 + 6 * 1000
    assert train_flops_per_token(spec, 256, 1000) == pytest.approx(expected, rel=1e-9)


def test_roofline_is_measured_once_and_cached_by_key(tmp_path, monkeypatch):
    # a quiet machine: a roofline measured while the machine is busy is not cached (tests/test_advisor_families.py)
    monkeypatch.setattr("lowres.advisor.calibrate.machine_load", lambda: {"load1": 0.5, "cpus": 2, "load_per_cpu": 0.25})
    spec = load_spec("tiny")
    path = tmp_path / "roofline.json"
    first = roofline(spec, "fp32", 64, fingerprint="fp-test", path=path, budget_s=0.2)
    assert first.source == "measured" and first.flops_per_s > 1e8
    assert (64, spec.hidden_size, spec.vocab_size) in first.shapes and first.shapes == gemm_shapes(spec, 64)
    again = roofline(spec, "fp32", 64, fingerprint="fp-test", path=path, budget_s=0.2)
    assert again.source == "cache" and again.flops_per_s == first.flops_per_s
    other = roofline(spec, "fp32", 64, fingerprint="another-machine", path=path, budget_s=0.2)
    assert other.source == "measured"
    assert len(json.loads(path.read_text())) == 2


def test_mfu_arithmetic():
    assert mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)
    assert mfu(1.0, 1.0, 0.0) != mfu(1.0, 1.0, 0.0)  # nan when the peak is unknown


def test_a_roofline_below_an_achieved_rate_is_raised_so_mfu_stays_at_most_one(tmp_path):
    """A roofline measured while the machine was busy can be lower than what a later run achieves."""
    path = tmp_path / "roofline.json"
    spec = load_spec("tiny")
    low = roofline(spec, "fp32", 64, fingerprint="fp-test", path=path, budget_s=0.2)
    import dataclasses

    stale = dataclasses.replace(low, flops_per_s=1.0)  # as if measured under heavy contention
    achieved = 5e6
    new = raise_to_achieved(stale, achieved, fingerprint="fp-test", path=path, budget_s=0.2)
    assert new.flops_per_s >= achieved
    assert mfu(achieved / 1000, 1000, new.flops_per_s) <= 1.0
    cached = roofline(spec, "fp32", 64, fingerprint="fp-test", path=path)
    assert cached.source == "cache" and cached.flops_per_s == pytest.approx(new.flops_per_s)
    # a roofline that holds is returned unchanged, without measuring
    assert raise_to_achieved(new, new.flops_per_s / 2, fingerprint="fp-test", path=path) is new
