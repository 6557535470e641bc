"""The CPU: model, core counts and ISA features, read from /proc/cpuinfo (sysctl on macOS).

The flags decide ``bf16_fast``, not torch: torch's capability level says AVX512 on CPUs whose bf16 is
emulated, and bf16 there is tens of times slower than fp32.

The flags are what torch's kernels may *use*, not only what the CPU has: the environment variables that cap
the ISA of torch's CPU libraries (``ONEDNN_MAX_CPU_ISA``/``DNNL_MAX_CPU_ISA`` for oneDNN — bf16 GEMMs and
lowres' fp32 ones —, ``MKL_ENABLE_INSTRUCTIONS`` for MKL, ``ATEN_CPU_CAPABILITY`` for ATen's element-wise
kernels and inductor's generated code) take away the flags above their level. With ``ONEDNN_MAX_CPU_ISA=AVX2``
on an AMX CPU a bf16 GEMM runs ~50× slower than with AMX (measured: 26 against 1,420 GFLOP/s), so
``precision: auto`` must see AVX2 there. The capped profile has its own fingerprint (its own rooflines).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import psutil

from lowres.hardware.profile import RELEVANT_FLAGS, CpuInfo

# ARM kernels name NEON "asimd"; one name for one feature keeps tiers and tests simple.
_FLAG_ALIASES = {"asimd": "neon"}
_BF16_FAST_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}

# x86 ISA levels, lowest first, and the flags each adds over the one below it.
_X86_LEVELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("basic", frozenset()),
    ("avx", frozenset({"avx", "f16c"})),
    ("avx2", frozenset({"avx2", "fma", "avx_vnni"})),
    ("avx512", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})),
    ("avx512_bf16", frozenset({"avx512_bf16", "avx512_fp16"})),
    ("amx", frozenset({"amx_tile", "amx_bf16", "amx_int8", "amx_fp16"})),
)
# The cap each library's setting puts on the level (None: no cap). Values are matched case-insensitively;
# one the table does not know caps nothing (the library reads it, not lowres). MKL is torch's fp32 GEMM
# outside lowres' oneDNN path and never runs bf16 or AMX kernels for torch, so its AVX-512 settings cap nothing.
_ISA_CAPS: dict[str, dict[str, str]] = {
    "ONEDNN_MAX_CPU_ISA": {
        "sse41": "basic", "avx": "avx", "avx2": "avx2", "avx2_vnni": "avx2", "avx2_vnni_2": "avx2",
        "avx512_core": "avx512", "avx512_core_vnni": "avx512", "avx512_core_bf16": "avx512_bf16",
        "avx512_core_fp16": "avx512_bf16",
    },
    "MKL_ENABLE_INSTRUCTIONS": {"sse4_2": "basic", "avx": "avx", "avx2": "avx2", "avx2_e1": "avx2"},
    "ATEN_CPU_CAPABILITY": {"default": "basic", "avx2": "avx2"},
}
_ISA_CAPS["DNNL_MAX_CPU_ISA"] = _ISA_CAPS["ONEDNN_MAX_CPU_ISA"]  # oneDNN's older name for the same setting


def isa_cap(env: dict[str, str] | None = None) -> tuple[str | None, list[str]]:
    """(the lowest x86 ISA level the environment lets torch's CPU kernels use, the settings that say so);
    (None, []) when nothing is capped."""
    env = os.environ if env is None else env
    order = [name for name, _ in _X86_LEVELS]
    level: str | None = None
    said: list[str] = []
    for var, table in _ISA_CAPS.items():
        value = env.get(var, "").strip()
        cap = table.get(value.lower())
        if cap is None:
            continue
        said.append(f"{var}={value}")
        if level is None or order.index(cap) < order.index(level):
            level = cap
    return level, said


def cap_flags(flags: set[str], level: str | None) -> set[str]:
    """``flags`` less the x86 ones above ``level`` (ARM flags are never capped)."""
    if level is None:
        return set(flags)
    names = [name for name, _ in _X86_LEVELS]
    above = set().union(*(added for _, added in _X86_LEVELS[names.index(level) + 1:]))
    return set(flags) - above


def parse_cpuinfo(text: str) -> tuple[str | None, set[str], int | None]:
    """Model name, relevant ISA flags and physical core count from /proc/cpuinfo text (x86 or ARM).

    The core count is the number of distinct (physical id, core id) pairs, None when the file omits them
    (ARM, some VMs).
    """
    model: str | None = None
    raw_flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    physical_id = "0"
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "model name" and model is None:
            model = value
        elif key == "hardware" and model is None:
            model = value
        elif key in ("flags", "features") and not raw_flags:
            raw_flags = set(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    flags = {_FLAG_ALIASES.get(f, f) for f in raw_flags} & set(RELEVANT_FLAGS)
    return model, flags, (len(cores) or None)


def _macos_cpu() -> tuple[str | None, set[str]]:
    """Model and relevant features on macOS, where there is no /proc/cpuinfo."""

    def sysctl(name: str) -> str | None:
        try:
            out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    flags: set[str] = set()
    if platform.machine() == "arm64":
        flags.add("neon")  # every Apple Silicon core has it
        if sysctl("hw.optional.arm.FEAT_BF16") == "1":
            flags.add("bf16")
    else:
        features = (sysctl("machdep.cpu.features") or "") + " " + (sysctl("machdep.cpu.leaf7_features") or "")
        names = {f.lower().replace(".", "") for f in features.split()}
        flags = {f for f in RELEVANT_FLAGS if f.replace("_", "") in names}
    return sysctl("machdep.cpu.brand_string"), flags


def read_cpu(cpuinfo_path: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """Detect the CPU. Falls back to platform's answers where /proc/cpuinfo is missing."""
    try:
        model, flags, physical = parse_cpuinfo(Path(cpuinfo_path).read_text(errors="replace"))
    except OSError:
        model, flags, physical = None, set(), None
        if platform.system() == "Darwin":
            model, flags = _macos_cpu()
    level, settings = isa_cap()
    capped = cap_flags(flags, level)
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or physical or logical
    return CpuInfo(
        model=model or platform.processor() or platform.machine() or "unknown",
        arch=platform.machine() or "unknown",
        physical_cores=physical,
        logical_cores=logical,
        flags=sorted(capped),
        bf16_fast=bool(capped & _BF16_FAST_FLAGS),
        isa_capped_by=", ".join(settings) if capped != flags else None,
    )


def affinity_cpus() -> int | None:
    """CPUs this process may be scheduled on (taskset, cpuset, Slurm), None where the OS cannot say."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
