"""The HardwareProfile type: what `lowres hw --json` prints and what configs/hardware/*.yaml hold.

Two figures are derived, never stored on their own: the ``fingerprint`` (an id of the machine, from its
stable traits only) and the ``tier`` (a human name). Deriving them means a hand-edited profile cannot carry
a stale id, and a saved profile loads back to exactly the same object.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

GIB = 1024**3

# ISA features that change what is fast for training; everything else in /proc/cpuinfo is left out so the
# fingerprint does not move when a kernel update starts listing a new, irrelevant flag.
RELEVANT_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "avx_vnni",
    "neon", "sve", "sve2", "bf16", "i8mm",
)

# Marketed sizes of RAM and GPU memory, in GiB. The OS reports less than is installed (firmware, kernel,
# integrated graphics), and NVML reports a T4 as 15 GiB: naming the size people know keeps tiers readable
# and keeps the fingerprint still when a kernel update moves MemTotal by a few MiB.
_MARKETED_GIB = (
    1, 2, 3, 4, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 141, 160, 192, 256, 384, 512,
    768, 1024, 1536, 2048,
)


def marketed_gib(n_bytes: int) -> int:
    """The marketed size (GiB) a reported memory total most likely stands for: the smallest listed size at
    least as large, allowing 0.25 GiB of overshoot; beyond the list, the nearest whole GiB."""
    gib = n_bytes / GIB
    for size in _MARKETED_GIB:
        if size >= gib - 0.25:
            return size
    return round(gib)


class _Part(BaseModel):
    # Hand-written YAML is checked strictly: a misspelt key is an error, not a silently ignored line.
    model_config = ConfigDict(extra="forbid")


class CpuInfo(_Part):
    """The processor: model, cores and the ISA features that matter for training speed."""

    model: str
    arch: str = Field(description="machine architecture, e.g. x86_64, aarch64")
    physical_cores: int
    logical_cores: int
    flags: list[str] = Field(default_factory=list, description="relevant ISA features, sorted")
    bf16_fast: bool = Field(description="hardware bf16 dot products: AVX512_BF16 or AMX on x86, BF16 on ARM")
    isa_capped_by: str | None = Field(None, description="the environment settings (e.g. ONEDNN_MAX_CPU_ISA=AVX2) "
                                      "that took flags the CPU has away from ``flags``: torch may not use them")

    @field_validator("flags")
    @classmethod
    def _sorted_unique(cls, flags: list[str]) -> list[str]:
        return sorted(set(flags))


class MemoryInfo(_Part):
    """System RAM and swap in bytes; ``available_bytes`` and ``swap_free_bytes`` are as of detection."""

    total_bytes: int
    available_bytes: int
    swap_total_bytes: int = 0
    swap_free_bytes: int = 0


class CgroupInfo(_Part):
    """Limits of the control group this process runs in (containers, Slurm jobs); None means no limit."""

    version: Literal[1, 2] | None = None
    memory_limit_bytes: int | None = None
    memory_usage_bytes: int | None = Field(None, description="the group's charged memory at detection")
    cpu_quota_cores: float | None = None


class GpuInfo(_Part):
    """One GPU as NVML reports it."""

    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int | None = None
    compute_capability: str | None = Field(None, description='e.g. "8.6"')
    driver_version: str | None = None
    cuda_version: str | None = Field(None, description="highest CUDA version the driver supports")


class Roofline(_Part):
    """Peak compute and memory bandwidth; an unknown figure is None, never a plausible guess."""

    fp32_flops: float | None = None
    bf16_flops: float | None = None
    fp16_flops: float | None = None
    mem_bandwidth_bytes_s: float | None = None
    source: Literal["datasheet", "measured"]
    note: str | None = Field(None, description="which datasheet or measurement, and its conditions")


class HardwareProfile(_Part):
    """A machine: detected here (``source == "detected"``) or loaded from a saved YAML profile."""

    cpu: CpuInfo
    memory: MemoryInfo
    cgroup: CgroupInfo = Field(default_factory=CgroupInfo)
    gpus: list[GpuInfo] = Field(default_factory=list)
    gpu_note: str | None = Field(None, description="why no GPU was listed, when NVML could not answer")
    chassis: Literal["laptop", "desktop", "server"] | None = None
    disk_free_bytes: int | None = None
    os: str
    python: str
    versions: dict[str, str | None] = Field(default_factory=dict)
    bnb_backends: dict[str, bool] | None = Field(None, description="None until probed")
    roofline: Roofline | None = None
    source: str = "detected"
    is_estimate_only: bool = False

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        # model_dump() includes the derived figures; they are recomputed, so accept and drop them.
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in ("fingerprint", "tier")}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fingerprint(self) -> str:
        """12 hex digits: the same machine gives the same id. Hashes only stable traits: CPU model, arch,
        relevant ISA flags, core counts, marketed RAM size, GPU names and memory totals."""
        ident = {
            "cpu": [self.cpu.model, self.cpu.arch, self.cpu.flags, self.cpu.physical_cores,
                    self.cpu.logical_cores],
            "ram_gib": marketed_gib(self.memory.total_bytes),
            "gpus": [[g.name, g.memory_total_bytes] for g in self.gpus],
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tier(self) -> str:
        """A human name: ``gpu-<name>-<mem>g`` with a GPU, else ``<cpu|laptop>-<best isa>-<ram>g``."""
        if self.gpus:
            first = self.gpus[0]
            count = f"{len(self.gpus)}x" if len(self.gpus) > 1 else ""
            return f"gpu-{count}{gpu_short_name(first.name)}-{marketed_gib(first.memory_total_bytes)}g"
        kind = "laptop" if self.chassis == "laptop" else "cpu"
        return f"{kind}-{isa_label(self.cpu.flags)}-{marketed_gib(self.memory.total_bytes)}g"

    def usable_memory_bytes(self) -> int:
        """Memory a new process could take at detection time: system available, capped by what the cgroup
        limit leaves (a container sees the host's free RAM but is killed at its own limit)."""
        usable = self.memory.available_bytes
        if self.cgroup.memory_limit_bytes is not None:
            left = self.cgroup.memory_limit_bytes - (self.cgroup.memory_usage_bytes or 0)
            usable = min(usable, max(left, 0))
        return usable

    def cpu_cores_usable(self) -> float:
        """Cores this machine's runs may use: logical cores, capped by the cgroup CPU quota."""
        cores = float(self.cpu.logical_cores)
        if self.cgroup.cpu_quota_cores is not None:
            cores = min(cores, self.cgroup.cpu_quota_cores)
        return cores


def isa_label(flags: list[str]) -> str:
    """The fastest ISA tier among ``flags``, as one short word for tier names."""
    have = set(flags)
    for label, needed in (
        ("amx", "amx_bf16"), ("avx512bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2"),
        ("sve", "sve"), ("neon", "neon"),
    ):
        if needed in have:
            return label
    return "basic"


_GPU_NOISE = re.compile(r"^(nvidia|geforce|tesla|quadro|gpu|\d+gb|sxm\d*|pcie|hbm\d*e?|nvl)$")


def gpu_short_name(name: str) -> str:
    """``NVIDIA GeForce RTX 3060`` → ``rtx3060``, ``NVIDIA A100-SXM4-80GB`` → ``a100``, ``Tesla T4`` → ``t4``:
    the model, without vendor, brand, memory size or form factor."""
    tokens = [t for t in re.split(r"[\s\-_/]+", name.lower()) if t and not _GPU_NOISE.match(t)]
    short = re.sub(r"[^a-z0-9]", "", "".join(tokens))
    return short or "unknown"

