"""The sampler process: ``python -m profiler``, started by ``Profiler(mode="process")``.

Protocol. Configuration arrives in the environment variable ``LOWRES_PROFILER_CONFIG`` (JSON: pid, interval,
sinks, labels, ppid). Control messages arrive as JSON lines on stdin (begin/end of a phase, record, exit,
stop); end of file also means stop. Replies are JSON lines on the original stdout: ``{"op": "ready", "sinks":
[...], "unavailable": {...}}`` once sinks are built (or ``{"op": "error", ...}``), then ``{"op": "summary",
"summary": {...}}`` at the end. Anything else that writes to stdout (a sink's library) is sent to stderr.
The process also stops when its parent dies (re-parenting), so it never outlives the run it watches.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from profiler.sampler import SamplerLoop, build_samplers, build_sinks, describe, parent_alive, stdin_messages


def _reply(fd: int, msg: dict) -> None:
    data = (json.dumps(msg) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def main() -> int:
    """Run one profiling window; the exit status is 0 unless the configuration or a sink could not be built."""
    # Ctrl-C reaches the whole process group; the parent decides when we stop, so the summary is not lost.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    cfg = json.loads(os.environ["LOWRES_PROFILER_CONFIG"])
    samplers, unavailable = build_samplers(int(cfg["pid"]), exclude=frozenset({os.getpid()}))
    try:
        sinks = build_sinks(cfg.get("sinks") or [])
    except Exception as exc:
        _reply(out, {"op": "error", "type": type(exc).__name__, "message": str(exc)})
        return 1
    _reply(out, {"op": "ready", "sinks": [describe(s) for s in sinks], "unavailable": unavailable,
                 "pid": os.getpid()})
    loop = SamplerLoop(samplers, sinks, float(cfg["interval"]), cfg.get("labels"), unavailable,
                       cpu_clock=time.process_time)
    summary = loop.run(stdin_messages(0), parent_alive(int(cfg["ppid"])))
    try:
        _reply(out, {"op": "summary", "summary": summary.to_dict()})
    except OSError:  # the parent is gone; nobody to tell
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
