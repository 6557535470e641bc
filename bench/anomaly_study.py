"""The FedDALE study on real HDFS sessions: one-shot and few-shot students, the paper's baselines, ablations.

For each teacher model (``tiny``, random init, and SmolLM2-135M-Instruct, pretrained) and each seed
(lowres.anomaly.study): teachers train one-shot (alone) and few-shot (``--fewshot-rounds`` FedAvg rounds, its
global teacher) and score the public set; the student is trained on their pseudo-labels; ablations retrain only the
student (aggregation max, score kind, k ×0.5/×1.25, no filtering, the larger student); baselines are FedAvg over
the teachers (global teacher + threshold) and FedAvg of the student-sized classifier supervised with the clients'
labels. Every threshold is set without test labels. Bytes are exact serialised message contents per client,
everything a method sends (few-shot: its FedAvg rounds too; every FedAvg: the final model down as well).
Latency: median per session, one at a time, the FedAvg teacher vs the student, in one process.

    python bench/anomaly_study.py --quick              # tiny teachers, fewer sessions and steps, 3 seeds
    python bench/anomaly_study.py                       # tiny (3 seeds) and SmolLM2-135M teachers
    python bench/anomaly_study.py --teachers tiny --seeds 5 --no-ablations

Seeds can run in separate processes (one core each) and be summarised together:

    python bench/anomaly_study.py --teachers smollm2 --seed-list 1 --threads 1 --json s1.json   # one per seed
    python bench/anomaly_study.py --merge s0.json --merge s1.json --merge s2.json              # runs nothing

Prints the table (row × teacher model × mode: F1 mean ± sd over seeds, bytes per client, latency per session),
Table 1 (bytes per message per model beside the reference's) and ends with ``RESULT f1_oneshot=…
f1_fewshot=… f1_fedavg_student=… comm_reduction_pct=… latency_reduction_pct=… seeds=…`` (the first teacher
model's figures, means over seeds; the other models' under suffixed keys).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": "configs/anomaly/hdfs-tiny.yaml", "smollm2": "configs/anomaly/hdfs-smollm2.yaml"}
MODEL_NAMES = {"tiny": "tiny", "smollm2": "SmolLM2-135M-Instruct"}
QUICK = {"tiny": ["teacher_steps=60", "fedavg_local_steps=20", "max_length=128", "n_normal_train=1200",
                  "n_public=500", "n_test=400", "k_normal=300", "k_anomalous=125", "student_steps=200",
                  "latency_samples=16", "n_calib=150", "student_fedavg_local_steps=40", "n_client_labeled=150"],
         "smollm2": ["n_public=200", "n_test=100", "k_normal=120", "k_anomalous=45", "n_calib=60",
                     "latency_samples=8", "student_steps=200"]}


def _fmt(mean: float, sd: float, digits: int = 3) -> str:
    if mean != mean:  # NaN
        return "—"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _kb(x: float) -> str:
    if x != x or x == 0:
        return "—"
    return f"{x / 1e6:.2f} MB" if x >= 1e6 else f"{x / 1e3:.1f} kB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny teachers only, fewer sessions and steps")
    ap.add_argument("--teachers", default=None, help="comma-separated teacher models: tiny, smollm2 (default: both; "
                    "tiny with --quick)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per teacher model (default 3)")
    ap.add_argument("--smollm2-seeds", type=int, default=None, help="seeds for SmolLM2 teachers (default: --seeds)")
    ap.add_argument("--seed-list", default=None, metavar="S,S,...",
                    help="run exactly these seeds (e.g. 1 or 0,2) instead of 0 .. --seeds-1, for every teacher model")
    ap.add_argument("--merge", action="append", default=[], metavar="FILE.json",
                    help="summarise the rows of earlier --json outputs (repeatable) instead of running anything")
    ap.add_argument("--fewshot-rounds", type=int, default=1, help="FedAvg rounds before few-shot scoring (default 1)")
    ap.add_argument("--no-ablations", action="store_true", help="main rows and baselines only")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override an anomaly-config field for every teacher model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for everything (teachers, scoring, "
                    "student); 1 when two studies run side by side on 2 cores (default: the configs' own)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write every row and the summary here")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.fewshot_rounds < 1:
        ap.error(f"--seeds and --fewshot-rounds must be >= 1 (got {args.seeds} and {args.fewshot_rounds})")
    seed_list = None
    if args.seed_list is not None:
        try:
            seed_list = [int(x) for x in args.seed_list.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--seed-list: {args.seed_list!r} is not a comma-separated list of integers (e.g. 0,2)")
        if not seed_list or min(seed_list) < 0 or len(set(seed_list)) != len(seed_list):
            ap.error(f"--seed-list: {args.seed_list!r}: give distinct seeds >= 0 (e.g. 0,2)")
    merged, merged_cfgs = [], {}
    for f in args.merge:
        try:
            d = json.loads(Path(f).read_text())
            merged += d["rows"]
            merged_cfgs.update(d.get("configs", {}))
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--merge {f}: not an anomaly_study --json output ({type(e).__name__}: {e})")
    if args.merge:
        seen = {}
        for r in merged:
            key = (r["teachers"], r["row"], r["seed"])
            if key in seen:
                ap.error(f"--merge: {r['teachers']} seed {r['seed']} row {r['row']!r} appears twice; merge each seed once")
            seen[key] = r
        missing = {r["teachers"] for r in merged} - set(merged_cfgs)
        if missing:
            ap.error(f"--merge: no configs recorded for {sorted(missing)} (JSON from an older bench); rerun those seeds")
    names = [t.strip() for t in (args.teachers or ("tiny" if args.quick else "tiny,smollm2")).split(",") if t.strip()]
    if args.merge:
        names = list(dict.fromkeys(r["teachers"] for r in merged))
    bad = [t for t in names if t not in CONFIGS]
    if bad:
        ap.error(f"--teachers: unknown {bad}; use tiny and/or smollm2")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    from lowres.anomaly.pipeline import load_anomaly_config
    from lowres.anomaly.study import REFERENCE, message_sizes, study_seed, summarise
    from lowres.hardware import detect

    hw = detect()
    threads = []
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        threads = [f"fed_overrides=[run.train.threads={args.threads}]"]
    print(f"anomaly_study: teachers {', '.join(names)}; seeds {args.seeds}; few-shot {args.fewshot_rounds} "
          f"round(s); CPU {hw.cpu.model} ({hw.tier}, fingerprint {hw.fingerprint}); load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    rows, cfgs = list(merged), {}
    with tempfile.TemporaryDirectory(prefix="anomaly-study-") as tmp:
        for name in ([] if args.merge else names):
            overrides = ((QUICK[name] if args.quick else []) + threads + args.overrides
                         + [f"output_dir={tmp}/{name}", "mlflow=false"])
            cfg = cfgs[name] = load_anomaly_config(REPO / CONFIGS[name], overrides)
            seeds = args.smollm2_seeds if name == "smollm2" and args.smollm2_seeds else args.seeds
            for seed in (seed_list if seed_list is not None else range(seeds)):
                got = study_seed(cfg, seed, args.fewshot_rounds, not args.no_ablations,
                                 say=lambda s: print(f"  [{time.perf_counter() - t0:6.0f} s] {name}: {s}", flush=True))
                rows += [{**r, "teachers": name} for r in got]
                print(f"  {name} seed {seed}: " + "; ".join(f"{r['row']} F1 {r['f1']:.3f}" for r in got), flush=True)
    cfg_info = {n: {"n_public": c.n_public, "student_size": c.student_size} for n, c in cfgs.items()} or merged_cfgs
    table = summarise(rows)

    print("\n| teachers | row | mode | F1 (mean ± sd) | precision | recall | AUROC | bytes / client | "
          "latency / session | seeds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in table:
        lat = s.get("latency_s", float("nan"))
        print(f"| {s['teachers']} | {s['row']} | {s['mode']} | {_fmt(s['f1'], s['f1_sd'])} | "
              f"{s['precision']:.3f} | {s['recall']:.3f} | {s['auroc']:.3f} | {_kb(s['bytes_per_client'])} | "
              f"{'—' if lat != lat else f'{lat * 1e3:.1f} ms'} | {s['seeds']} |")

    # Table 1: bytes per message, from serialised payloads
    measured = message_sizes([MODEL_NAMES[n] for n in ("tiny", "smollm2")])
    score_up = {n: next(s["message_bytes"] for s in table if s["teachers"] == n and s["row"] == "student (one-shot)")
                for n in names}
    student_down = {n: next(s["student_message_bytes"] for s in table
                            if s["teachers"] == n and s["row"] == "student (one-shot)") for n in names}
    print("\nTable 1 — one message, per client (lowres: exact serialised bytes, rank-8 LoRA on attention + MLP, fp32)")
    print("| message | lowres | reference (FedDALE) |")
    print("|---|---|---|")
    print(f"| FedAvg round, `tiny` teacher adapter (4 M params) | {_kb(measured['tiny'])} | — |")
    print(f"| FedAvg round, SmolLM2-135M teacher adapter | {_kb(measured['SmolLM2-135M-Instruct'])} | "
          f"{REFERENCE['message_mb']['FedAvg-135M']} MB (FedAvg-135M) |")
    print(f"| FedAvg round, 1.7B teacher | — (not run here) | {REFERENCE['message_mb']['FedAvg-1.7B']} MB |")
    for n in names:
        cfg = cfg_info[n]
        print(f"| scores up, {cfg['n_public']} public sessions ({n} teachers) | {_kb(score_up[n])} | "
              f"{REFERENCE['message_mb']['student score upload']} MB |")
        print(f"| student down (adapter + head, {cfg['student_size']}, {n} tokenizer) | {_kb(student_down[n])} | — |")

    result, keys = {}, []
    for i, n in enumerate(names):
        suffix = "" if i == 0 else f"_{n}"
        get = {s["row"]: s for s in table if s["teachers"] == n}
        one = get["student (one-shot)"]
        few = next(s for k, s in get.items() if k.startswith("student (few-shot"))
        fav = next(s for k, s in get.items() if k.startswith("FedAvg teachers"))
        fst = next((s for k, s in get.items() if k.startswith("FedAvg student")), None)
        result[f"f1_oneshot{suffix}"] = one["f1"]
        result[f"f1_oneshot_sd{suffix}"] = one["f1_sd"]
        result[f"f1_fewshot{suffix}"] = few["f1"]
        result[f"f1_fewshot_sd{suffix}"] = few["f1_sd"]
        result[f"f1_fedavg_student{suffix}"] = fst["f1"] if fst else float("nan")
        result[f"f1_fedavg_teachers{suffix}"] = fav["f1"]
        result[f"comm_reduction_pct{suffix}"] = 100 * (1 - one["bytes_per_client"] / fav["bytes_per_client"])
        result[f"comm_reduction_fewshot_pct{suffix}"] = 100 * (1 - few["bytes_per_client"] / fav["bytes_per_client"])
        result[f"latency_reduction_pct{suffix}"] = 100 * (1 - one["latency_s"] / fav["latency_s"])
        result[f"seeds{suffix}"] = one["seeds"]
        keys.append(n)
    first = names[0]
    goals = (result["f1_oneshot"] >= 0.9 and result["f1_fewshot"] >= 0.9
             and result["comm_reduction_pct"] >= REFERENCE["comm_reduction_pct"]
             and result["latency_reduction_pct"] >= REFERENCE["latency_reduction_pct"])
    print(f"\n{first} teachers: goals (student F1 >= 0.9 one-shot and few-shot, communication >= "
          f"{REFERENCE['comm_reduction_pct']:g} % and latency >= {REFERENCE['latency_reduction_pct']:g} % less than "
          f"FedAvg) {'met' if goals else 'NOT met'}; {time.perf_counter() - t0:.0f} s in all, load "
          f"{os.getloadavg()[0]:.1f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "summary": table, "message_sizes": measured,
                                                   "result": result, "cpu": hw.cpu.model, "tier": hw.tier,
                                                   "configs": cfg_info},
                                                  indent=1, default=float))
    core = ("f1_oneshot", "f1_fewshot", "f1_fedavg_student", "comm_reduction_pct", "latency_reduction_pct")
    line = " ".join(f"{k}={result[k]:.4f}" if "pct" not in k else f"{k}={result[k]:.1f}" for k in core)
    line += f" seeds={result['seeds']}"
    for n in names[1:]:
        line += " " + " ".join(f"{k}_{n}={result[f'{k}_{n}']:.4f}" if "pct" not in k else
                               f"{k}_{n}={result[f'{k}_{n}']:.1f}" for k in core) + f" seeds_{n}={result[f'seeds_{n}']}"
    print(f"RESULT {line} isa={hw.tier}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
