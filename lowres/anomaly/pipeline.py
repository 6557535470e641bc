"""The whole method on the shipped HDFS sessions, next to the teachers-only FedAvg baseline.

    cfg = load_anomaly_config("configs/anomaly/hdfs-tiny.yaml", ["k_normal=100"])
    report = run_pipeline(cfg)          # dict of figures; the student saved in cfg.output_dir/student

Data (all from lowres/anomaly/data, rendered through the templates):
    teachers' data  normal training sessions (hdfs_train_normal_sessions), split IID across clients
    public set      unlabelled sessions from the labelled file (labels hidden; ``public_anomaly_fraction``)
    test set        a balanced held-out split of the labelled file, disjoint (by row) from the public set

Method (one-shot): each client trains a teacher alone → scores the public set (accuracy, mean and max token
loss per session, each session framed by EOS as in training so its end is judged too: the only upload) → the
server aggregates, takes top-k / bottom-k as pseudo-labels and trains the student → the student (adapter +
head) goes down. Baseline: ``fedavg_rounds`` rounds of FedAvg over the teachers'
adapters (both ways each round), its detector the global teacher with a threshold on ``score``. Every threshold
is chosen without test labels: the ``threshold_quantile`` of the teacher's score on normal sessions from
the training file that no teacher trained on (the student's is 0.5 on its own probability).
"""

from __future__ import annotations

import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from lowres.anomaly.preprocess import read_id_sessions, read_labeled_sessions, read_templates, render_ids
from lowres.anomaly.scoring import (SCORES, aggregate_scores, auroc, normality, prf, score_sessions, scores_bytes,
                                    select_pseudo_labels, tensors_bytes, threshold_from_normal)


class AnomalyConfig(BaseModel):
    """One pipeline run (configs/anomaly/*.yaml); every field can be overridden with ``key=value``."""

    model_config = ConfigDict(extra="forbid")
    output_dir: str = "runs/anomaly/hdfs-tiny"
    fed_config: str | None = Field(None, description="the teachers' federation YAML (default "
                                   "configs/anomaly/teachers-fed.yaml)")
    clients: int = Field(3, ge=1)
    teacher_steps: int = Field(150, ge=1, description="one-shot local steps per teacher")
    fedavg_rounds: int = Field(3, ge=1, description="rounds of the teachers-only FedAvg baseline")
    fedavg_local_steps: int = Field(50, ge=1)
    max_length: int = Field(256, ge=16, description="the teachers' training window (packed session text)")
    score_length: int | None = Field(None, ge=16, description="the window sessions are scored in (default "
                                     "max_length); longer sessions are scored in sliding windows. A pretrained "
                                     "teacher reads past its training window: a whole session at once is "
                                     "scored with all its context, at about half the compute of half-overlapping "
                                     "windows")
    n_normal_train: int = Field(2400, ge=10, description="normal sessions the teachers train on, all clients")
    n_public: int = Field(1000, ge=4)
    public_anomaly_fraction: float = Field(0.3, ge=0, le=1)
    n_test: int = Field(1000, ge=4, description="balanced: half normal, half anomalous")
    k_normal: int = Field(600, ge=1)
    k_anomalous: int = Field(250, ge=1)
    aggregate: str = Field("mean", pattern="^(mean|max)$")
    score: str = Field("loss", pattern="^(" + "|".join(SCORES) + ")$",
                       description="what ranks sessions: accuracy, loss (mean) or max_loss (losses negated)")
    threshold_quantile: float = Field(0.01, ge=0, le=0.5)
    student_size: str = "small"
    student_max_length: int = Field(512, ge=16, description="tokens of a session the student reads (longer ones "
                                    "are cut): whole sessions, so a session's end is seen")
    student_steps: int = Field(300, ge=1)
    latency_samples: int = Field(48, ge=1)
    seed: int = 0
    mlflow: bool = True
    experiment: str = "lowres-anomaly"
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                     "lowres' local store)")


def load_anomaly_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AnomalyConfig:
    """The pipeline's config: YAML (if given), then ``key=value`` overrides; ConfigError (exit 2) naming every
    bad field, and UsageError for an output folder that cannot be written — all before any work."""
    from pydantic import ValidationError

    from lowres.config import _format_errors, parse_override, read_yaml_mapping
    from lowres.errors import ConfigError
    from lowres.locks import check_output_dir

    data: dict[str, Any] = read_yaml_mapping(path, "anomaly config", "give a YAML file, e.g. "
                                             "configs/anomaly/hdfs-tiny.yaml") if path else {}
    for item in overrides or []:
        key, value = parse_override(item)
        data[key] = value
    try:
        cfg = AnomalyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("the anomaly config" + (f" in {path}" if path else "") + " is not valid",
                          _format_errors(exc)) from None
    check_output_dir(cfg.output_dir)
    return cfg


