"""Memory and CPU limits of this process's control group, cgroup v1 or v2.

Containers and Slurm jobs set these; psutil does not see them, and a run that trusts the host's free RAM is
killed at the group's limit without a Python error. The reader takes the cgroup mount point and the text of
/proc/self/cgroup so tests can run it on fake trees.
"""

from __future__ import annotations

from pathlib import Path

from lowres.hardware.profile import CgroupInfo

# cgroup v1 writes "no limit" as the largest page-aligned 64-bit value (9223372036854771712 with 4 KiB pages,
# other values with other page sizes); anything this large is no limit on any real machine.
_UNLIMITED = 2**62


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller name → this process's group path, from /proc/self/cgroup text ("" names the v2 group)."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def _group_chain(mount: Path, group_path: str) -> list[Path]:
    """The group's folder and its ancestors up to the mount point, leaf first.

    A limit set on any ancestor binds too, so the effective limit is the smallest along the chain. Inside a
    container the group path may name a folder the container cannot see; then the mount point is the group.
    """
    leaf = mount / group_path.lstrip("/")
    if not leaf.is_dir():
        return [mount]
    chain = [leaf]
    while chain[-1] != mount and mount in chain[-1].parents:
        chain.append(chain[-1].parent)
    return chain


def _min_or_none(values: list[float | int | None]) -> float | int | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def _bytes_v1(text: str | None) -> int | None:
    if text is None or not text.lstrip("-").isdigit():
        return None
    value = int(text)
    return None if value < 0 or value >= _UNLIMITED else value


def _bytes_v2(text: str | None) -> int | None:
    if text is None or text == "max" or not text.isdigit():
        return None
    return int(text)


def _cores_v2(text: str | None) -> float | None:
    """``cpu.max`` is "<quota> <period>" in microseconds, or "max <period>" for no limit."""
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return round(int(quota) / int(period), 3)


def _cores_v1(quota: str | None, period: str | None) -> float | None:
    """``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; a quota of -1 means no limit."""
    if quota is None or period is None or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return round(int(quota) / int(period), 3)


def read_cgroup(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | None = None) -> CgroupInfo:
    """Limits of this process's group under the cgroup mount ``root``; all None where there are none.

    ``proc_cgroup`` is the text of /proc/self/cgroup (read when not given). v2 is recognised by
    ``cgroup.controllers`` at the root; v1 by per-controller folders (``memory``, ``cpu`` or ``cpu,cpuacct``).
    On hybrid hosts (v1 controllers plus an empty v2 tree under ``unified``) the v1 controllers hold the limits.
    """
    root = Path(root)
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    own = _own_paths(proc_cgroup)

    if (root / "cgroup.controllers").is_file():
        chain = _group_chain(root, own.get("", "/"))
        return CgroupInfo(
            version=2,
            memory_limit_bytes=_min_or_none([_bytes_v2(_read(d / "memory.max")) for d in chain]),
            memory_usage_bytes=_bytes_v2(_read(chain[0] / "memory.current")),
            cpu_quota_cores=_min_or_none([_cores_v2(_read(d / "cpu.max")) for d in chain]),
        )

    memory_mount = root / "memory"
    cpu_mount = next((root / n for n in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / n).is_dir()), None)
    if not memory_mount.is_dir() and cpu_mount is None:
        return CgroupInfo()

    info = CgroupInfo(version=1)
    if memory_mount.is_dir():
        chain = _group_chain(memory_mount, own.get("memory", "/"))
        info.memory_limit_bytes = _min_or_none([_bytes_v1(_read(d / "memory.limit_in_bytes")) for d in chain])
        info.memory_usage_bytes = _bytes_v1(_read(chain[0] / "memory.usage_in_bytes"))
    if cpu_mount is not None:
        chain = _group_chain(cpu_mount, own.get("cpu", "/"))
        info.cpu_quota_cores = _min_or_none(
            [_cores_v1(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")) for d in chain]
        )
    return info
