"""Probes: a few real steps of the train recipe, in a child process under a hard memory cap and a time limit.

    result = probe(cfg, cap_bytes=4 * GIB, steps=4, timeout_s=120)
    result.fits, result.peak_rss_bytes, result.step_s, result.reason

Why a child process: on a CPU, "too much memory" is not an exception but swapping or the kernel's OOM killer.
The child sets ``RLIMIT_DATA`` on itself *before importing torch*, so an allocation past the cap fails inside
malloc/mmap and surfaces as a catchable ``MemoryError`` / ``RuntimeError: ... can't allocate memory``; the
parent only reads a JSON line, and survives whatever the child does. ``RLIMIT_DATA`` (Linux ≥ 4.7: private
writable mappings, i.e. the heap and anonymous mmaps that hold tensors) is used rather than ``RLIMIT_AS``:
the address space also counts the shared libraries torch maps and glibc's per-thread arena reservations,
so it sits far above RSS. Measured here (tiny preset, 4 × 64 tokens): with RLIMIT_AS the run needed ≥ 1.3 GiB
of address space for a 529 MiB RSS peak (1 GiB failed inside the torch import), while an 819 MiB
RLIMIT_DATA stopped a too-large batch with "DefaultCPUAllocator: can't allocate memory" at an RSS of
808 MiB — the data limit tracks what the OS sees. ``RLIMIT_RSS`` is ignored by Linux.

Measured in the child: peak RSS = the kernel's high-water mark ``VmHWM`` (/proc/self/status), what the OS
saw; step time = median of the steps after the first ``warmup`` ones (allocator growth, thread-pool start
and oneDNN kernel selection make the first steps slow). ``python -m lowres.advisor.probe`` reads the request
as JSON on stdin and writes one ``LOWRES_PROBE {json}`` line on stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

MARK = "LOWRES_PROBE "
# The kernel and the parent need room too: the cap never takes more than this share of available memory.
MAX_CAP_SHARE = 0.90


@dataclass
class ProbeResult:
    """One trial. ``fits`` False means it ran out of memory under the cap (or was killed); ``None`` means it
    failed for another reason (``reason`` says which), so nothing can be concluded about memory."""

    fits: bool | None
    peak_rss_bytes: int | None = None
    step_s: float | None = None
    tokens_per_s: float | None = None
    step_times: list[float] = field(default_factory=list)
    cap_bytes: int | None = None
    wall_s: float = 0.0
    reason: str = ""
    # CPU time the training steps got over wall time × threads: ~1 when the probe had its cores, far less
    # when others took them (or the steps waited on something): such a probe's times describe a busy machine
    cpu_share: float | None = None
    load: dict = field(default_factory=dict)  # lowres.advisor.calibrate.machine_load() after the steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _is_oom(exc: BaseException) -> bool:
    """Allocation failures as torch, numpy and CPython raise them under RLIMIT_DATA."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("can't allocate", "cannot allocate", "out of memory",
                                   "defaultcpuallocator", "std::bad_alloc", "not enough memory"))


def run_child(request: dict[str, Any]) -> dict[str, Any]:
    """The child's work (also callable in-process for debugging): set the cap, run the recipe, measure."""
    import resource

    cap = request.get("cap_bytes")
    if cap:
        resource.setrlimit(resource.RLIMIT_DATA, (int(cap), int(cap)))
    t0 = time.perf_counter()
    try:
        from lowres.config import RunConfig
        from lowres.train import Recipe

        cfg = RunConfig.model_validate(request["config"])
        recipe = Recipe(cfg, progress=False)
        try:
            recipe.setup()
            import torch

            cpu0, wall0 = time.process_time(), time.perf_counter()
            res = recipe.train(steps=int(request.get("steps", 4)))
            cpu_share = (time.process_time() - cpu0) / max(1e-9, (time.perf_counter() - wall0)
                                                           * torch.get_num_threads())
        finally:
            recipe.cleanup()
    except BaseException as exc:  # noqa: BLE001 — every failure must come back as a result, not a traceback
        oom = _is_oom(exc)
        first = (str(exc).splitlines() or [""])[0][:300]
        why = ("out of memory under the cap: " if oom else "failed: ") + f"{type(exc).__name__}: {first}"
        return {"fits": False if oom else None, "peak_rss_bytes": _vm_hwm_bytes(), "cap_bytes": cap,
                "wall_s": time.perf_counter() - t0, "reason": why}
    warmup = int(request.get("warmup", 1))
    times = [r["step_seconds"] for r in res.history]
    timed = times[warmup:] or times
    tokens = [r["tokens"] for r in res.history][warmup:] or [r["tokens"] for r in res.history]
    step = statistics.median(timed)
    from lowres.advisor.calibrate import machine_load

    return {"fits": True, "peak_rss_bytes": _vm_hwm_bytes(), "step_s": step,
            "tokens_per_s": statistics.median(tokens) / step, "step_times": times, "cap_bytes": cap,
            "wall_s": time.perf_counter() - t0, "reason": "ran", "cpu_share": round(min(1.5, cpu_share), 3),
            "load": machine_load()}


