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


@pytest.mark.parametrize("bf16_gflops, want", [(2000.0, "bf16"), (448.0, "bf16"), (207.0, "fp32"), (300.0, "fp32")])
def test_auto_keeps_bf16_only_where_its_gemms_measure_faster(monkeypatch, bf16_gflops, want):
    """precision auto on a CPU with native bf16 by its flags: bf16 only if its GEMMs at the model's shapes run at
    ≥ 1.25× fp32's here (AMX ~6×, an AVX512_BF16 EPYC 2.2×; the AMX Xeon with AMX turned off 0.6×: fp32)."""
    from lowres.config import ModelConfig, PrecisionConfig
    from lowres.hardware import detect
    from lowres.models import locate_weights, resolve_precision
    from lowres.train import mfu

    rates = {"bf16": bf16_gflops * 1e9, "fp32": 276e9}
    asked = []

    def fake_roofline(spec, dtype, tokens, **kw):
        asked.append(dtype)
        return mfu.RooflineResult(flops_per_s=rates[dtype], dtype=dtype, threads=2, shapes=[], source="measured",
                                  measured_at=0.0)

    monkeypatch.setattr(mfu, "roofline", fake_roofline)
    monkeypatch.setattr(mfu, "_AUTO_RATES", {})
    hw = detect()
    hw = hw.model_copy(update={"cpu": hw.cpu.model_copy(update={"bf16_fast": True})})
    spec = locate_weights(ModelConfig(name="tiny")).spec
    p = PrecisionConfig(compute="auto")
    rp = mfu.measured_auto_precision(p, resolve_precision(p, hw, "cpu"), hw, spec, 512)
    assert rp.compute_dtype == want and rp.weights_dtype == want
    assert f"{bf16_gflops:,.0f} GFLOP/s in bf16" in rp.reasons[0] and "276 in fp32" in rp.reasons[0]
    assert asked == ["bf16", "fp32"]
    again = mfu.measured_auto_precision(p, resolve_precision(p, hw, "cpu"), hw, spec, 512)
    assert again.compute_dtype == want and asked == ["bf16", "fp32"]  # measured once per process
    asked.clear()
    for set_ in ("bf16", "fp32"):  # a dtype the user set is never second-guessed, and nothing is measured
        q = PrecisionConfig(compute=set_)
        assert mfu.measured_auto_precision(q, resolve_precision(q, hw, "cpu"), hw, spec, 512).compute_dtype == set_
    no_bf16 = hw.model_copy(update={"cpu": hw.cpu.model_copy(update={"bf16_fast": False})})
    assert mfu.measured_auto_precision(p, resolve_precision(p, no_bf16, "cpu"), no_bf16, spec, 512).compute_dtype \
        == "fp32"
    assert asked == []
