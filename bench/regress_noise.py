"""Does `lowres regress` catch a real 10 % slowdown, and stay quiet on a rerun, on this noisy machine?

Each repetition sets up three benchmark runs of the same workload side by side in one process (each its own
MLflow run, same config hash and fingerprint):

- ``base``: the baseline;
- ``rerun``: the same code again;
- ``slow``: the same code with a sleep of 10 % of the median step time added to every forward pass (a torch
  forward pre-hook that the bench installs — the recipe has no test-only branch).

After warm-up, ``base`` and ``rerun`` run two rounds of steps from which the sleep is calibrated; then all
three run in rounds of a few steps each, in a fresh random order per round, so a change in the machine's
load lands on all three alike (the load here changes in bursts of seconds: rounds of 12 steps were too coarse,
one run would catch a whole burst). `lowres regress` (its library function, the same one the CLI calls) then
compares base→rerun and base→slow by their step-time distributions.

The workload runs torch with one thread: on a shared two-core machine two threads fight the other users for
both cores and step times spread five-fold; one thread spreads far less.

    python bench/regress_noise.py                 # 5 repetitions × 50 rounds, about 6–8 minutes on two cores
    python bench/regress_noise.py --reps 3 --rounds 6

Last line: ``RESULT injected_flagged=k/N rerun_flagged=m/N`` (the goal: N/N and 0/N).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each comparison (default 5)")
    ap.add_argument("--rounds", type=int, default=50, help="interleaved rounds per repetition (default 50)")
    ap.add_argument("--chunk", type=int, default=3, help="steps per run per round (default 3)")
    ap.add_argument("--slowdown", type=float, default=0.10, help="injected slowdown (default 0.10)")
    ap.add_argument("--threshold", type=float, default=0.05, help="regress threshold (default 0.05)")
    ap.add_argument("--tracking-uri", default=None, help="default: a temp SQLite store")
    args = ap.parse_args()

    from lowres.bench.regress import regress
    from lowres.bench.suite import BenchRun, new_session
    from lowres.bench.workloads import Workload
    from lowres.cli.app import _quiet_third_party_noise
    from lowres.tracking.runs import client

    _quiet_third_party_noise()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="lowres-regress-noise-")
    uri = args.tracking_uri or f"sqlite:///{Path(tmp) / 'mlflow.db'}"
    # chunk = steps per repeat, so each round is one repeat of each run
    w = Workload("tiny", "fp32", 8, seq_len=64, batch_size=4, warmup_steps=5, steps=args.chunk, threads=1)
    rng = random.Random(0)
    t_start = time.monotonic()
    print(f"workload {w.name} · {args.reps} repetitions × {args.rounds} interleaved rounds of {args.chunk} "
          f"steps · injected slowdown {args.slowdown:.0%} · threshold {args.threshold:.0%} · store {uri}",
          flush=True)
    c = client(uri)
    flagged = {"rerun": 0, "slow": 0}
    for rep in range(1, args.reps + 1):
        session = new_session()
        runs = {name: BenchRun(w, suite="regress-noise", repeats=args.rounds + 2 * (name != "slow"), tracking_uri=uri,
                               experiment="lowres-regress-noise", session=f"{session}-{name}")
                for name in ("base", "rerun", "slow")}
        try:
            for r in runs.values():
                r.train(w.warmup_steps)
            for name in ("base", "rerun") * 2:  # calibration rounds: the sleep is 10 % of these steps' median
                runs[name].train(args.chunk)
            calib = [h["step_seconds"] for n in ("base", "rerun") for h in runs[n].recipe.history[w.warmup_steps:]]
            sleep_s = args.slowdown * statistics.median(calib)
            runs["slow"].inject_sleep(sleep_s)
            for _ in range(args.rounds):
                order = list(runs)
                rng.shuffle(order)
                for name in order:
                    runs[name].train(args.chunk)
            results = {name: r.finish() for name, r in runs.items()}
        finally:
            for r in runs.values():
                r.close()
        by_id = {name: c.get_run(res.run_id) for name, res in results.items()}
        base_median = statistics.median(results["base"].figures["step_seconds"])
        line = [f"rep {rep}: base median {base_median * 1e3:.1f} ms, sleep {sleep_s * 1e3:.2f} ms "
                f"({sleep_s / base_median:.1%} of it)"]
        for name in ("rerun", "slow"):
            report = regress(c, [by_id["base"]], [by_id[name]], metrics=["step_time"], threshold=args.threshold)
            t = report.comparisons[0].tests["step_time"]
            hit = bool(report.regressions)
            flagged[name] += hit
            line.append(f"{name}: ratio {t.ratio:.3f} CI [{t.low:.3f}, {t.high:.3f}] p={t.p_value:.2g} "
                        f"{'FLAGGED' if hit else 'not flagged'}")
        print(" · ".join(line), flush=True)
    print(f"{time.monotonic() - t_start:.0f} s in all", flush=True)
    print(f"RESULT injected_flagged={flagged['slow']}/{args.reps} rerun_flagged={flagged['rerun']}/{args.reps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
