"""GPU figures through NVML (``pynvml`` from nvidia-ml-py): utilisation, memory (device and the watched
tree's), power, temperature, SM clock.

No pynvml, no driver or no GPU means no sampler (:class:`SamplerUnavailable`), not an error. Each NVML error
code becomes a named exception, as Zeus does, so a caller can tell a lost GPU from a missing permission. A
figure the device does not support is found once, at the first read, and never asked for again.
"""

from __future__ import annotations

import os
from typing import Callable

from profiler.process_tree import SamplerUnavailable
from profiler.reading import Sample


class NvmlError(RuntimeError):
    """An NVML call failed; ``code`` is NVML's return code."""

    code = -1


class NvmlUninitialized(NvmlError): code = 1
class NvmlInvalidArgument(NvmlError): code = 2
class NvmlNotSupported(NvmlError): code = 3
class NvmlNoPermission(NvmlError): code = 4
class NvmlNotFound(NvmlError): code = 6
class NvmlInsufficientPower(NvmlError): code = 8
class NvmlDriverNotLoaded(NvmlError): code = 9
class NvmlTimeout(NvmlError): code = 10
class NvmlLibraryNotFound(NvmlError): code = 12
class NvmlFunctionNotFound(NvmlError): code = 13
class NvmlGpuLost(NvmlError): code = 15
class NvmlResetRequired(NvmlError): code = 16
class NvmlNoData(NvmlError): code = 21
class NvmlGpuNotFound(NvmlError): code = 28
class NvmlUnknown(NvmlError): code = 999


_BY_CODE = {c.code: c for c in NvmlError.__subclasses__()}
# Codes that mean "this machine has no usable NVML": no sampler rather than an error.
_ABSENT = (NvmlDriverNotLoaded, NvmlLibraryNotFound, NvmlFunctionNotFound, NvmlGpuNotFound, NvmlNotFound)


def nvml_error(exc: Exception) -> NvmlError:
    """The named exception for a ``pynvml.NVMLError`` (its ``value`` is the return code)."""
    code = getattr(exc, "value", -1)
    cls = _BY_CODE.get(code, NvmlError)
    try:
        text = str(exc)  # pynvml asks the library for the text, which may itself be missing
    except Exception:
        text = cls.__name__
    err = cls(f"NVML error {code}: {text}")
    err.code = code
    return err


class NvmlSampler:
    """One reading per GPU per tick, labelled ``gpu=<index>``.

    ``pids`` returns the watched tree's pids; the per-process memory is their sum, and it is left out (never
    reported as zero) where NVML cannot tell: a process entry without a figure (WDDM, some vGPUs), or pids
    that do not exist in this pid namespace (a container seeing the host's pids).
    """

    name = "nvml"
    period = 0.0

    def __init__(self, pids: Callable[[], set[int]] | None = None):
        try:
            import pynvml
        except ImportError:
            raise SamplerUnavailable("pynvml (nvidia-ml-py) is not installed") from None
        self._nv = pynvml
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except pynvml.NVMLError as exc:
            err = nvml_error(exc)
            if isinstance(err, _ABSENT):
                raise SamplerUnavailable(f"no NVML here: {err}") from None
            raise err from None
        if not self._handles:
            raise SamplerUnavailable("NVML reports no GPU")
        self._pids = pids or (lambda: {os.getpid()})
        self._unsupported: set[tuple[int, str]] = set()

    def _get(self, i: int, what: str, fn, *args):
        """One NVML figure, or None where this device does not support it (then never asked again)."""
        if (i, what) in self._unsupported:
            return None
        try:
            return fn(self._handles[i], *args)
        except self._nv.NVMLError as exc:
            err = nvml_error(exc)
            if isinstance(err, (NvmlNotSupported, NvmlNoPermission, NvmlFunctionNotFound)):
                self._unsupported.add((i, what))
                return None
            raise err from None

    def _tree_memory(self, i: int) -> float | None:
        procs = self._get(i, "procs", self._nv.nvmlDeviceGetComputeRunningProcesses)
        graphics = self._get(i, "gprocs", self._nv.nvmlDeviceGetGraphicsRunningProcesses)
        if procs is None and graphics is None:
            return None
        mine = self._pids()
        total, seen = 0, set()
        for p in list(procs or []) + list(graphics or []):
            if p.pid in seen:  # a process doing compute and graphics is listed twice with the same figure
                continue
            seen.add(p.pid)
            if p.pid in mine:
                if p.usedGpuMemory is None:
                    return None
                total += p.usedGpuMemory
            elif not os.path.exists(f"/proc/{p.pid}"):
                return None  # another pid namespace: which entries are ours is unknown
        return float(total)

    def read(self, now: float) -> list[Sample]:
        """Every figure of every GPU this device supports."""
        nv, out = self._nv, []
        for i in range(len(self._handles)):
            lab = (("gpu", str(i)),)
            util = self._get(i, "util", nv.nvmlDeviceGetUtilizationRates)
            if util is not None:
                out.append(Sample(now, "lowres_gpu_utilization_ratio", util.gpu / 100.0, lab))
            mem = self._get(i, "mem", nv.nvmlDeviceGetMemoryInfo)
            if mem is not None:
                out.append(Sample(now, "lowres_gpu_memory_used_bytes", float(mem.used), lab))
                out.append(Sample(now, "lowres_gpu_memory_total_bytes", float(mem.total), lab))
            power = self._get(i, "power", nv.nvmlDeviceGetPowerUsage)
            if power is not None:
                out.append(Sample(now, "lowres_gpu_power_watts", power / 1000.0, lab))  # NVML gives mW
            temp = self._get(i, "temp", nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU)
            if temp is not None:
                out.append(Sample(now, "lowres_gpu_temperature_celsius", float(temp), lab))
            clock = self._get(i, "clock", nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM)
            if clock is not None:
                out.append(Sample(now, "lowres_gpu_sm_clock_hertz", clock * 1e6, lab))  # NVML gives MHz
            tree = self._tree_memory(i)
            if tree is not None:
                out.append(Sample(now, "lowres_gpu_process_memory_bytes", tree, lab))
        return out

    def close(self) -> None:
        """Shut NVML down (errors at shutdown do not matter)."""
        try:
            self._nv.nvmlShutdown()
        except Exception:
            pass
