"""`lowres cache show|clear`: what the advisor has cached per machine and model — probe points, rooflines,
the machine model — when it was measured and under what load; and a way to drop it.

Both caches live in ``$LOWRES_CACHE_DIR`` (else ``~/.cache/lowres``): ``calibration.json`` (probe points per
``<fingerprint>|<model>``, bandwidth, dequantisation rates, the machine model) and ``roofline.json``
(peak FLOP/s per machine, dtype, threads and GEMM shapes).
"""

from __future__ import annotations

import datetime as _dt
import json
import statistics
import sys
from typing import Annotated, Any

import typer

cache_app = typer.Typer(help="Show or clear the advisor's per-machine caches (calibration, roofline).",
                        no_args_is_help=True)


def _when(ts: float | None) -> str:
    if not ts:
        return "?"
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _load(entry: dict | None) -> str:
    if not entry or entry.get("load1") is None:
        return "load not recorded"
    return f"load {entry['load1']:.2f} on {entry.get('cpus', '?')} CPUs"


def cache_rows() -> list[dict[str, Any]]:
    """One row per cached item: kind, machine, model/what, when, load, detail."""
    from lowres.advisor.calibrate import _read, fit_calibration, load_points
    from lowres.train.roofline_cache import cache_path as roofline_path, read_cache

    rows: list[dict[str, Any]] = []
    for key, entry in _read().items():
        machine, _, what = key.partition("|")
        if "points" in entry:
            points = load_points(machine, what)
            shares = [p.cpu_share for p in points if p.cpu_share is not None]
            loads = [p.load.get("load1") for p in points if p.load and p.load.get("load1") is not None]
            cal = fit_calibration(points)
            rows.append({"kind": "calibration", "machine": machine, "what": what, "points": len(points),
                         "when": _when(max((p.measured_at for p in points), default=None)),
                         "load": (f"load {min(loads):.2f}-{max(loads):.2f}" if loads else "load not recorded")
                         + (f", CPU share {min(shares):.2f}-{max(shares):.2f}" if shares else ""),
                         "detail": f"fits to: time factor {cal.time_factor:.2f}, memory factor "
                                   f"{cal.memory_factor:.2f} ({cal.source})"})
        elif what == "machine":
            for sub, v in entry.items():
                rows.append({"kind": "machine model", "machine": machine, "what": sub,
                             "when": _when(v.get("measured_at")), "load": _load(v),
                             "detail": f"{v.get('value'):.4g}" if v.get("value") else "none"})
        elif what == "bandwidth":
            rows.append({"kind": "bandwidth", "machine": machine, "what": "copy",
                         "when": _when(entry.get("measured_at")), "load": _load(entry),
                         "detail": f"{entry.get('bytes_per_s', 0) / 1e9:.1f} GB/s"})
        else:
            rows.append({"kind": "dequant rate", "machine": machine, "what": what, "when": "?", "load": _load(None),
                         "detail": json.dumps(entry)})
    for key, v in read_cache(roofline_path()).items():
        machine, dtype, threads, shapes = (key.split("|") + ["", "", "", ""])[:4]
        rows.append({"kind": "roofline", "machine": machine,
                     "what": f"{dtype} {threads} ({shapes.count(',') + 1} GEMM shapes)",
                     "when": _when(v.get("measured_at")), "load": _load(v.get("load")),
                     "detail": f"{v.get('flops_per_s', 0) / 1e9:.0f} GFLOP/s ({v.get('source', '?')})"})
    return rows


@cache_app.command("show")
def show(json_output: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False) -> None:
    """List what is cached per machine and model: when, under what load, and what it fits to."""
    from rich.console import Console
    from rich.table import Table

    from lowres.advisor.calibrate import cache_dir
    from lowres.hardware.detection import this_machine_fingerprint

    rows = cache_rows()
    if json_output:
        sys.stdout.write(json.dumps({"cache_dir": str(cache_dir()), "rows": rows}, indent=2) + "\n")
        return
    console = Console()
    here = this_machine_fingerprint()
    console.print(f"caches in {cache_dir()} — this machine is {here}", highlight=False)
    if not rows:
        console.print("nothing cached yet: `lowres tune --auto --dry-run` measures this machine", highlight=False)
        return
    table = Table()
    for col in ("kind", "machine", "what", "when", "load", "detail"):
        table.add_column(col, overflow="fold")
    for r in rows:
        machine = r["machine"] + (" (here)" if r["machine"].split(":")[0] == here else "")
        table.add_row(r["kind"], machine, str(r["what"]), r["when"], r["load"], r["detail"])
    console.print(table)
    loads = [r for r in rows if r["kind"] == "calibration"]
    if loads:
        console.print(f"{statistics.fmean(r['points'] for r in loads):.0f} probe points per model on average; "
                      "`lowres cache clear --model NAME` drops one model's", highlight=False)


@cache_app.command("clear")
def clear(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only this model's probe points.")] = None,
    all_machines: Annotated[bool, typer.Option("--all-machines",
                                               help="Every machine's entries, not only this one's.")] = False,
) -> None:
    """Drop cached probe points, rooflines and the machine model of this machine (or one model's points)."""
    from lowres.advisor.calibrate import _read, _write
    from lowres.hardware.detection import this_machine_fingerprint
    from lowres.train.roofline_cache import cache_path as roofline_path, read_cache, write_cache

    here = this_machine_fingerprint()

    def mine(key: str) -> bool:
        machine, _, what = key.partition("|")
        if not all_machines and machine.split(":")[0] != here:
            return False
        return model is None or what == model

    data = _read()
    dropped = [k for k in data if mine(k)]
    _write({k: v for k, v in data.items() if k not in dropped})
    n_roof = 0
    if model is None:
        roof = read_cache(roofline_path())
        keep = {k: v for k, v in roof.items() if not mine(k.split("|")[0])}
        n_roof = len(roof) - len(keep)
        if n_roof:
            write_cache(roofline_path(), keep)
    where = "every machine" if all_machines else f"this machine ({here})"
    typer.echo(f"cleared {len(dropped)} calibration entr{'y' if len(dropped) == 1 else 'ies'} and {n_roof} "
               f"roofline entr{'y' if n_roof == 1 else 'ies'} of {where}" + (f", model {model}" if model else ""))
