"""`lowres bench`: run a suite's workloads, one MLflow run each, with repeated measurements.

Each workload runs in its own child process by default (``python -m lowres.bench.worker``): peak RSS is a
per-process high-water mark, so a workload measured after another would otherwise inherit its peak. Inside
the process the recipe runs ``warmup_steps`` (dropped) and then ``repeats × steps`` timed steps; each repeat
gives one tokens/s figure, and every timed step's seconds and peak memory go to MLflow as series, so
`lowres regress` compares distributions rather than one number.

``inject_sleep_s`` adds a sleep to every forward pass through a torch forward pre-hook on the input
embeddings (inside the timed step, outside the recipe's code): ``bench/regress_noise.py`` uses it to check
that `lowres regress` catches a known slowdown. Runs made that way carry the tag ``lowres.bench.injected_sleep_s``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from lowres.bench import measure
from lowres.bench.workloads import BENCH_EXPERIMENT, Workload, suite_workloads, workload_overrides

TAG_SUITE = "lowres.bench.suite"
TAG_WORKLOAD = "lowres.bench.workload"
TAG_PRESET = "lowres.bench.preset"
TAG_PRECISION = "lowres.bench.precision"
TAG_RANK = "lowres.bench.rank"
TAG_SESSION = "lowres.bench.session"  # one `lowres bench` invocation: `latest` in regress selects by it
TAG_REPEATS = "lowres.bench.repeats"
TAG_INJECTED = "lowres.bench.injected_sleep_s"


@dataclass
class WorkloadResult:
    """What one workload measured, or why it did not run (``status`` skipped: unsupported here)."""

    workload: str
    status: str  # ok, skipped, failed
    run_id: str | None = None
    reason: str | None = None
    summary: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


def new_session() -> str:
    """A fresh id for one `lowres bench` invocation."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_suite(suite: str, *, repeats: int = 3, only: list[str] | None = None, tracking_uri: str | None = None,
              experiment: str = BENCH_EXPERIMENT, isolate: bool = True, inject_sleep_s: float = 0.0,
              session: str | None = None, on_result: Callable[[WorkloadResult], None] | None = None,
              ) -> list[WorkloadResult]:
    """Run every workload of ``suite`` (those matching ``only``) in turn; return their results."""
    if repeats < 1:
        from lowres.errors import UsageError

        raise UsageError(f"--repeats must be at least 1, got {repeats}")
    session = session or new_session()
    results = []
    for w in suite_workloads(suite, only):
        spec = {"workload": w.to_dict(), "suite": suite, "repeats": repeats, "tracking_uri": tracking_uri,
                "experiment": experiment, "session": session, "inject_sleep_s": inject_sleep_s}
        result = _run_child(spec) if isolate else run_workload(**_spec_args(spec))
        results.append(result)
        if on_result:
            on_result(result)
    return results


def run_workload(w: Workload, *, suite: str, repeats: int, tracking_uri: str | None, experiment: str,
                 session: str, inject_sleep_s: float = 0.0, console: Any = None) -> WorkloadResult:
    """Set up the recipe for ``w``, tag its MLflow run, train warm-up + timed steps, log the figures."""
    from lowres.errors import UnsupportedError

    try:
        run = BenchRun(w, suite=suite, repeats=repeats, tracking_uri=tracking_uri, experiment=experiment,
                       session=session, console=console)
    except UnsupportedError as exc:  # e.g. 4-bit without bitsandbytes: this machine cannot run it
        return WorkloadResult(w.name, "skipped", reason=str(exc))
    try:
        if inject_sleep_s > 0:
            run.inject_sleep(inject_sleep_s)
        run.train(w.warmup_steps + repeats * w.steps)
        return run.finish()
    finally:
        run.close()


