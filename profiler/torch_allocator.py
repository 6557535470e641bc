"""torch's CUDA caching-allocator figures, read in the process that runs torch (thread mode, and the parent's
phase edges in process mode); only when that program has already imported torch — never imported here."""

from __future__ import annotations

import sys

from profiler.process_tree import SamplerUnavailable
from profiler.reading import Sample


def cuda_torch():
    """The already-imported torch module when it has an initialised CUDA context, else None (cheap)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    except Exception:
        return None


def reset_peaks(torch) -> None:
    """Reset every device's peak statistics (a phase begins)."""
    for d in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(d)


def peak_allocated(torch) -> int:
    """The largest peak of allocated bytes over the devices since the last reset."""
    return max((torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())), default=0)


class TorchCudaSampler:
    """Allocated, peak allocated and reserved bytes per CUDA device, labelled ``device=<index>``."""

    name = "torch_cuda"
    period = 0.0

    def __init__(self) -> None:
        torch = sys.modules.get("torch")
        if torch is None:
            raise SamplerUnavailable("torch is not imported by the watched program")
        if not torch.cuda.is_available():
            raise SamplerUnavailable("torch has no CUDA device here")
        self._torch = torch

    def read(self, now: float) -> list[Sample]:
        """One reading per initialised device (none before the program touches CUDA)."""
        cuda = self._torch.cuda
        if not cuda.is_initialized():
            return []
        out = []
        for d in range(cuda.device_count()):
            lab = (("device", str(d)),)
            out.append(Sample(now, "lowres_torch_cuda_allocated_bytes", float(cuda.memory_allocated(d)), lab))
            out.append(Sample(now, "lowres_torch_cuda_allocated_peak_bytes",
                              float(cuda.max_memory_allocated(d)), lab))
            out.append(Sample(now, "lowres_torch_cuda_reserved_bytes", float(cuda.memory_reserved(d)), lab))
        return out
