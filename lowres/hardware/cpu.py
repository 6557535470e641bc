"""The CPU: model, core counts and ISA features, read from /proc/cpuinfo (sysctl on macOS).

The flags decide ``bf16_fast``, not torch: torch's capability level says AVX512 on CPUs whose bf16 is
emulated, and bf16 there is tens of times slower than fp32.
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
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or physical or logical
    return CpuInfo(
        model=model or platform.processor() or platform.machine() or "unknown",
        arch=platform.machine() or "unknown",
        physical_cores=physical,
        logical_cores=logical,
        flags=sorted(flags),
        bf16_fast=bool(flags & _BF16_FAST_FLAGS),
    )


def affinity_cpus() -> int | None:
    """CPUs this process may be scheduled on (taskset, cpuset, Slurm), None where the OS cannot say."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
