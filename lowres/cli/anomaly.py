"""`lowres anomaly …`: federated log anomaly detection (teachers on clients, a student on the server).

    lowres anomaly run [--config configs/anomaly/hdfs-tiny.yaml] [--set k_normal=100]   the whole pipeline
    lowres anomaly detect --model runs/anomaly/hdfs-tiny/student FILE                  score new logs

Parse, call lowres.anomaly, print — no logic here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

anomaly_app = typer.Typer(name="anomaly", help="Log anomaly detection: LM teachers per client, a small student.",
                          no_args_is_help=True)


@anomaly_app.command("run")
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="configs/anomaly/*.yaml")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Override a field.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print every figure as JSON on stdout.")] = False,
    output_dir: Annotated[str | None, typer.Option("--output", "-o", help="Folder of the run's files "
                                                   "(output_dir).")] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow server or store for the run "
                                                     "(default: $MLFLOW_TRACKING_URI, else lowres' local "
                                                     "store).")] = None,
) -> None:
    """Train teachers, score the public set, pseudo-label, train and save the student; compare with FedAvg."""
    from lowres.anomaly.pipeline import load_anomaly_config, run_pipeline

    if output_dir is not None:
        overrides = list(overrides or []) + [f"output_dir={json.dumps(output_dir)}"]
    if tracking_uri is not None:
        overrides = list(overrides or []) + [f"tracking_uri={json.dumps(tracking_uri)}"]

    console = Console(stderr=True)
    cfg = load_anomaly_config(config, overrides)
    r = run_pipeline(cfg, say=lambda s: console.print(s, highlight=False))
    if json_output:
        print(json.dumps(r, indent=2, default=float))
    else:
        teacher = f" · teacher {r['f1_teacher']:.3f}" if "f1_teacher" in r else ""
        fs = f" · FedAvg student {r['f1_fedavg_student']:.3f}" if "f1_fedavg_student" in r else ""
        console.print(f"F1 student ({r['mode']}) {r['f1_student']:.3f}{teacher} · FedAvg {r['f1_fedavg']:.3f}{fs}"
                      f" · comm ratio {r['comm_ratio']:.3f} · latency ratio {r['latency_ratio']:.3f}; student saved "
                      f"in {Path(cfg.output_dir) / 'student'}", highlight=False)


@anomaly_app.command("detect")
def detect(
    file: Annotated[Path, typer.Argument(help="A `Sequence,label` sessions CSV or raw HDFS log lines.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="A student folder saved by `lowres anomaly run`.")],
    threshold: Annotated[float, typer.Option(help="P(anomaly) at or above which a session is flagged.")] = 0.5,
    json_output: Annotated[bool, typer.Option("--json", help="Per-session results as JSON on stdout.")] = False,
) -> None:
    """Score every session of FILE; print F1, precision and recall when it carries labels, and what scoring
    cost here (seconds per session, peak memory)."""
    from lowres.anomaly.detect import detect_file

    res = detect_file(model, file, threshold)
    if json_output:
        print(json.dumps({"kind": res.kind, "metrics": res.metrics, "cost": res.cost,
                          "sessions": [{"key": k, "p_anomaly": float(p), "anomaly": int(f)}
                                       for k, p, f in zip(res.keys, res.proba, res.flags)]}, indent=2))
        return
    print(f"{len(res.keys)} sessions ({res.kind}), {int(res.flags.sum())} flagged anomalous")
    c = res.cost
    print(f"scored in {c['seconds']:.2f} s ({c['seconds_per_session'] * 1e3:.1f} ms per session, batched); "
          f"peak RSS {c['peak_rss_bytes'] / 2**20:.0f} MiB, model included")
    if res.metrics:
        m = res.metrics
        print(f"F1 {m['f1']:.4f}  precision {m['precision']:.4f}  recall {m['recall']:.4f}")
    else:
        for k, p, f in list(zip(res.keys, res.proba, res.flags))[:50]:
            print(f"{k}\t{p:.3f}\t{'ANOMALY' if f else 'normal'}")