class BenchRun:
    """One workload's recipe, set up and tagged: ``train(n)`` runs n more steps, ``finish()`` logs the figures,
    ``close()`` ends the MLflow run. Several can be interleaved in one process (bench/regress_noise.py)."""

    def __init__(self, w: Workload, *, suite: str, repeats: int, tracking_uri: str | None, experiment: str,
                 session: str, console: Any = None):
        from rich.console import Console

        from lowres.config import load_config
        from lowres.train import Recipe

        self.w, self.status = w, "FAILED"
        self.out = Path(tempfile.mkdtemp(prefix=f"lowres-bench-{w.name}-"))
        try:
            cfg = load_config(None, workload_overrides(w, out_dir=self.out, experiment=experiment,
                                                       tracking_uri=tracking_uri, run_name=f"{suite}/{w.name}"),
                              use_env=False)  # a benchmark is the same everywhere: no LOWRES_* overrides
            self.recipe = Recipe(cfg, progress=False, console=console or Console(stderr=True, soft_wrap=True))
            self.recipe.setup()
        except BaseException:
            if hasattr(self, "recipe"):
                self.recipe.cleanup("FAILED")  # a run setup had already started must not stay RUNNING
            shutil.rmtree(self.out, ignore_errors=True)
            raise
        _tag(self.recipe, w, suite, repeats, session)

    def inject_sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` in every forward pass from now on (a torch hook; the run is tagged with it)."""
        self.recipe.model.get_input_embeddings().register_forward_pre_hook(lambda module, args: time.sleep(seconds))
        if self.recipe.tracker is not None:
            self.recipe.tracker.set_tags({TAG_INJECTED: f"{seconds:.6f}"})

    def train(self, steps: int) -> None:
        self.recipe.train(steps=steps)

    def finish(self) -> WorkloadResult:
        """Stop the profiler (its cost is then known), compute the figures, log them to the run."""
        r = self.recipe
        profile = r.prof.stop().to_dict() if r.prof is not None else None
        r.prof = None
        f = measure.figures(r.history, self.w.warmup_steps, self.w.steps, r.flops_per_token, r.roofline.flops_per_s)
        if profile:
            f.profiler_overhead_ratio = profile.get("self_cost", {}).get("overhead_ratio")
        if r.tracker is not None:
            pts = measure.points(f, int(time.time() * 1000))
            for i in range(0, len(pts), 1000):  # MLflow takes at most 1000 points per request
                r.tracker.log_points(pts[i:i + 1000])
        self.status = "FINISHED"
        return WorkloadResult(self.w.name, "ok", run_id=r.run_id, summary=f.summary(), figures=f.to_dict())

    def close(self) -> None:
        """End the MLflow run (FAILED unless ``finish`` ran) and remove the scratch output dir."""
        try:
            self.recipe.cleanup(self.status)
        finally:
            shutil.rmtree(self.out, ignore_errors=True)


def _tag(recipe, w: Workload, suite: str, repeats: int, session: str) -> None:
    if recipe.tracker is not None:
        recipe.tracker.set_tags({TAG_SUITE: suite, TAG_WORKLOAD: w.name, TAG_PRESET: w.preset,
                                 TAG_PRECISION: w.precision, TAG_RANK: w.rank, TAG_SESSION: session,
                                 TAG_REPEATS: repeats, "lowres.command": "bench"})


def _spec_args(spec: dict) -> dict:
    return {**{k: v for k, v in spec.items() if k != "workload"}, "w": Workload(**spec["workload"])}


def _run_child(spec: dict) -> WorkloadResult:
    """One workload in a fresh interpreter; its last stdout line is the result as JSON."""
    proc = subprocess.run([sys.executable, "-m", "lowres.bench.worker", json.dumps(spec)], capture_output=True,
                          text=True, env=dict(os.environ))
    name = Workload(**spec["workload"]).name
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:].strip()
        return WorkloadResult(name, "failed", reason=f"exit {proc.returncode}: {tail}")
    # The recipe's own notes (figures spooled, run `lowres sync`) must reach the user; library chatter need not.
    for line in proc.stderr.splitlines():
        if line.startswith(("warning:", "note:")):
            sys.stderr.write(f"  [{name}] {line}\n")
    return WorkloadResult(**json.loads(lines[-1]))


def result_json(result: WorkloadResult) -> str:
    """The worker's output line."""
    return json.dumps(asdict(result), default=str)
