"""What machine lowres runs on: detect() → HardwareProfile, and saved profiles of other machines.

    from lowres.hardware import detect, load_profile
    here = detect()                      # this machine, < 1 s
    laptop = load_profile("laptop-8g-avx2")  # a saved one, for what-if advice (is_estimate_only)
"""

from lowres.hardware.detection import detect, package_versions, usable_cpus
from lowres.hardware.profile import (
    CgroupInfo,
    CpuInfo,
    GpuInfo,
    HardwareProfile,
    MemoryInfo,
    Roofline,
    gpu_short_name,
    marketed_gib,
)
from lowres.hardware.store import list_profiles, load_profile, profile_to_yaml, profiles_dir, save_profile

__all__ = [
    "CgroupInfo",
    "CpuInfo",
    "GpuInfo",
    "HardwareProfile",
    "MemoryInfo",
    "Roofline",
    "detect",
    "gpu_short_name",
    "list_profiles",
    "load_profile",
    "marketed_gib",
    "package_versions",
    "profile_to_yaml",
    "profiles_dir",
    "save_profile",
    "usable_cpus",
]
