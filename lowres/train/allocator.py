"""``train.malloc_tuning``: glibc's malloc keeps a training step's big freed blocks for the next step.

A CPU training step allocates and frees the same large buffers every step: activations of a few MB each, the
LM head's logits (SmolLM2-135M at 2 × 256 tokens: 100 MB in fp32). glibc serves a block above its mmap
threshold (128 KiB, raised dynamically to at most 32 MiB) with a fresh ``mmap`` and gives it back with
``munmap`` when freed, and trims the top of its heap back to the kernel as soon as 2 × the threshold lies free
there. So each step can touch the same memory as fresh pages again: every 4 KiB page a page fault, and the
kernel zeroes it. Measured on the 2-core AMD EPYC with AVX512_BF16 (SmolLM2-135M, LoRA r=8, 2 × 256 tokens):
fp32 on the shipped instruction sample, 37,000–40,000 minor faults a step with glibc's defaults and none
tuned; an interleaved A/B in bf16 (``bench/step_options.py``, 6 rounds) ran glibc's defaults at 0.978 of the
tuned step (0.898–1.008), with 42 MiB less peak RSS.

The tuning is two ``mallopt`` calls, the same as running with ``MALLOC_MMAP_THRESHOLD_=268435456
MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment: blocks up to 256 MiB come from the heap, and up to
1 GiB of free memory at its top stays there to be reused. Process-wide and not undone: freed memory stays in
the process (RSS does not fall after a peak) until it exits. glibc only (Linux; not musl, not macOS), where
it is reported as unchanged. The same variables give any other program, Hugging Face's Trainer included, the
same effect; ``bench/harness_vs_hf.py --hf-malloc-tuning`` measures that.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30

_applied: str | None = None


def glibc_version() -> str | None:
    """``"2.36"`` under glibc, else None."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    return name.split()[-1] if name and name.startswith("glibc") else None


def tune_malloc() -> str:
    """Raise glibc's mmap and trim thresholds for this process (once); what was done, for the run's info."""
    global _applied
    if _applied is not None:
        return _applied
    version = glibc_version()
    if version is None:
        _applied = "unchanged (not glibc)"
        return _applied
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
              and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError) as e:
        _applied = f"unchanged (glibc {version}: {e})"
        return _applied
    _applied = (f"glibc {version}: mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
                f"trim threshold {TRIM_THRESHOLD >> 20} MiB" if ok else f"unchanged (glibc {version} refused mallopt)")
    return _applied


def untouched() -> str:
    """What ``train.malloc_tuning=false`` leaves: glibc's defaults, unless an earlier run in this process tuned
    it (mallopt is process-wide and not undone), which is then said."""
    if _applied is not None and _applied.startswith("glibc"):
        return f"{_applied} (tuned earlier in this process: false does not undo it)"
    return "unchanged"


def release_free_memory() -> bool:
    """Give the heap's free pages back to the kernel (glibc's ``malloc_trim(0)``), once setup is done: what
    loading and setup freed (a checkpoint's transients, base weights moved into lowres.train.lora_groups'
    buffers) otherwise stays in the process, often in a loader thread's arena that the training thread never
    allocates from, and counts in the run's peak RSS. True where it ran (glibc)."""
    if glibc_version() is None:
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True