def split_data(cfg: AnomalyConfig) -> dict[str, Any]:
    """Rendered texts: teachers' normal sessions, the public set (+ hidden labels), the balanced test set."""
    templates = read_templates()
    rng = np.random.default_rng(cfg.seed)
    normal_ids = read_id_sessions()
    perm = rng.permutation(len(normal_ids))
    if cfg.n_normal_train >= len(perm):
        raise ValueError(f"n_normal_train={cfg.n_normal_train}: the file has {len(perm)} normal sessions and "
                         "some must stay out of training to set thresholds")
    train = [render_ids(normal_ids[i], templates) for i in perm[:cfg.n_normal_train]]
    # normal sessions no teacher trained on: thresholds are set on these (no test label is ever used)
    calib = [render_ids(normal_ids[i], templates) for i in perm[cfg.n_normal_train:cfg.n_normal_train + 300]]
    rows = read_labeled_sessions()
    y = np.array([r[1] for r in rows])
    pos, neg = rng.permutation(np.flatnonzero(y == 1)), rng.permutation(np.flatnonzero(y == 0))
    half = cfg.n_test // 2
    n_pub_pos = int(round(cfg.n_public * cfg.public_anomaly_fraction))
    need_pos, need_neg = half + n_pub_pos, half + cfg.n_public - n_pub_pos
    if need_pos > len(pos) or need_neg > len(neg):
        raise ValueError(f"test + public sets need {need_pos} anomalous and {need_neg} normal sessions; the file "
                         f"has {len(pos)} and {len(neg)}")
    test_idx = np.concatenate([pos[:half], neg[:half]])
    pub_idx = rng.permutation(np.concatenate([pos[half:need_pos], neg[half:need_neg]]))
    text = lambda idx: [render_ids(rows[i][0], templates) for i in idx]  # noqa: E731
    return {"train": train, "calib": calib, "public": text(pub_idx), "public_y": y[pub_idx],
            "test": text(test_idx), "test_y": y[test_idx], "test_ids": [rows[i][0] for i in test_idx]}


