"""The FedDALE study: one-shot and few-shot teachers, the paper's baselines and ablations, over seeds.

    rows = study_seed(cfg, seed=0, fewshot_rounds=1, ablations=True)   # one dict per (mode, variant) + baselines
    table = summarise(rows)                                              # mean ± sd over seeds per row name
    sizes = message_sizes(["tiny", "SmolLM2-135M-Instruct"])             # Table 1: bytes per message per model

Per seed, teachers are trained and score the public set once per mode (lowres.anomaly.pipeline's stages):
one-shot teachers alone; the FedAvg-over-teachers baseline, whose round-``fewshot_rounds`` global is the
few-shot teacher; then every variant only retrains the student on the same scores. Variants (on the one-shot
scores): aggregation max, score kind accuracy / max_loss, k scaled ×0.5 and ×1.25, no filtering (every public
session labelled by threshold), the larger student. Baselines: FedAvg of the teachers (detector: the global
teacher + threshold) and FedAvg of the student-sized classifier supervised with the clients' labels.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from lowres.anomaly.pipeline import AnomalyConfig

# what the reference (FedDALE) reports, quoted beside lowres' figures
REFERENCE = {"message_mb": {"FedAvg-135M": 1.77, "FedAvg-1.7B": 6.01, "student score upload": 0.002},
             "comm_reduction_pct": 82.0, "latency_reduction_pct": 71.0}

K_SCALES = (0.5, 1.25)


def variants(cfg: AnomalyConfig, ablations: bool) -> dict[str, dict]:
    """Row name → Variant changes, on the one-shot scores (the main row first)."""
    out: dict[str, dict] = {"student (one-shot)": {}}
    if not ablations:
        return out
    out["aggregate=max"] = {"aggregate": "max"}
    for kind in ("accuracy", "max_loss"):
        if kind != cfg.score:
            out[f"score={kind}"] = {"score": kind}
    if cfg.score != "loss":
        out["score=loss"] = {"score": "loss"}
    for s in K_SCALES:
        kn, ka = max(1, round(cfg.k_normal * s)), max(1, round(cfg.k_anomalous * s))
        if kn + ka <= cfg.n_public:
            out[f"k x{s:g} ({kn}/{ka})"] = {"k_normal": kn, "k_anomalous": ka}
    out["no filtering (threshold)"] = {"selection": "threshold"}
    other = "tiny" if cfg.student_size == "small" else "small"
    out[f"student_size={other}"] = {"student_size": other}
    return out


def study_seed(cfg: AnomalyConfig, seed: int, fewshot_rounds: int = 1, ablations: bool = True,
               say=print) -> list[dict[str, Any]]:
    """Every row of the study for one seed: a dict with ``row``, ``mode`` and its figures (F1, precision,
    recall, AUROC, bytes per client, latency per session where measured)."""
    from lowres.anomaly.pipeline import (Variant, fedavg_student_baseline, fedavg_teacher_baseline, fewshot_scores,
                                         measure_inference, oneshot_scores, prepare_run, teacher_detection,
                                         train_student_on)
    from lowres.anomaly.scoring import score_sessions
    from lowres.anomaly.student import predict_proba
    from lowres.federated.client import clear_cache

    cfg = cfg.model_copy(update={"seed": seed, "output_dir": str(Path(cfg.output_dir) / f"seed-{seed}"),
                                 "teacher_rounds": 0})
    t0 = time.perf_counter()
    out, data = prepare_run(cfg, say)
    rows: list[dict[str, Any]] = []
    say(f"seed {seed}: one-shot teachers ...")
    ts1, teachers = oneshot_scores(cfg, data, out, say)
    d = teacher_detection(cfg, data, ts1, teachers[0])
    rows.append({"row": "one-shot teacher + threshold", "mode": "one-shot", "detector": "teacher", "f1": d["f1"],
                 "precision": d["precision"], "recall": d["recall"], "auroc": d["auroc"], "bytes_per_client": 0.0})
    del teachers
    clear_cache()
    say(f"seed {seed}: FedAvg over the teachers, {cfg.fedavg_rounds} rounds ...")
    base = fedavg_teacher_baseline(cfg, data, out, say=say)
    b = base.figures
    fedavg_row = {"detector": "teacher",
                  "row": f"FedAvg teachers ({cfg.fedavg_rounds} round{'s' if cfg.fedavg_rounds > 1 else ''}) + threshold",
                  "mode": "baseline",
                  "f1": b["f1_fedavg"], "precision": b["precision_fedavg"], "recall": b["recall_fedavg"],
                  "auroc": b["auroc_fedavg"], "bytes_per_client": b["fedavg_bytes_per_client"],
                  "message_bytes": b["fedavg_bytes_up_per_client_round"]}
    rows.append(fedavg_row)
    say(f"seed {seed}: few-shot teacher ({fewshot_rounds} rounds) scores ...")
    ts_n = fewshot_scores(cfg, data, out, fewshot_rounds, base, say)

    def student_row(name: str, mode: str, ts, changes: dict, save: bool = False):
        say(f"seed {seed}: student — {name} ...")
        student, fig = train_student_on(cfg, data, ts, Variant.of(cfg, **changes),
                                        save_to=out / "student" if save else None)
        rows.append({"row": name, "mode": mode, "detector": "student", "f1": fig["f1_student"],
                     "precision": fig["precision_student"],
                     "recall": fig["recall_student"], "auroc": fig["auroc_student"],
                     "f1_novel": fig["f1_student_novel"], "bytes_per_client": fig["method_bytes_per_client"],
                     "pseudo_normal_purity": fig["pseudo_normal_purity"],
                     "pseudo_anomalous_purity": fig["pseudo_anomalous_purity"],
                     "pseudo_labels": fig["pseudo_normal"] + fig["pseudo_anomalous"],
                     "message_bytes": fig["method_bytes_up_per_client"],
                     "student_message_bytes": fig["method_bytes_down_per_client"]})
        return student

    main = None
    for name, changes in variants(cfg, ablations).items():
        s = student_row(name, "one-shot", ts1, changes, save=not changes)
        main = main or s
    student_row(f"student (few-shot, {fewshot_rounds} round{'s' if fewshot_rounds > 1 else ''})", "few-shot",
                ts_n, {})
    if cfg.student_fedavg_rounds:
        say(f"seed {seed}: FedAvg of the student-sized classifier, supervised ...")
        _, fs = fedavg_student_baseline(cfg, data, ts1.tokenizer, say=say)
        rows.append({"row": f"FedAvg student-sized, supervised ({cfg.student_fedavg_rounds} round"
                            f"{'s' if cfg.student_fedavg_rounds > 1 else ''})",
                     "mode": "baseline", "f1": fs["f1_fedavg_student"], "precision": fs["precision_fedavg_student"],
                     "recall": fs["recall_fedavg_student"], "auroc": fs["auroc_fedavg_student"],
                     "bytes_per_client": fs["fedavg_student_bytes_per_client"]})
    sample = data["test"][:cfg.latency_samples]
    say(f"seed {seed}: inference, {len(sample)} sessions one at a time: FedAvg teacher vs student ...")
    teacher = base.teachers[0]
    teach = measure_inference(lambda x: score_sessions(teacher, x, batch_size=1, window=cfg.score_length), sample)
    stud = measure_inference(lambda x: predict_proba(main, x, batch_size=1), sample)
    for r in rows:  # the trained students share one size, the teachers too (the supervised baseline: not timed)
        if r.get("detector"):
            r["latency_s"] = (stud if r["detector"] == "student" else teach)["latency_s"]
    clear_cache()
    for r in rows:
        r["seed"] = seed
    say(f"seed {seed}: done in {time.perf_counter() - t0:.0f} s")
    return rows


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs if x is not None and np.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the same name (and teacher model) over seeds → mean and sd of every figure, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("teachers", ""), r["row"], r["mode"]), []).append(r)
    out = []
    for (teachers, name, mode), rs in groups.items():
        s: dict[str, Any] = {"teachers": teachers, "row": name, "mode": mode, "seeds": len(rs)}
        for key in ("f1", "precision", "recall", "auroc", "f1_novel", "bytes_per_client", "latency_s",
                    "pseudo_normal_purity", "pseudo_anomalous_purity", "message_bytes", "student_message_bytes"):
            if any(key in r for r in rs):
                s[key], s[key + "_sd"] = _mean_sd([r.get(key) for r in rs])
        out.append(s)
    return out


def message_sizes(models: list[str], rank: int = 8, targets: str | None = None) -> dict[str, float]:
    """Table 1 from serialised payloads: bytes of one message carrying a rank-``rank`` LoRA adapter of each
    model (the teachers' LoRA targets unless ``targets``), through lowres' uncompressed codec — what a FedAvg
    round sends each way per client. Each model is built as lowres trains it, in fp32 (adapters travel as
    float32 whatever the training precision)."""
    from lowres.anomaly.scoring import tensors_bytes
    from lowres.config import load_config
    from lowres.federated.client import lora_tensors
    from lowres.models import load_model, locate_weights, resolve_precision

    out = {}
    for m in models:
        cfg = load_config(None, [f"model.name={m}", f"lora.rank={rank}", "precision.compute=fp32"]
                          + ([f"lora.targets={targets}"] if targets else []))
        model, _ = load_model(locate_weights(cfg.model), resolve_precision(cfg.precision), cfg.lora)
        out[m] = float(tensors_bytes(lora_tensors(model)))
        del model
    return out
