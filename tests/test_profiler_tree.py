"""The process-tree figures against processes whose cost is known: a tree of 3 children, an orphan that
exits after its parent, and the sampler process leaving when the program it watches dies."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from profiler import Profiler

MiB = 2**20

# Each child: allocate and touch 100 MiB, burn until its own CPU time reaches 1.0 s, hold the memory 1 s.
CHILD = textwrap.dedent("""
    import time
    block = b"x" * (100 * 2**20)
    while time.process_time() < 1.0:
        pass
    time.sleep(1.0)
""")
# The root waits for "go", starts 3 children, reaps them, stays alive a little (so their CPU is seen in its
# cutime), and exits.
ROOT = textwrap.dedent(f"""
    import subprocess, sys, time
    sys.stdin.readline()
    kids = [subprocess.Popen([sys.executable, "-c", {CHILD!r}]) for _ in range(3)]
    for k in kids:
        k.wait()
    time.sleep(0.5)
""")


def _finish(root: subprocess.Popen) -> None:
    root.stdin.write(b"go\n")
    root.stdin.flush()
    root.stdin.close()
    root.wait(timeout=60)


def test_three_children_are_summed_and_their_cpu_kept_after_exit():
    root = subprocess.Popen([sys.executable, "-c", ROOT], stdin=subprocess.PIPE)
    prof = Profiler(interval=0.05, mode="process", pid=root.pid)
    with prof:
        _finish(root)
    s = prof.summary
    assert s.value("lowres_process_count") == 4
    cpu = s.value("lowres_process_cpu_seconds_total")
    assert cpu == pytest.approx(3.0, rel=0.15), s.metrics
    peak = s.value("lowres_process_resident_memory_peak_bytes")
    # 3 x 100 MiB plus four interpreters (about 10 MB each)
    assert 300 * MiB <= peak <= 300 * MiB + 4 * 25e6, peak
    assert s.self_cost["ticks"] >= 2 and s.self_cost["sampler_cpu_s"] > 0


GRANDCHILD = "import time\ntime.sleep(0.3)\nwhile time.process_time() < 1.0: pass"
MIDDLE = f"import subprocess, sys, time\ng = subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}])\n" \
         "print(g.pid, flush=True)\ntime.sleep(0.2)"
# root -> middle -> grandchild. The middle exits first; the orphaned grandchild is re-parented to this test
# process (made a child subreaper, so it does not depend on what this machine's init does) and reaped here,
# outside the watched tree, so no cutime in the tree ever holds its CPU. The root then burns 0.5 s more, so
# a profiler that forgot the orphan's CPU could not hide that behind its last-seen maximum.
ORPHAN_ROOT = textwrap.dedent(f"""
    import os, subprocess, sys, time
    sys.stdin.readline()
    middle = subprocess.Popen([sys.executable, "-c", {MIDDLE!r}], stdout=subprocess.PIPE)
    orphan = int(middle.stdout.readline())
    print(orphan, flush=True)
    middle.wait()
    while os.path.exists(f"/proc/{{orphan}}"):
        time.sleep(0.05)
    time.sleep(0.3)
    t = time.process_time()
    while time.process_time() - t < 0.5:
        pass
""")
PR_SET_CHILD_SUBREAPER = 36


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def test_orphan_cpu_is_kept_after_its_parent_and_itself_exit():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        root = subprocess.Popen([sys.executable, "-c", ORPHAN_ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        prof = Profiler(interval=0.05, mode="thread", pid=root.pid)
        with prof:
            root.stdin.write(b"go\n")
            root.stdin.close()
            orphan = int(root.stdout.readline())
            deadline = time.monotonic() + 30
            while _ppid(orphan) != os.getpid() and time.monotonic() < deadline:
                time.sleep(0.02)
            os.waitpid(orphan, 0)
            root.wait(timeout=60)
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    cpu = prof.summary.value("lowres_process_cpu_seconds_total")
    # orphan 1.0 s + root 0.5 s (+ three interpreter start-ups of a few tens of ms)
    assert cpu == pytest.approx(1.6, rel=0.15), prof.summary.metrics


def test_sampler_process_exits_when_its_parent_dies():
    code = textwrap.dedent("""
        import os, sys
        from profiler import Profiler
        prof = Profiler(interval=0.05).start()
        print(prof._child.pid, flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid), f"sampler process {pid} outlived its parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie has exited
    except OSError:
        return False
