"""Federated log anomaly detection on HDFS: the student vs its teacher vs a teachers-only FedAvg baseline.

One run of lowres.anomaly.pipeline on the shipped sessions (lowres/anomaly/data): `tiny` teachers trained
one-shot on normal sessions split over 3 clients, scores of a public unlabelled set up, top/bottom-k
pseudo-labels, a small student classifier (hidden 64, 2 layers, LoRA + head) down — beside FedAvg over the
teachers' adapters for a few rounds. F1 on a balanced held-out split; every threshold is set without test
labels (teachers: a low quantile of the score — mean next-token loss by default — on held-out normal sessions
of the training file; student:
P(anomaly) >= 0.5).

    python bench/anomaly_hdfs.py --quick     # fewer steps and sessions
    python bench/anomaly_hdfs.py             # configs/anomaly/hdfs-tiny.yaml as is

Bytes are exact serialised Flower message contents (scores and adapters alike, the same counting as
`lowres fed`), per client: the method's scores up + student down once, vs the baseline's adapters both ways
summed over its rounds. Latency: median per session, one at a time, the baseline's detector (a `tiny`
teacher) vs the student, interleaved in one process. Training is one seed: F1 figures are those of one run.

Last line: ``RESULT f1_student=… f1_teacher=… f1_fedavg=… comm_ratio=… latency_ratio=…`` (ratios
student/method over baseline; below 1 is better).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
QUICK = ["teacher_steps=60", "fedavg_local_steps=20", "max_length=128", "n_normal_train=1200", "n_public=500",
         "n_test=400", "k_normal=300", "k_anomalous=125", "student_steps=300", "latency_samples=24"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and sessions (" + " ".join(QUICK) + ")")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    from lowres.anomaly.pipeline import load_anomaly_config, run_pipeline

    with tempfile.TemporaryDirectory(prefix="anomaly-bench-") as tmp:
        overrides = (QUICK if args.quick else []) + [f"output_dir={tmp}"] + args.overrides
        if args.no_mlflow:
            overrides.append("mlflow=false")
        cfg = load_anomaly_config(REPO / "configs/anomaly/hdfs-tiny.yaml", overrides)
        print(f"anomaly_hdfs: {cfg.clients} clients, tiny teachers ({cfg.teacher_steps} one-shot steps), FedAvg "
              f"baseline {cfg.fedavg_rounds} x {cfg.fedavg_local_steps} steps, student {cfg.student_size}", flush=True)
        r = run_pipeline(cfg, say=lambda s: print("  " + s, flush=True))

    print()
    print(f"{'detector':<34} {'F1':>6} {'precision':>9} {'recall':>7} {'AUROC':>6}")
    for name, key in (("student (pseudo-labels)", "student"), ("one-shot teacher + threshold", "teacher"),
                      ("FedAvg teacher + threshold", "fedavg")):
        print(f"{name:<34} {r['f1_' + key]:6.3f} {r['precision_' + key]:9.3f} {r['recall_' + key]:7.3f} "
              f"{r['auroc_' + key]:6.3f}")
    print(f"{'student, test sequences not in public':<34} {r['f1_student_novel']:6.3f} "
          f"{r['precision_student_novel']:9.3f} {r['recall_student_novel']:7.3f}          "
          f"({r['test_novel_fraction']:.0%} of the test set, {r['test_novel_anomalous']:.0f} anomalous: the rest "
          "repeat a public session's exact sequence)")
    print(f"\nbytes per client: method {r['method_bytes_up_per_client'] / 1e3:.1f} kB up (scores) + "
          f"{r['method_bytes_down_per_client'] / 1e3:.1f} kB down (student) = {r['method_bytes_per_client'] / 1e3:.1f} kB; "
          f"FedAvg {r['fedavg_bytes_up_per_client_round'] / 1e3:.1f} kB up + "
          f"{r['fedavg_bytes_down_per_client_round'] / 1e3:.1f} kB down per round x {cfg.fedavg_rounds}, + the final "
          f"global down = {r['fedavg_bytes_per_client'] / 1e3:.1f} kB -> ratio {r['comm_ratio']:.3f}")
    print(f"inference per session: student {r['student_latency_s'] * 1e3:.2f} ms vs teacher "
          f"{r['teacher_latency_s'] * 1e3:.2f} ms -> ratio {r['latency_ratio']:.3f}; weights "
          f"{r['student_param_bytes'] / 1e6:.2f} MB vs {r['teacher_param_bytes'] / 1e6:.2f} MB; peak RSS rise "
          f"{r['student_peak_rss_delta_bytes'] / 1e6:.1f} MB vs {r['teacher_peak_rss_delta_bytes'] / 1e6:.1f} MB")
    goal = "met" if r["f1_student"] >= 0.9 else "NOT met"
    print(f"pseudo-label purity: normal {r['pseudo_normal_purity']:.1%}, anomalous {r['pseudo_anomalous_purity']:.1%}"
          f" (aggregated teacher scores separate the public set with AUROC {r['auroc_public_aggregate']:.3f});"
          f" student F1 goal 0.9 {goal}; total {r['total_seconds']:.0f} s"
          + (f"; MLflow run {r['mlflow_run_id']}" if r.get("mlflow_run_id") else ""))
    print(f"RESULT f1_student={r['f1_student']:.4f} f1_teacher={r['f1_teacher']:.4f} f1_fedavg={r['f1_fedavg']:.4f} "
          f"comm_ratio={r['comm_ratio']:.4f} latency_ratio={r['latency_ratio']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
