"""NVIDIA GPUs through NVML (the nvidia-ml-py package, imported as ``pynvml``).

No NVML library, no driver or no GPU is a normal answer: an empty list and a short note saying why. NVML is
imported here, inside the call, so tests can fake it and machines without it never pay for the import.
"""

from __future__ import annotations

from lowres.hardware.profile import GpuInfo


def _text(value: object) -> str:
    # Older nvidia-ml-py versions return bytes, newer ones str.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _cuda_version(code: int) -> str:
    """NVML encodes CUDA 12.2 as 12020."""
    return f"{code // 1000}.{(code % 1000) // 10}"


def read_gpus() -> tuple[list[GpuInfo], str | None]:
    """GPUs NVML can see, and a note when it could not answer (None when it answered, even with zero GPUs)."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        # LibraryNotFound / DriverNotLoaded: a machine without an NVIDIA driver, the common case here.
        return [], f"NVML unavailable: {_text(exc) or type(exc).__name__}"
    try:
        return _list_devices(pynvml), None
    except pynvml.NVMLError as exc:
        return [], f"NVML error while listing GPUs: {_text(exc) or type(exc).__name__}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _list_devices(pynvml) -> list[GpuInfo]:
    def optional(call, *args):
        # One unsupported query (e.g. compute capability on an old driver) must not hide the GPU.
        try:
            return call(*args)
        except pynvml.NVMLError:
            return None

    driver = optional(pynvml.nvmlSystemGetDriverVersion)
    cuda = optional(pynvml.nvmlSystemGetCudaDriverVersion)
    gpus = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        capability = optional(pynvml.nvmlDeviceGetCudaComputeCapability, handle)
        gpus.append(
            GpuInfo(
                index=index,
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                memory_total_bytes=int(memory.total),
                memory_free_bytes=int(memory.free),
                compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
                driver_version=_text(driver) if driver is not None else None,
                cuda_version=_cuda_version(int(cuda)) if cuda else None,
            )
        )
    return gpus
