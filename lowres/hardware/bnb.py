"""Which bitsandbytes backends actually work here, found by running one 4-bit round trip on each device.

Importing bitsandbytes imports torch and takes seconds, so this runs only when asked
(``detect(probe_bnb=True)``) and once per process. A package that imports but whose native library does
not load for a device shows up here as False rather than as a crash at training time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging


def _round_trip(device: str) -> bool:
    """Quantize a small tensor to NF4 and back on ``device``; True when the error is that of 4 bits."""
    import torch
    import bitsandbytes.functional as bnb_functional

    x = torch.randn(64, 64, device=device)
    packed, state = bnb_functional.quantize_4bit(x, quant_type="nf4")
    back = bnb_functional.dequantize_4bit(packed, state)
    # NF4 keeps each value within about a quarter of its block's absolute maximum; a broken kernel returns
    # zeros or garbage far outside that.
    return bool(((x - back).abs() <= 0.25 * x.abs().max()).all())


@functools.cache
def probe_bnb_backends() -> dict[str, bool]:
    """``{"cpu": bool, "cuda": bool}``: whether a 4-bit round trip works on each device."""
    if importlib.util.find_spec("bitsandbytes") is None or importlib.util.find_spec("torch") is None:
        return {"cpu": False, "cuda": False}
    # bitsandbytes prints warnings about optional kernels at import; they are not this command's output.
    # Its logger is quietened only for the probe, so warnings at training time still show.
    quiet = io.StringIO()
    bnb_logger = logging.getLogger("bitsandbytes")
    saved_level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            return _probe_devices()
    finally:
        bnb_logger.setLevel(saved_level)


def _probe_devices() -> dict[str, bool]:
    """The round trip on the CPU, and on CUDA where torch sees a GPU."""
    results: dict[str, bool] = {}
    try:
        import torch
    except Exception:  # a broken torch install: no backend can work
        return {"cpu": False, "cuda": False}
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            results[device] = False
            continue
        try:
            results[device] = _round_trip(device)
        except Exception:  # any failure of the library on this device means "does not work"
            results[device] = False
    return results