def default_cap_bytes(budget_bytes: float | None = None) -> int:
    """The cap for a probe: the budget asked for, never above 90 % of the memory available right now."""
    import psutil

    available = psutil.virtual_memory().available * MAX_CAP_SHARE
    return int(min(available, budget_bytes) if budget_bytes else available)


def probe(cfg: Any, *, cap_bytes: int | None = None, steps: int = 4, warmup: int = 1,
          timeout_s: float = 300.0, env: dict[str, str] | None = None) -> ProbeResult:
    """Run ``steps`` optimizer steps of RunConfig ``cfg`` in a capped child; never raises for the child's sake.

    The config is run as given except that tracking, the profiler, checkpoints and evaluation are switched
    off and ``max_steps`` is set just above ``steps`` (so no final save or evaluation happens).
    A child that exceeds ``timeout_s`` is killed and reported with ``fits=None`` (unknown).
    """
    cap = int(cap_bytes) if cap_bytes else default_cap_bytes()
    cfg = probe_config(cfg, steps)
    request = {"config": cfg.model_dump(mode="json"), "steps": steps, "warmup": warmup, "cap_bytes": cap}
    child_env = dict(os.environ, **(env or {}))
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lowres.advisor.probe"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env)
    try:
        out, err = proc.communicate(json.dumps(request), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return ProbeResult(fits=None, cap_bytes=cap, wall_s=time.perf_counter() - t0,
                           reason=f"timed out after {timeout_s:.0f} s")
    finally:
        shutil.rmtree(cfg.output_dir, ignore_errors=True)  # the probe's config.yaml and tokenizer
    wall = time.perf_counter() - t0
    for line in reversed(out.splitlines()):
        if line.startswith(MARK):
            data = json.loads(line[len(MARK):])
            data["wall_s"] = wall
            return ProbeResult(**data)
    # No result line: the child died (a signal, e.g. SIGKILL from the OOM killer, or an abort inside a
    # native allocator that could not raise). Dying under a memory cap is read as "does not fit".
    tail = err.strip().splitlines()[-1:] or [""]
    killed = proc.returncode < 0 or "alloc" in tail[0].lower() or "memory" in tail[0].lower()
    return ProbeResult(fits=False if killed else None, cap_bytes=cap, wall_s=wall,
                       reason=f"child exited with {proc.returncode}: {tail[0][:300]}")


def probe_config(cfg: Any, steps: int) -> Any:
    """``cfg`` made into a probe: no tracking, profiler, checkpoints or evaluation, a throwaway output dir."""
    import tempfile

    data = cfg.model_dump()
    data["output_dir"] = os.path.join(tempfile.gettempdir(), f"lowres-probe-{os.getpid()}")
    data["tracking"].update(mlflow=False, profiler_mode="off", jsonl=False, prometheus_port=None, pushgateway=None)
    data["checkpoint"]["every"] = 0
    data["train"].update(max_steps=steps + 1, eval_every=0, warmup_ignore_steps=0)
    return type(cfg).model_validate(data)


def main() -> None:
    request = json.loads(sys.stdin.read())
    result = run_child(request)
    sys.stdout.write(MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    # Skip interpreter teardown: freeing a large heap and joining torch's pools takes seconds and proves nothing.
    os._exit(0)


if __name__ == "__main__":
    main()
