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


def test_a_huge_vocabulary_head_is_measured_without_its_full_operand():
    """The roofline times the LM head's GEMM at most MAX_COLUMNS wide: a 262k-vocabulary head's full operand
    (1 GiB in fp32 at hidden 1024) must not become the first run's memory peak. VmHWM in a fresh process."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from lowres.train.mfu import measure_gemm_flops\n"
        "torch.ones(1)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "f = measure_gemm_flops([(64, 1024, 262144)], 'fp32', budget_s=0.2)\n"
        "print(f > 0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    ok, grew_mib = out.stdout.split()
    assert ok == "True"
    assert int(grew_mib) < 256  # the full [1024 × 262144] fp32 operand alone would be 1,024 MiB
