"""Crafted client replies against the real federation server loop: does any crash the round, capture the global
adapter, or make the server allocate what a header claims?

Three honest clients of the `tiny` preset (the real ClientApp handlers) and hostile nodes answering with the
replies of ``lowres.federated.hostile``: wrong shapes, sizes, dtypes, non-finite values, lying/short/oversized
headers, inflated/inf/negative num_examples, missing records, bad identity answers, a huge-norm update, an
error. Everything goes through ``run_federation`` over a ``LocalGrid`` — the same round loop and handlers as
the Flower engines, every message serialised and parsed as on the wire.

1. Each crafted reply alone (one federation of 1 round per reply: 3 honest + 1 hostile node), so a crash or
   a capture is attributed to one reply. 2. All of them at once for 2 rounds (the second round's norm screen
   has a previous global update), under each aggregator (fedavg, median, trimmed_mean). 3. An honest-only
   federation: the server's memory without any hostile node, for reference.

crashed: run_federation raised (the round did not complete). captured: the round's global update has cosine
< 0.99 to the sample-weighted mean of the honest clients' updates of that round. Memory: between handing a
batch of replies to the server and the server's next message (decoding, screening, aggregating, saving,
central eval), the RSS rise and the tracemalloc peak (numpy reports its buffers, so a 381 MiB allocation
driven by a claimed shape shows even if its pages are never touched).

    python bench/hostile_fed.py            # ~3 minutes on 2 cores
    python bench/hostile_fed.py --quick    # only the all-at-once federations

Last line: ``RESULT crafted=… crashed=… captured=… max_rss_rise_mb=…`` (crafted: distinct crafted replies;
crashed / captured: how many of them did; max over every run of the server's RSS rise).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
GOAL_COSINE = 0.99


def run(folder: Path, crafted: list[str], rounds: int, *extra: str) -> dict:
    """One federation of 3 honest clients + one node per crafted reply; what happened to it."""
    import numpy as np
    from safetensors.numpy import load_file

    from lowres.federated.client import clear_cache
    from lowres.federated.client_app import app as client_app
    from lowres.federated.config import load_fed_config
    from lowres.federated.hostile import HostileGrid, cosine
    from lowres.federated.preparation import prepare
    from lowres.federated.server import run_federation

    fed = load_fed_config(REPO / "configs/fed/tiny-sim.yaml", [
        f"output_dir={folder}", "tracking.mlflow=false", "local_steps=2", f"rounds={rounds}",
        "robustness.round_timeout_s=30", *extra])
    clear_cache()
    prep = prepare(fed)
    before = [{k: v.copy() for k, v in prep.global_tensors.items()}]
    grid = HostileGrid(client_app, 3, crafted)
    t0 = time.perf_counter()
    out = {"crafted": crafted, "crashed": None, "cosines": [], "seconds": 0.0}
    try:
        res = run_federation(grid, fed, prep=prep)
        out["failures"] = res.failures + res.final_eval.get("failures", [])
        out["accepted"] = [r["clients_accepted"] for r in res.rounds]
    except Exception as exc:  # what this bench counts: the round did not survive the reply
        out["crashed"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        grid.finish()
        clear_cache()
    out["seconds"] = time.perf_counter() - t0
    saved = [load_file(str(p)) for p in sorted((folder / "global").glob("round-*.safetensors"))]
    for i, (a, b) in enumerate(zip(before + saved, saved)):
        if i < len(grid.honest_updates):
            out["cosines"].append(cosine({k: b[k].astype(np.float64) - a[k] for k in a}, grid.honest_mean(i)))
    out["rss_rise_mb"] = max((w["rss_rise_bytes"] for w in grid.server_windows), default=0.0) / 2**20
    out["traced_peak_mb"] = max((w["traced_peak_bytes"] for w in grid.server_windows), default=0.0) / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the one-reply-at-a-time federations")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)

    from lowres.federated.hostile import CRAFTED, CRAFTED_EVAL, CRAFTED_IDENTITY
    from lowres.hardware import detect

    hw = detect()
    names = list(CRAFTED) + list(CRAFTED_IDENTITY) + list(CRAFTED_EVAL)
    print(f"hostile_fed: {len(names)} crafted replies, 3 honest tiny clients, 2 local steps; CPU {hw.cpu.model} "
          f"({hw.cpu.logical_cores} threads, tier {hw.tier}); the server loop in this process (LocalGrid)", flush=True)
    crashed, captured, rss, traced = set(), set(), [], []
    with tempfile.TemporaryDirectory(prefix="hostile-fed-") as tmp:
        base = run(Path(tmp) / "honest", [], 2)
        print(f"  honest only, 2 rounds: server RSS rise {base['rss_rise_mb']:.1f} MiB, tracemalloc peak "
              f"{base['traced_peak_mb']:.1f} MiB, cosine {', '.join(f'{c:.4f}' for c in base['cosines'])}", flush=True)
        if not args.quick:
            print(f"\n{'crafted reply':<30} {'outcome':<9} {'cosine':>7} {'RSS MiB':>8} {'peak MiB':>8}  "
                  "server's record")
            for i, name in enumerate(names):
                r = run(Path(tmp) / f"one-{i}", [name], 1)
                rss.append(r["rss_rise_mb"])
                traced.append(r["traced_peak_mb"])
                cos = r["cosines"][0] if r["cosines"] else float("nan")
                if r["crashed"]:
                    crashed.add(name)
                elif not cos >= GOAL_COSINE:
                    captured.add(name)
                why = next((f["reason"] for f in r.get("failures", [])[::-1] if f["client"].startswith("node-")),
                           "accepted (weight capped)" if not r["crashed"] else r["crashed"])
                outcome = "CRASHED" if r["crashed"] else "CAPTURED" if name in captured else "ok"
                print(f"{name:<30} {outcome:<9} {cos:7.4f} {r['rss_rise_mb']:8.1f} {r['traced_peak_mb']:8.1f}  "
                      f"{why.replace('base_model.model.model.', '')[:100]}", flush=True)
        print()
        for agg in ("median", "trimmed_mean"):
            r = run(Path(tmp) / f"honest-{agg}", [], 2, f"strategy.aggregator={agg}")
            print(f"honest only, 2 rounds, {agg:<12}: cosine to the honest mean "
                  f"{', '.join(f'{c:.4f}' for c in r['cosines'])} (the aggregator's own distance from the mean)")
        for agg in ("fedavg", "median", "trimmed_mean"):
            r = run(Path(tmp) / f"all-{agg}", names, 2, *([f"strategy.aggregator={agg}"] if agg != "fedavg" else []))
            rss.append(r["rss_rise_mb"])
            traced.append(r["traced_peak_mb"])
            cos = ", ".join(f"{c:.4f}" for c in r["cosines"])
            print(f"all {len(names)} at once, 2 rounds, {agg:<12}: "
                  f"{'CRASHED ' + r['crashed'] if r['crashed'] else 'completed'}, accepted per round "
                  f"{r.get('accepted')}, cosine to the honest mean {cos}, server RSS rise {r['rss_rise_mb']:.1f} MiB, "
                  f"tracemalloc peak {r['traced_peak_mb']:.1f} MiB ({r['seconds']:.0f} s)", flush=True)
            if agg == "fedavg":  # the default: every reply is in it, so it counts toward crashed/captured
                if r["crashed"]:
                    crashed.add("all-at-once")
                elif not r["cosines"] or min(r["cosines"]) < GOAL_COSINE:
                    captured.add("all-at-once")
    print(f"\ncosine goal >= {GOAL_COSINE} (fedavg, the default). median / trimmed_mean are unweighted estimates "
          "of the honest update, so their cosine to the weighted honest mean is below 1 by design; they are "
          "what holds when a well-formed, plausible-norm update is hostile.")
    print(f"server memory: max RSS rise {max(rss):.1f} MiB, max tracemalloc peak {max(traced):.1f} MiB "
          f"(honest only: {base['rss_rise_mb']:.1f} / {base['traced_peak_mb']:.1f} MiB)")
    print(f"RESULT crafted={len(names)} crashed={len(crashed)} captured={len(captured)} max_rss_rise_mb={max(rss):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
