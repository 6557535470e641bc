"""What watching a Flower app costs, alone and with three federations at once on one machine.

The app is Flower's quickstart-pytorch template as tests/flower_apps/quickstart_pytorch ships it (a tiny MLP
on synthetic data, stock FedAvg, the strategy wrapped by ``lowres.federated.watch``); "unwatched" runs the
same app with the wrap replaced by the bare strategy. Each federation is its own process (its own server,
as on a lab machine), 3 clients through lowres' in-process LocalGrid (every message serialised and parsed
as on the wire), MLflow into its own SQLite file (created before the clock starts, as a lab's store exists
before its federations) and a Prometheus exporter on a free port. Six conditions,
interleaved in a shuffled order and repeated:

    1 or 3 at once × unwatched · watched · watched with synchronous MLflow writes

"watched" is the monitor as it ships: its MLflow writes queued and sent by a writer thread as one
``log_batch`` per run at each round's end (lowres.federated.mlflow_writer); "sync" makes them in the round's
thread, one request per reply and figure (``FedMonitor(mlflow_flush_s=None)``, how it was before), so the
two are compared side by side in one run, under the same load.

Timed: each federation's ServerApp call (rounds, evaluation and, when watched, the MLflow runs and the
exporter), after the process has imported everything. Printed: medians and spread per condition, and

    watch_overhead_1   watched / unwatched, one federation alone
    watch_overhead_3   the same with three federations at once: how much watching slows a federation when
                       others run beside it (≈ watch_overhead_1 means the federations do not slow each other
                       through the monitoring)
    sync_overhead_1/3  the same with synchronous MLflow writes
    concurrency_3      3 unwatched at once / 1 unwatched: what sharing the cores costs, monitoring aside

    python bench/fed_watch.py               # 3 repeats, 3 rounds of 2 local epochs
    python bench/fed_watch.py --repeats 5 --epochs 5

Last line: ``RESULT watch_overhead_1=… watch_overhead_3=… sync_overhead_1=… sync_overhead_3=… concurrency_3=…
watch_share=… sync_watch_share=…`` (watch_share: the wrapper's own time, ``fed/watch_seconds``, over the round
time, with three at once; sync_watch_share: the same with synchronous writes).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "flower_apps" / "quickstart_pytorch"


def federation(name: str, mode: str, epochs: int, rounds: int, folder: str, start, out) -> None:
    """One federation in this process: wait for ``start`` (all siblings imported), run, put the figures."""
    import logging

    sys.path.insert(0, str(APP))
    sys.path.insert(0, str(REPO))
    import torch
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir

    torch.set_num_threads(1)
    import pytorchexample.server_app as server_module
    from pytorchexample.client_app import app as client_app

    from lowres.federated.local_grid import LocalGrid

    watched = mode != "off"
    if not watched:
        server_module.watch = lambda strategy, context: strategy
    if mode == "sync":  # the monitor's MLflow writes in the round's thread, one request each (the old way)
        from lowres.federated import monitor

        init = monitor.FedMonitor.__init__
        monitor.FedMonitor.__init__ = lambda self, *a, **k: init(self, *a, **{"mlflow_flush_s": None, **k})
    uri = f"sqlite:///{Path(folder) / (name + '.db')}"
    run_config = get_fused_config_from_dir(APP, {"num-server-rounds": rounds, "local-epochs": epochs})
    from mlflow.tracking import MlflowClient

    # the lab's store exists before a federation starts: create its tables before the clock does
    MlflowClient(uri).search_experiments()
    for name_ in ("flwr", "mlflow"):
        logging.getLogger(name_).setLevel(logging.WARNING)
    start.wait()
    grid = LocalGrid(client_app, 3, run_config=run_config)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config={**run_config, "lowres-federation": name, "lowres-tracking-uri": uri,
                              "lowres-prometheus-port": 0})
    os.chdir(folder)
    t0 = time.perf_counter()
    server_module.app(grid, ctx)
    wall = time.perf_counter() - t0
    watch_s = round_s = 0.0
    if watched:
        c = MlflowClient(uri)
        (run,) = c.search_runs([c.get_experiment_by_name("lowres-fed").experiment_id],
                               f"tags.`lowres.federation` = '{name}' and tags.`lowres.command` = 'fed'")
        watch_s = sum(m.value for m in c.get_metric_history(run.info.run_id, "fed/watch_seconds"))
        round_s = sum(m.value for m in c.get_metric_history(run.info.run_id, "fed/round_seconds"))
    out.put((name, wall, watch_s, round_s))


def condition(n: int, mode: str, epochs: int, rounds: int, tag: str) -> list[tuple]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="fed-watch-") as folder:
        procs = [ctx.Process(target=federation, args=(f"{tag}-{i}", mode, epochs, rounds, folder, start, out))
                 for i in range(n)]
        for p in procs:
            p.start()
        time.sleep(1.0)
        # every process has imported torch, flwr and mlflow before the clock starts: wait for them to idle
        deadline = time.time() + 300
        import psutil

        while time.time() < deadline and any(psutil.Process(p.pid).cpu_percent(interval=0.5) > 20 for p in procs):
            pass
        start.set()
        results = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            if p.exitcode != 0:
                raise SystemExit(f"a federation process exited with {p.exitcode}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="times each condition runs (default 3)")
    ap.add_argument("--epochs", type=int, default=2, help="local epochs per round (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per federation (default 3)")
    args = ap.parse_args()
    if args.repeats < 1 or args.epochs < 1 or args.rounds < 1:
        ap.error("--repeats, --epochs and --rounds must be at least 1")
    sys.path.insert(0, str(REPO))
    from lowres.hardware import detect

    hw = detect()
    print(f"CPU: {hw.cpu.model}, {hw.cpu.logical_cores} threads, tier {hw.tier}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    modes = {"off": "unwatched", "async": "watched", "sync": "watched, sync MLflow"}
    plan = [(n, m) for n in (1, 3) for m in modes] * args.repeats
    random.Random(0).shuffle(plan)
    walls: dict[tuple[int, str], list[float]] = {}
    watch_s = {m: 0.0 for m in modes}
    round_s = {m: 0.0 for m in modes}
    for k, (n, m) in enumerate(plan):
        res = condition(n, m, args.epochs, args.rounds, f"r{k}")
        walls.setdefault((n, m), []).extend(r[1] for r in res)
        if n == 3:
            watch_s[m] += sum(r[2] for r in res)
            round_s[m] += sum(r[3] for r in res)
        print(f"{k + 1}/{len(plan)}: {n} {modes[m]}: " + ", ".join(f"{r[1]:.2f} s" for r in res), flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    for (n, m), v in sorted(walls.items()):
        print(f"{n} {modes[m]:20s}: median {med[(n, m)]:.2f} s per federation "
              f"(min {min(v):.2f}, max {max(v):.2f}, {len(v)} runs)")
    o1, o3 = med[(1, "async")] / med[(1, "off")], med[(3, "async")] / med[(3, "off")]
    s1, s3 = med[(1, "sync")] / med[(1, "off")], med[(3, "sync")] / med[(3, "off")]
    conc = med[(3, "off")] / med[(1, "off")]
    share = {m: watch_s[m] / round_s[m] if round_s[m] else float("nan") for m in ("async", "sync")}
    print(f"RESULT watch_overhead_1={o1:.3f} watch_overhead_3={o3:.3f} sync_overhead_1={s1:.3f} "
          f"sync_overhead_3={s3:.3f} concurrency_3={conc:.3f} watch_share={share['async']:.4f} "
          f"sync_watch_share={share['sync']:.4f}")


if __name__ == "__main__":
    main()
