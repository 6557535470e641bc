"""What watching costs on the network: the monitoring's own bytes against the federated bytes, 1–5 federations.

For N = 1 … 5, N small federations run at the same time (each in its own process: `tiny`, ``--clients``
clients, ``--rounds`` rounds of ``--local-steps`` steps, the server's round loop over ``LocalGrid`` — every
message serialised and parsed as on the wire) with full monitoring, on real servers:

- MLflow tracking (parent run, a child run per client, per-round metrics, the server's heartbeat) to a real
  ``mlflow server`` — through a counting loopback proxy, one per federation;
- the index entry (announce, heartbeats, end) on the same ``mlflow server`` — through its own counting proxy;
- Prometheus (a real one, the shipped scrape interval of 5 s) scraping each federation's ``lowres_fed_*``
  exporter — through a counting proxy in front of each exporter.

A proxy counts every byte of the TCP payload both ways (HTTP headers, bodies, gzip as negotiated). The
federated bytes are the serialised message contents both ways as the clients receive and send them
(``LocalGrid.down``/``up``, equal to the server's ``lowres_fed_bytes_*_total``); gRPC framing is not in them,
so the share is, if anything, overstated. No Pushgateway: the federation server exports; nothing pushes.

    python bench/monitor_traffic.py                   # N = 1..5, 3 clients × 3 rounds × 2 local steps
    python bench/monitor_traffic.py --max-federations 2 --rounds 2

Byte counts of the event-driven parts (MLflow writes, the announcement) do not depend on the machine's load;
the time-driven ones (scrapes every 5 s, heartbeats every ``--heartbeat-s``) grow with how long a federation
takes, so the table prints each federation's wall time beside them.

Last line: ``RESULT federations=5 monitor_share_pct=… per_server_growth=… per_server_events_growth=…
seconds_growth=…`` (share at the largest N; growth: a server's mean monitoring bytes at the largest N over
those at N=1 — all of them, then only the event-driven MLflow and index bytes; seconds_growth: how much
longer a federation took at the largest N, which is what stretches the time-driven scrapes).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the real-server helpers the tests use (servers.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingProxies:
    """Loopback TCP proxies on one asyncio loop (a background thread), each counting its payload bytes."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.counts: dict[str, list[int]] = {}  # name → [client→server bytes, server→client bytes]
        self.endpoints: dict[tuple[str, str], int] = {}  # (channel, HTTP path) → bytes both ways
        self._servers = []
        threading.Thread(target=self.loop.run_forever, name="proxies", daemon=True).start()

    def add(self, name: str, target_port: int) -> int:
        """A proxy ``name`` in front of 127.0.0.1:``target_port``; returns its own port."""
        port = free_port()
        self.counts[name] = [0, 0]

        async def pump(reader, writer, slot, current):
            try:
                while data := await reader.read(65536):
                    self.counts[name][slot] += len(data)
                    if slot == 0 and data[:8].split(b" ")[0] in (b"GET", b"POST", b"PATCH", b"PUT", b"DELETE"):
                        # HTTP/1.1 on one connection is request, response, request…: bytes go to the last request
                        current[0] = data.split(b" ", 2)[1].split(b"?")[0].decode(errors="replace")
                    key = (name.split("/")[-1], current[0])
                    self.endpoints[key] = self.endpoints.get(key, 0) + len(data)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def handle(reader, writer):
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
            except OSError:  # the exporter is gone (federation over): Prometheus' scrape fails, no bytes moved
                writer.close()
                return
            current = ["?"]
            await asyncio.gather(pump(reader, up_writer, 0, current), pump(up_reader, writer, 1, current))

        async def start():
            self._servers.append(await asyncio.start_server(handle, "127.0.0.1", port))

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return port

    def total(self, name: str) -> int:
        return sum(self.counts.get(name, (0, 0)))


def run_federation_process(name: str, folder: str, mlflow_uri: str, index_uri: str, exporter_port: int,
                           clients: int, rounds: int, local_steps: int, heartbeat_s: float) -> dict:
    """One federation with full monitoring; its federated bytes (as the clients saw them) and wall time."""
    import logging

    logging.disable(logging.WARNING)
    Path(folder).mkdir(parents=True, exist_ok=True)
    log = open(Path(folder) / "federation.log", "w")  # its console lines (random-init notes, rounds) stay there
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    from lowres.federated.client_app import app as client_app
    from lowres.federated.config import load_fed_config
    from lowres.federated.local_grid import LocalGrid
    from lowres.federated.server import run_federation

    fed = load_fed_config(REPO / "configs/fed/tiny-sim.yaml", [
        f"federation={name}", f"output_dir={folder}", f"clients={clients}", f"rounds={rounds}",
        f"local_steps={local_steps}", f"robustness.min_available={clients}", "robustness.min_clients=1",
        f"tracking.mlflow_uri={mlflow_uri}", f"tracking.prometheus_port={exporter_port}",
        "index.announce=true", "index.superlink=127.0.0.1:9092", f"index.mlflow_uri={index_uri}",
        f"index.heartbeat_s={heartbeat_s}"])
    grid = LocalGrid(client_app, fed.clients)
    t0 = time.perf_counter()
    res = run_federation(grid, fed)
    return {"name": name, "seconds": time.perf_counter() - t0, "rounds": len(res.rounds),
            "federated_bytes": sum(b for _, _, b in grid.down) + sum(b for _, _, b in grid.up)}


