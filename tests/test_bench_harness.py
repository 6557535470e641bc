"""bench/harness_vs_hf.py runs on any CPU: its best lowres contender is what ``precision: auto`` picks there (never
an emulated bf16 that lowres refuses), and its RESULT line says the ISA and dtype. CPUs are simulated with
/proc/cpuinfo-format files, the way lowres.hardware.cpu.read_cpu reads them. No timing is asserted."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "harness_vs_hf.py"

AVX2 = "model name\t: AMD EPYC 7B12\nphysical id\t: 0\ncore id\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
BF16 = ("model name\t: Intel Xeon 8480\nphysical id\t: 0\ncore id\t: 0\n"
        "flags\t\t: fpu avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16\n")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("harness_vs_hf", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cpuinfo(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


def test_avx2_only_cpu_races_fp32_never_bf16(bench, tmp_path):
    hw = bench.machine(_cpuinfo(tmp_path, AVX2))
    assert not hw.cpu.bf16_fast and "avx2" in hw.cpu.flags
    dtype, why = bench.best_compute(hw)
    assert dtype == "fp32" and "no fast bf16" in why
    assert bench.contenders(hw) == {"hf-fp32": "hf", "lowres-fp32": "fp32"}


def test_avx512_bf16_cpu_adds_the_bf16_contender(bench, tmp_path):
    hw = bench.machine(_cpuinfo(tmp_path, BF16))
    dtype, _ = bench.best_compute(hw)
    assert dtype == "bf16"
    assert bench.contenders(hw) == {"hf-fp32": "hf", "lowres-fp32": "fp32", "lowres-bf16": "bf16"}


@pytest.mark.parametrize("isa, dtype", [("avx2", "fp32"), ("avx512", "fp32"), ("avx512_bf16", "bf16")])
def test_isa_caps_choose_the_contenders_as_the_kernels_will_run(bench, tmp_path, monkeypatch, isa, dtype):
    """--isa sets the settings that cap torch's kernels; lowres' detection reads the same ones, so an
    AVX512_BF16 CPU capped below bf16 races fp32 only (its bf16 GEMMs would be emulated)."""
    for var, value in bench.ISA_ENV[isa].items():
        monkeypatch.setenv(var, value)
    hw = bench.machine(_cpuinfo(tmp_path, BF16))
    assert bench.best_compute(hw)[0] == dtype
    assert ("lowres-bf16" in bench.contenders(hw)) == (dtype == "bf16")
    assert ("avx512f" in hw.cpu.flags) == (isa != "avx2")
    assert (hw.cpu.isa_capped_by is not None) == (isa != "avx512_bf16")  # BF16 has no AMX to take away
    assert "avx512_bf16" in bench.uncapped_flags(_cpuinfo(tmp_path, BF16))  # the RESULT line's isa_capped_from


def test_quick_bench_on_a_simulated_avx2_cpu_ends_with_the_result_line(tmp_path):
    env = dict(os.environ, LOWRES_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rounds", "1", "--steps", "2", "--warmup", "0",
                          "--seq-len", "32", "--cpuinfo", _cpuinfo(tmp_path, AVX2), "--isa", "avx2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the same tokens" in out.stdout  # HF's first forward hashed equal to lowres' first forward
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"RESULT ratio_equal_settings=(\S+) ratio_best_vs_hf_default=(\S+) mfu_tiny=(\S+) "
                     r"mem_ratio=(\S+) isa=avx2 dtype=fp32", last)
    assert m, last
    equal, best, mfu, mem = map(float, m.groups())
    assert equal == best  # on AVX2 the best lowres contender is the fp32 one
    assert 0 < mfu <= 1.0 and mem > 0


def test_quick_bench_on_this_cpu_gives_the_fp32_contenders_mfu_where_auto_picks_another_dtype(tmp_path):
    env = dict(os.environ, LOWRES_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rounds", "1", "--steps", "2", "--warmup", "0",
                          "--seq-len", "32"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"RESULT ratio_equal_settings=\S+ ratio_best_vs_hf_default=\S+ mfu_tiny=(\S+) mem_ratio=\S+ "
                     r"isa=\S+ dtype=(\S+)( mfu_fp32=(\S+))?( isa_capped_from=\S+)?", last)
    assert m, last
    if m.group(2) == "fp32":  # auto's pick is the equal-settings contender: its MFU is mfu_tiny
        assert m.group(3) is None
    else:  # bf16 (a CPU with fast native bf16): the fp32 contender's MFU over its own fp32 peak, too
        assert 0 < float(m.group(4)) <= 1.0 and 0 < float(m.group(1)) <= 1.0
        assert "MFU (lowres fp32, the equal-settings contender)" in out.stdout
