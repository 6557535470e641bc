"""detect(): this machine's HardwareProfile, in well under a second.

Nothing heavy is imported: package versions come from installed metadata, not from importing the packages
(importing torch alone takes seconds). Only ``probe_bnb=True`` imports torch and bitsandbytes.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import os
import platform
import shutil
from pathlib import Path

import psutil

from lowres.hardware.bnb import probe_bnb_backends
from lowres.hardware.cgroup import read_cgroup
from lowres.hardware.cpu import affinity_cpus, read_cpu
from lowres.hardware.gpu import read_gpus
from lowres.hardware.profile import HardwareProfile, MemoryInfo

# The packages whose versions change what a run can do or how fast it is; every run is tagged with them.
TRACKED_PACKAGES = (
    "torch", "transformers", "peft", "accelerate", "bitsandbytes", "tokenizers", "safetensors", "flwr",
    "mlflow", "lowres",
)

# SMBIOS chassis type codes (DMTF DSP0134, table "System Enclosure or Chassis Types").
_CHASSIS = {
    **dict.fromkeys((8, 9, 10, 14, 30, 31, 32), "laptop"),
    **dict.fromkeys((3, 4, 5, 6, 7, 13, 15, 16, 35, 36), "desktop"),
    **dict.fromkeys((17, 23, 25, 28, 29), "server"),
}


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package, None where it is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_chassis(path: str | Path = "/sys/class/dmi/id/chassis_type") -> str | None:
    """laptop, desktop or server from the firmware's chassis type; None in VMs and where unreadable."""
    try:
        return _CHASSIS.get(int(Path(path).read_text().strip()))
    except (OSError, ValueError):
        return None


def detect(probe_bnb: bool = False) -> HardwareProfile:
    """Profile this machine. ``probe_bnb`` also finds which bitsandbytes backends work (slow: imports torch;
    cached per process)."""
    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    gpus, gpu_note = read_gpus()
    try:
        disk_free = shutil.disk_usage(Path.cwd()).free
    except OSError:
        disk_free = None
    return HardwareProfile(
        cpu=read_cpu(),
        memory=MemoryInfo(
            total_bytes=vm.total,
            available_bytes=vm.available,
            swap_total_bytes=swap.total,
            swap_free_bytes=swap.free,
        ),
        cgroup=read_cgroup(),
        gpus=gpus,
        gpu_note=gpu_note,
        chassis=read_chassis(),
        disk_free_bytes=disk_free,
        os=platform.platform(),
        python=platform.python_version(),
        versions=package_versions(),
        bnb_backends=probe_bnb_backends() if probe_bnb else None,
    )


@functools.cache
def this_machine_fingerprint() -> str:
    """This machine's fingerprint, computed once per process (the traits it hashes do not change)."""
    return detect().fingerprint


def usable_cpus() -> int:
    """CPUs this process may use: the smallest of its affinity mask, its cgroup CPU quota (rounded up) and the
    logical core count. Thread pools sized from os.cpu_count() oversubscribe containers and Slurm jobs."""
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    limits = [logical]
    affinity = affinity_cpus()
    if affinity:
        limits.append(affinity)
    quota = read_cgroup().cpu_quota_cores
    if quota is not None:
        limits.append(max(1, math.ceil(quota - 1e-9)))
    return min(limits)