def write_sessions_csv(path: Path, sessions: list[list[str]], labels) -> Path:
    """A ``Sequence,label`` CSV in the shipped file's form (event ids E1..E30), which `lowres anomaly detect`
    reads back."""
    lines = ["Sequence,label"] + [f"{' '.join(ids)},{int(y)}" for ids, y in zip(sessions, labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _threshold_detector(teacher, train_texts: list[str], test: list[str],
                        cfg: AnomalyConfig) -> tuple[np.ndarray, float, np.ndarray]:
    """(flags (1 = anomaly) for ``test`` by the teacher's score below a threshold set on normal training data,
    the threshold, the test scores)."""
    thr = threshold_from_normal(normality(score_sessions(teacher, train_texts, window=cfg.score_length), cfg.score),
                                cfg.threshold_quantile)
    score = normality(score_sessions(teacher, test, window=cfg.score_length), cfg.score)
    return (score < thr).astype(int), thr, score


def measure_inference(fn, texts: list[str]) -> dict[str, float]:
    """Per-sample latency (median over one-at-a-time calls, first call dropped as warm-up) and the peak RSS
    rise above the pre-call level, sampled every 20 ms by a thread (what inference adds to a loaded model)."""
    import psutil

    proc = psutil.Process()
    fn(texts[:1])
    base, peak, stop = proc.memory_info().rss, [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)  # coarse on purpose: a busy sampler would hold the GIL and inflate latency

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    times = []
    for t in texts:
        t0 = time.perf_counter()
        fn([t])
        times.append(time.perf_counter() - t0)
    stop.set()
    th.join()
    return {"latency_s": statistics.median(times), "latency_spread_s": float(np.percentile(times, 90) - np.percentile(times, 10)),
            "peak_rss_delta_bytes": float(max(0, peak[0] - base))}


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_pipeline(cfg: AnomalyConfig, say=print) -> dict[str, Any]:
    """Run method and baseline; return every figure (also logged to MLflow when ``cfg.mlflow``)."""
    from lowres.anomaly.student import build_student, predict_proba, save_student, student_tensors, train_student
    from lowres.anomaly.teachers import (prepare_teachers, teacher_fed_config, train_fedavg_teachers,
                                         train_local_teachers)
    from lowres.federated.client import clear_cache

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A rerun in the same folder starts afresh: a federation folder left by an earlier run would be resumed
    # from its last global adapter (lowres fed's restart behaviour), its rounds done, and no teacher trained.
    for sub in ("teachers", "fedavg"):
        if (out / sub).exists():
            say(f"note: replacing {out / sub} from an earlier run")
            shutil.rmtree(out / sub)
    t_start = time.perf_counter()
    data = split_data(cfg)
    normal_txt = out / "normal_sessions.txt"
    normal_txt.write_text("\n".join(data["train"]) + "\n")
    # the held-out split, so `lowres anomaly detect test_sessions.csv --model <out>/student` repeats the F1
    write_sessions_csv(out / "test_sessions.csv", data["test_ids"], data["test_y"])
    say(f"data: {len(data['train'])} normal training sessions over {cfg.clients} clients, public set "
        f"{len(data['public'])} ({int(data['public_y'].sum())} anomalous, labels hidden), test "
        f"{len(data['test'])} balanced")
    extra = [f"run.data.max_length={cfg.max_length}", f"run.train.seed={cfg.seed}", f"partition.seed={cfg.seed}"]
    r: dict[str, Any] = {}

    # --- method: one-shot teachers → scores up → pseudo-labels → student down --------------------------------
    t0 = time.perf_counter()
    fed = teacher_fed_config(normal_txt, out / "teachers", cfg.clients, cfg.fedavg_rounds, cfg.fedavg_local_steps,
                             cfg.fed_config, extra)
    say(f"[1/5] teachers: {cfg.clients} one-shot x {cfg.teacher_steps} steps of {fed.run_config(0).model.name} ...")
    prep = prepare_teachers(fed)
    teachers = train_local_teachers(fed, prep, cfg.teacher_steps)
    r["teachers_seconds"] = time.perf_counter() - t0
    per_client, up_bytes = [], []
    for i, t in enumerate(teachers, 1):
        say(f"      scoring the {len(data['public'])} public sessions with teacher {i}/{len(teachers)} ...")
        scores = score_sessions(t, data["public"], window=cfg.score_length)
        up_bytes.append(scores_bytes(scores))
        per_client.append(normality(scores, cfg.score))
    agg = aggregate_scores(per_client, cfg.aggregate)
    n_idx, a_idx = select_pseudo_labels(agg, cfg.k_normal, cfg.k_anomalous)
    pub_y = data["public_y"]
    r["pseudo_normal_purity"] = float(1 - pub_y[n_idx].mean())
    r["pseudo_anomalous_purity"] = float(pub_y[a_idx].mean())
    say(f"teachers: {cfg.clients} one-shot x {cfg.teacher_steps} steps ({r['teachers_seconds']:.0f} s); pseudo-labels "
        f"top-{cfg.k_normal} normal ({r['pseudo_normal_purity']:.1%} truly normal), bottom-{cfg.k_anomalous} "
        f"anomalous ({r['pseudo_anomalous_purity']:.1%} truly anomalous)")

    # f1_teacher: client 0's one-shot teacher used directly, its threshold set on held-out normal sessions
    say(f"[2/5] teacher 1 as a detector: scoring {len(data['calib'])} held-out normal + {len(data['test'])} test "
        "sessions ...")
    flags, thr, score = _threshold_detector(teachers[0], data["calib"], data["test"], cfg)
    r["f1_teacher"], r["precision_teacher"], r["recall_teacher"] = prf(data["test_y"], flags)
    r["auroc_teacher"] = auroc(data["test_y"], score)
    r["auroc_public_aggregate"] = auroc(pub_y, agg)
    r["teacher_threshold"] = thr

    t0 = time.perf_counter()
    say(f"[3/5] student: {cfg.student_size}, {cfg.student_steps} steps on {len(n_idx) + len(a_idx)} pseudo-labelled "
        "sessions ...")
    texts = [data["public"][i] for i in np.concatenate([n_idx, a_idx])]
    labels = [0] * len(n_idx) + [1] * len(a_idx)
    student = build_student(teachers[0].tokenizer, cfg.student_size, cfg.student_max_length, cfg.seed)
    fig = train_student(student, texts, labels, cfg.student_steps, seed=cfg.seed)
    r["student_seconds"] = time.perf_counter() - t0
    down_student = tensors_bytes(student_tensors(student))
    save_student(student, out / "student")
    p = predict_proba(student, data["test"])
    r["f1_student"], r["precision_student"], r["recall_student"] = prf(data["test_y"], p >= 0.5)
    r["auroc_student"] = auroc(data["test_y"], -p)
    # HDFS sessions repeat: a test session may have the exact event sequence of a public one the student
    # trained on. The figures on the test sessions whose sequence it never saw show what is not memorised.
    seen = set(data["public"])
    novel = np.array([t not in seen for t in data["test"]])
    r["test_novel_fraction"] = float(novel.mean())
    r["test_novel_anomalous"] = float(data["test_y"][novel].sum())
    r["f1_student_novel"], r["precision_student_novel"], r["recall_student_novel"] = prf(
        data["test_y"][novel], (p >= 0.5)[novel])
    say(f"student: {cfg.student_size}, {cfg.student_steps} steps ({r['student_seconds']:.0f} s, loss "
        f"{fig['final_loss']:.3f}); saved to {out / 'student'}")
    r["method_bytes_up_per_client"] = float(np.mean(up_bytes))
    r["method_bytes_down_per_client"] = float(down_student)
    r["method_bytes_per_client"] = r["method_bytes_up_per_client"] + r["method_bytes_down_per_client"]

    # --- baseline: teachers-only FedAvg, adapters both ways every round ----------------------------------------
    t0 = time.perf_counter()
    say(f"[4/5] fedavg baseline: {cfg.fedavg_rounds} rounds x {cfg.fedavg_local_steps} local steps, then its "
        f"global teacher scores {len(data['calib'])} + {len(data['test'])} sessions ...")
    clear_cache()
    fed_b = teacher_fed_config(normal_txt, out / "fedavg", cfg.clients, cfg.fedavg_rounds, cfg.fedavg_local_steps,
                               cfg.fed_config, extra)
    fed_teachers, res = train_fedavg_teachers(fed_b)
    r["fedavg_seconds"] = time.perf_counter() - t0
    rounds = res.rounds
    r["fedavg_bytes_up_per_client_round"] = float(np.mean([x["bytes_up"] / x["clients_replied"] for x in rounds]))
    r["fedavg_bytes_down_per_client_round"] = float(np.mean([x["bytes_down"] / x["clients_sampled"] for x in rounds]))
    r["fedavg_bytes_per_client"] = float(sum((x["bytes_up"] + x["bytes_down"]) / x["clients_sampled"] for x in rounds))
    base_teacher = fed_teachers[0]
    flags, thr, score = _threshold_detector(base_teacher, data["calib"], data["test"], cfg)
    r["f1_fedavg"], r["precision_fedavg"], r["recall_fedavg"] = prf(data["test_y"], flags)
    r["auroc_fedavg"] = auroc(data["test_y"], score)
    r["fedavg_threshold"] = thr
    say(f"fedavg baseline: {cfg.fedavg_rounds} rounds x {cfg.fedavg_local_steps} local steps "
        f"({r['fedavg_seconds']:.0f} s)")

    # --- inference cost: the baseline's detector (a teacher) vs the student, the same sessions ----------------
    sample = data["test"][:cfg.latency_samples]
    say(f"[5/5] inference cost: {len(sample)} sessions one at a time through the teacher, then the student ...")
    teach = measure_inference(lambda x: score_sessions(base_teacher, x, batch_size=1, window=cfg.score_length),
                              sample)
    stud = measure_inference(lambda x: predict_proba(student, x, batch_size=1), sample)
    for k, v in teach.items():
        r[f"teacher_{k}"] = v
    for k, v in stud.items():
        r[f"student_{k}"] = v
    r["teacher_param_bytes"] = float(_param_bytes(base_teacher.model))
    r["student_param_bytes"] = float(_param_bytes(student.model))
    r["comm_ratio"] = r["method_bytes_per_client"] / r["fedavg_bytes_per_client"]
    r["latency_ratio"] = r["student_latency_s"] / r["teacher_latency_s"]
    r["total_seconds"] = time.perf_counter() - t_start
    clear_cache()
    if cfg.mlflow:
        _log_mlflow(cfg, r)
    return r


def _log_mlflow(cfg: AnomalyConfig, r: dict[str, Any]) -> None:
    """One MLflow run: the config as params, every figure under eval/, fed/ and system/ names."""
    from lowres.hardware import detect
    from lowres.tracking.runs import end_run, log_metrics, log_params, start_run

    hw = detect()  # tagged like training runs, so runs of two lab machines compare
    handle = start_run(cfg.experiment, run_name="anomaly-hdfs", tracking_uri=cfg.tracking_uri,
                       fingerprint=hw.fingerprint, tier=hw.tier, tags={"lowres.task": "anomaly"})
    uri = handle.tracking_uri
    log_params(handle.run_id, cfg.model_dump(mode="json", exclude={"tracking_uri"}), uri)  # where, not what
    prefix = lambda k: ("eval/" if k.startswith(("f1", "precision", "recall", "pseudo", "auroc")) else  # noqa: E731
                        "fed/" if "bytes_" in k and "param" not in k and "rss" not in k else "anomaly/")
    log_metrics(handle.run_id, {prefix(k) + k: float(v) for k, v in r.items() if isinstance(v, (int, float))}, 0,
                tracking_uri=uri)
    end_run(handle.run_id, tracking_uri=uri)
    r["mlflow_run_id"] = handle.run_id
