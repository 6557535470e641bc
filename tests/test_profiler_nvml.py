"""The NVML sampler against a fake pynvml (no GPU here): figures, units, "unavailable is not zero", errors."""

import os
from types import SimpleNamespace as NS

import pynvml
import pytest

from profiler.nvml import NvmlGpuLost, NvmlSampler
from profiler.process_tree import SamplerUnavailable


def _error(code):
    err = pynvml.NVMLError.__new__(pynvml.NVMLError, code)
    err.value = code
    return err


@pytest.fixture
def fake(monkeypatch):
    state = {"procs": [NS(pid=os.getpid(), usedGpuMemory=1_000_000_000)], "power_calls": 0, "lost": False}

    def power(h):
        state["power_calls"] += 1
        raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def util(h):
        if state["lost"]:
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return NS(gpu=50, memory=20)

    for name, fn in {
        "nvmlInit": lambda: None, "nvmlShutdown": lambda: None, "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: f"h{i}", "nvmlDeviceGetUtilizationRates": util,
        "nvmlDeviceGetMemoryInfo": lambda h: NS(used=2_000_000_000, total=8_000_000_000, free=6_000_000_000),
        "nvmlDeviceGetPowerUsage": power, "nvmlDeviceGetTemperature": lambda h, s: 61,
        "nvmlDeviceGetClockInfo": lambda h, c: 1500,
        "nvmlDeviceGetComputeRunningProcesses": lambda h: state["procs"],
        "nvmlDeviceGetGraphicsRunningProcesses": lambda h: [],
    }.items():
        monkeypatch.setattr(pynvml, name, fn)
    return state


def _by_name(samples):
    return {s.name: s for s in samples}


def test_figures_in_base_units_and_unsupported_asked_once(fake):
    nv = NvmlSampler(pids=lambda: {os.getpid()})
    got = _by_name(nv.read(1.0))
    assert got["lowres_gpu_utilization_ratio"].value == 0.5
    assert got["lowres_gpu_memory_used_bytes"].value == 2e9
    assert got["lowres_gpu_sm_clock_hertz"].value == 1.5e9
    assert got["lowres_gpu_temperature_celsius"].value == 61
    assert got["lowres_gpu_process_memory_bytes"].value == 1e9
    assert got["lowres_gpu_utilization_ratio"].label("gpu") == "0"
    assert "lowres_gpu_power_watts" not in got
    nv.read(2.0)
    assert fake["power_calls"] == 1


def test_process_memory_unavailable_is_absent_not_zero(fake):
    fake["procs"] = [NS(pid=os.getpid(), usedGpuMemory=None)]
    assert "lowres_gpu_process_memory_bytes" not in _by_name(NvmlSampler().read(1.0))
    # a pid from another pid namespace (container): which entries are ours is unknown
    fake["procs"] = [NS(pid=4_000_000, usedGpuMemory=5)]
    assert "lowres_gpu_process_memory_bytes" not in _by_name(NvmlSampler().read(1.0))
    # nothing of ours on the GPU, and everything listed is visible: a true zero
    fake["procs"] = []
    assert _by_name(NvmlSampler().read(1.0))["lowres_gpu_process_memory_bytes"].value == 0


def test_no_driver_or_no_gpu_means_no_sampler(fake, monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 0)
    with pytest.raises(SamplerUnavailable, match="no GPU"):
        NvmlSampler()

    def no_lib():
        raise _error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_lib)
    with pytest.raises(SamplerUnavailable, match="NVML"):
        NvmlSampler()


def test_lost_gpu_raises_a_named_error(fake):
    nv = NvmlSampler()
    fake["lost"] = True
    with pytest.raises(NvmlGpuLost):
        nv.read(1.0)