def level(n: int, args, mlflow_port: int, work: Path) -> dict:
    """N federations at once: bytes per channel per federation."""
    from servers import prometheus_server

    proxies = CountingProxies()
    names = [f"traffic-{n}x-{i}" for i in range(n)]
    exporters = {nm: free_port() for nm in names}
    setup = {}
    for nm in names:
        setup[nm] = {"mlflow": proxies.add(f"{nm}/mlflow", mlflow_port),
                     "index": proxies.add(f"{nm}/index", mlflow_port),
                     "scrape": proxies.add(f"{nm}/scrape", exporters[nm])}
    targets = [f"127.0.0.1:{setup[nm]['scrape']}" for nm in names]
    with prometheus_server(targets, scrape_interval=args.scrape_interval):
        ctx = mp.get_context("spawn")
        with ctx.Pool(n) as pool:
            jobs = [pool.apply_async(run_federation_process, (
                nm, str(work / nm), f"http://127.0.0.1:{setup[nm]['mlflow']}", f"http://127.0.0.1:{setup[nm]['index']}",
                exporters[nm], args.clients, args.rounds, args.local_steps, args.heartbeat_s)) for nm in names]
            results = [j.get(timeout=3600) for j in jobs]
    rows = []
    for r in results:
        nm = r["name"]
        mon = {ch: proxies.total(f"{nm}/{ch}") for ch in ("mlflow", "index", "scrape")}
        rows.append({**r, **mon, "monitor": sum(mon.values())})
    proxies.loop.call_soon_threadsafe(proxies.loop.stop)
    if args.by_endpoint:
        for (ch, path), b in sorted(proxies.endpoints.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  N={n} {ch:<6} {path:<50} {b / 1e3:8.1f} kB")
    fed = sum(r["federated_bytes"] for r in rows)
    mon = sum(r["monitor"] for r in rows)
    return {"n": n, "rows": rows, "federated": fed, "monitor": mon, "share_pct": 100.0 * mon / fed,
            "per_server": statistics.fmean(r["monitor"] for r in rows),
            # event-driven (MLflow writes, the index entry) vs time-driven (scrapes: bytes per second of a server)
            "per_server_events": statistics.fmean(r["mlflow"] + r["index"] for r in rows),
            "scrape_rate": statistics.fmean(r["scrape"] / r["seconds"] for r in rows),
            "channels": {ch: sum(r[ch] for r in rows) for ch in ("mlflow", "index", "scrape")},
            "seconds": statistics.fmean(r["seconds"] for r in rows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-federations", type=int, default=5)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--scrape-interval", default="5s", help="Prometheus' scrape interval (the shipped config's: 5s)")
    p.add_argument("--heartbeat-s", type=float, default=30.0, help="the index entry's heartbeat interval")
    p.add_argument("--by-endpoint", action="store_true", help="print the bytes of each HTTP path (what costs most)")
    args = p.parse_args()
    if not 1 <= args.max_federations <= 20:
        print(f"error: --max-federations must be in 1..20, got {args.max_federations}", file=sys.stderr)
        return 2
    from lowres.hardware import detect

    hw = detect()
    print(f"monitor_traffic: 1..{args.max_federations} concurrent federations of {args.clients} tiny clients, "
          f"{args.rounds} rounds × {args.local_steps} steps; CPU {hw.cpu.model} ({hw.cpu.logical_cores} threads, "
          f"tier {hw.tier}), load {os.getloadavg()[0]:.1f}", flush=True)
    from servers import mlflow_server

    out = []
    with tempfile.TemporaryDirectory(prefix="lowres-traffic-") as tmp, mlflow_server(workers=2) as uri:
        mlflow_port = int(uri.rsplit(":", 1)[1])
        for n in range(1, args.max_federations + 1):
            res = level(n, args, mlflow_port, Path(tmp) / f"n{n}")
            out.append(res)
            c = res["channels"]
            print(f"N={n}: federated {res['federated'] / 1e6:.2f} MB, monitoring {res['monitor'] / 1e3:.1f} kB "
                  f"(mlflow {c['mlflow'] / 1e3:.1f}, index {c['index'] / 1e3:.1f}, scrapes {c['scrape'] / 1e3:.1f}), "
                  f"share {res['share_pct']:.3f} %, per server {res['per_server'] / 1e3:.1f} kB, "
                  f"{res['seconds']:.0f} s per federation, load {os.getloadavg()[0]:.1f}", flush=True)
    print()
    print("| federations | federated MB | MLflow kB | index kB | scrapes kB | monitoring share | per server kB "
          "| of which MLflow + index kB | scrape B/s per server | s per federation |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in out:
        c = r["channels"]
        print(f"| {r['n']} | {r['federated'] / 1e6:.2f} | {c['mlflow'] / 1e3:.1f} | {c['index'] / 1e3:.1f} | "
              f"{c['scrape'] / 1e3:.1f} | {r['share_pct']:.3f} % | {r['per_server'] / 1e3:.1f} | "
              f"{r['per_server_events'] / 1e3:.1f} | {r['scrape_rate']:.0f} | {r['seconds']:.0f} |")
    growth = out[-1]["per_server"] / out[0]["per_server"]
    events_growth = out[-1]["per_server_events"] / out[0]["per_server_events"]
    print(f"RESULT federations={out[-1]['n']} monitor_share_pct={out[-1]['share_pct']:.3f} "
          f"per_server_growth={growth:.3f} per_server_events_growth={events_growth:.3f} "
          f"seconds_growth={out[-1]['seconds'] / out[0]['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
