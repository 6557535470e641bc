"""The whole method on the shipped HDFS sessions, next to the teachers-only FedAvg baseline.

    cfg = load_anomaly_config("configs/anomaly/hdfs-tiny.yaml", ["k_normal=100"])
    report = run_pipeline(cfg)          # dict of figures; the student saved in cfg.output_dir/student

Data (all from lowres/anomaly/data, rendered through the templates):
    teachers' data  normal training sessions (hdfs_train_normal_sessions), split IID across clients
    public set      unlabelled sessions from the labelled file (labels hidden; ``public_anomaly_fraction``)
    test set        a balanced held-out split of the labelled file, disjoint (by row) from the public set

Method: teachers score the public set (accuracy, mean and max token loss per session, each session framed by
EOS as in training so its end is judged too) → the scores go up → the server aggregates them, takes pseudo-labels
and trains the student → the student (adapter + head) goes down.
    one-shot (``teacher_rounds=0``)  each client trains a teacher alone; its scores are its only upload
    few-shot (``teacher_rounds=N``)  N FedAvg rounds refine the teachers first (adapters both ways each round,
                                     counted); the N-round global teacher, sent down, scores the public set
Pseudo-labels (``selection``): ``topk`` takes the top-``k_normal`` / bottom-``k_anomalous`` sessions by the
aggregated score; ``threshold`` (no filtering) labels every public session by the aggregate of the clients' own
thresholds. Baselines: ``fedavg_rounds`` rounds of FedAvg over the teachers' adapters, its detector the global
teacher with a threshold on ``score``; and ``student_fedavg_rounds`` rounds of FedAvg of the student-sized
classifier, supervised with labelled sessions each client holds (``n_client_labeled``). Every threshold is chosen
without test labels: the ``threshold_quantile`` of a teacher's score on normal sessions from the training file that
no teacher trained on, each client on its own share (the student's is 0.5 on its own probability).

Stages (``oneshot_scores``, ``fedavg_teacher_baseline``, ``fewshot_scores``, ``train_student_on``,
``fedavg_student_baseline``) are what ``run_pipeline`` chains for one config and what the study
(lowres.anomaly.study) reuses across variants: teachers are trained and score once per seed and mode, and
each ablation only retrains the student.
"""

from __future__ import annotations

import shutil
import statistics
import threading
import time
from dataclasses import dataclass, field
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
    fed_overrides: list[str] = Field(default_factory=list, description="key=value overrides of the teachers' "
                                     "federation config, e.g. [run.train.threads=1] for runs side by side")
    clients: int = Field(3, ge=1)
    teacher_steps: int = Field(150, ge=1, description="one-shot local steps per teacher")
    teacher_rounds: int = Field(0, ge=0, description="0: one-shot (each teacher trains alone); N: few-shot — N "
                                "FedAvg rounds of fedavg_local_steps refine the teachers, then the N-round global "
                                "teacher scores the public set")
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
    selection: str = Field("topk", pattern="^(topk|threshold)$", description="topk: the top-k_normal and "
                           "bottom-k_anomalous sessions by aggregated score; threshold: no filtering — every "
                           "public session labelled by the aggregate of the clients' own thresholds")
    aggregate: str = Field("mean", pattern="^(mean|max)$")
    score: str = Field("loss", pattern="^(" + "|".join(SCORES) + ")$",
                       description="what ranks sessions: accuracy, loss (mean) or max_loss (losses negated)")
    threshold_quantile: float = Field(0.01, ge=0, le=0.5)
    n_calib: int = Field(300, ge=2, description="held-out normal sessions thresholds are set on, shared out "
                         "over the clients")
    student_size: str = "small"
    student_max_length: int = Field(512, ge=16, description="tokens of a session the student reads (longer ones "
                                    "are cut): whole sessions, so a session's end is seen")
    student_steps: int = Field(300, ge=1)
    student_fedavg_rounds: int = Field(5, ge=0, description="the supervised student-sized FedAvg baseline's rounds "
                                       "(0: not run)")
    student_fedavg_local_steps: int = Field(60, ge=1)
    n_client_labeled: int = Field(200, ge=2, description="labelled sessions each client holds for the "
                                  "student-sized FedAvg baseline (public_anomaly_fraction of them anomalous)")
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
    """Rendered texts: teachers' normal sessions, held-out normal sessions (``calib``, for thresholds), the
    public set (+ hidden labels), the balanced test set, and each client's labelled sessions (``client_labeled``:
    (texts, labels) per client, for the supervised baseline), all disjoint by row."""
    templates = read_templates()
    rng = np.random.default_rng(cfg.seed)
    normal_ids = read_id_sessions()
    perm = rng.permutation(len(normal_ids))
    if cfg.n_normal_train >= len(perm):
        raise ValueError(f"n_normal_train={cfg.n_normal_train}: the file has {len(perm)} normal sessions and "
                         "some must stay out of training to set thresholds")
    train = [render_ids(normal_ids[i], templates) for i in perm[:cfg.n_normal_train]]
    # normal sessions no teacher trained on: thresholds are set on these (no test label is ever used)
    calib = [render_ids(normal_ids[i], templates) for i in perm[cfg.n_normal_train:cfg.n_normal_train + cfg.n_calib]]
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
    # after test and public (which keep their rows whatever these sizes): each client's labelled sessions
    n_lab_pos = max(1, int(round(cfg.n_client_labeled * cfg.public_anomaly_fraction)))
    n_lab_neg = max(1, cfg.n_client_labeled - n_lab_pos)
    labeled = []
    for c in range(cfg.clients):
        a = pos[need_pos + c * n_lab_pos:need_pos + (c + 1) * n_lab_pos]
        b = neg[need_neg + c * n_lab_neg:need_neg + (c + 1) * n_lab_neg]
        idx = rng.permutation(np.concatenate([a, b]))
        labeled.append((text(idx), y[idx]))
    return {"train": train, "calib": calib, "public": text(pub_idx), "public_y": y[pub_idx],
            "test": text(test_idx), "test_y": y[test_idx], "test_ids": [rows[i][0] for i in test_idx],
            "client_labeled": labeled}


def write_sessions_csv(path: Path, sessions: list[list[str]], labels) -> Path:
    """A ``Sequence,label`` CSV in the shipped file's form (event ids E1..E30), which `lowres anomaly detect`
    reads back."""
    lines = ["Sequence,label"] + [f"{' '.join(ids)},{int(y)}" for ids, y in zip(sessions, labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _threshold_detector(teacher, calib: list[str], test: list[str],
                        cfg: AnomalyConfig) -> tuple[np.ndarray, float, np.ndarray]:
    """(flags (1 = anomaly) for ``test`` by the teacher's score below a threshold set on normal held-out
    sessions, the threshold, the test scores)."""
    thr = threshold_from_normal(normality(score_sessions(teacher, calib, window=cfg.score_length), cfg.score),
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


# ------------------------------------------------------------------------------------------------- stages
@dataclass
class TeacherScores:
    """What the server receives from the teachers: every client's scores of the public set (all score kinds,
    so the score kind can be chosen afterwards), each client's scores of its own held-out normal sessions (for
    its threshold), and the bytes each client spent to get there."""

    mode: str                                   # "one-shot" or "few-shot"
    rounds: int                                 # FedAvg rounds before scoring (0: one-shot)
    public: list[dict[str, np.ndarray]]         # per client
    calib: list[dict[str, np.ndarray]]          # per client, its own share of the held-out normal sessions
    bytes_up_per_client: float                  # the scores (and thresholds) up
    bytes_before_per_client: float = 0.0        # few-shot: adapters both ways in its rounds + the global down
    seconds: float = 0.0                        # teachers' training (and few-shot rounds)
    tokenizer: Any = field(default=None, repr=False)


def _score_public_and_calib(teacher, public: list[str], calib_share: list[str], window: int | None):
    """One scoring pass over the public set and a client's held-out normal share (batched together)."""
    s = score_sessions(teacher, public + calib_share, window=window)
    n = len(public)
    return {k: v[:n] for k, v in s.items()}, {k: v[n:] for k, v in s.items()}


def _upload_bytes(public_scores: dict[str, np.ndarray]) -> float:
    """A client's upload: its public-set scores and its threshold per score kind (one float each)."""
    return float(scores_bytes({**public_scores, "thresholds": np.zeros(len(SCORES), np.float32)}))


def oneshot_scores(cfg: AnomalyConfig, data: dict, out: Path, say=print) -> tuple[TeacherScores, list]:
    """Each client trains a teacher alone on its normal sessions, then scores the public set and its share of
    the held-out normal sessions. Returns the scores and the teachers."""
    from lowres.anomaly.teachers import prepare_teachers, teacher_fed_config, train_local_teachers

    t0 = time.perf_counter()
    fed = teacher_fed_config(out / "normal_sessions.txt", out / "teachers", cfg.clients, cfg.fedavg_rounds,
                             cfg.fedavg_local_steps, cfg.fed_config, _fed_extra(cfg))
    say(f"      one-shot: {cfg.clients} teachers x {cfg.teacher_steps} steps of {fed.run_config(0).model.name}, alone")
    teachers = train_local_teachers(fed, prepare_teachers(fed), cfg.teacher_steps)
    seconds = time.perf_counter() - t0
    shares = np.array_split(np.arange(len(data["calib"])), cfg.clients)
    public, calib, up = [], [], []
    for i, t in enumerate(teachers):
        say(f"      teacher {i + 1}/{len(teachers)} scores the {len(data['public'])} public sessions and its "
            f"{len(shares[i])} held-out normal ones ...")
        p, c = _score_public_and_calib(t, data["public"], [data["calib"][j] for j in shares[i]], cfg.score_length)
        public.append(p)
        calib.append(c)
        up.append(_upload_bytes(p))
    return TeacherScores("one-shot", 0, public, calib, float(np.mean(up)), 0.0, seconds, teachers[0].tokenizer), teachers


def teacher_detection(cfg: AnomalyConfig, data: dict, ts: TeacherScores, teacher) -> dict[str, float]:
    """Client 0's one-shot teacher used directly as a detector: its threshold set on its own held-out normal
    share (already scored in ``ts``), the test sessions scored. F1, precision, recall, AUROC and threshold."""
    thr = threshold_from_normal(normality(ts.calib[0], cfg.score), cfg.threshold_quantile)
    score = normality(score_sessions(teacher, data["test"], window=cfg.score_length), cfg.score)
    f1, precision, recall = prf(data["test_y"], score < thr)
    return {"f1": f1, "precision": precision, "recall": recall, "auroc": auroc(data["test_y"], score),
            "threshold": thr}


def _per_client_round_bytes(rounds: list[dict], n: int | None = None) -> float:
    """Adapter bytes both ways per client over the first ``n`` rounds (all by default), exact wire bytes."""
    return float(sum(x["bytes_up"] / max(x["clients_replied"], 1) + x["bytes_down"] / max(x["clients_sampled"], 1)
                     for x in rounds[:n]))


@dataclass
class FedAvgTeachers:
    teachers: list
    result: Any
    folder: Path
    seconds: float
    figures: dict


def fedavg_teacher_baseline(cfg: AnomalyConfig, data: dict, out: Path, rounds: int | None = None,
                            say=print) -> FedAvgTeachers:
    """``rounds`` (default ``fedavg_rounds``) rounds of FedAvg over the teachers' adapters; its detector is the
    global teacher, thresholded on the held-out normal sessions. Bytes: the rounds' adapters both ways plus the
    final global down to each client (which then detects with it)."""
    from lowres.anomaly.teachers import teacher_fed_config, train_fedavg_teachers
    from lowres.federated.client import clear_cache, lora_tensors

    rounds = rounds or cfg.fedavg_rounds
    t0 = time.perf_counter()
    clear_cache()
    folder = out / "fedavg"
    if folder.exists():
        shutil.rmtree(folder)
    fed = teacher_fed_config(out / "normal_sessions.txt", folder, cfg.clients, rounds, cfg.fedavg_local_steps,
                             cfg.fed_config, _fed_extra(cfg))
    teachers, res = train_fedavg_teachers(fed)
    seconds = time.perf_counter() - t0
    final_down = tensors_bytes(lora_tensors(teachers[0].model))
    r = {"fedavg_seconds": seconds,
         "fedavg_bytes_up_per_client_round": float(np.mean([x["bytes_up"] / x["clients_replied"] for x in res.rounds])),
         "fedavg_bytes_down_per_client_round": float(np.mean([x["bytes_down"] / x["clients_sampled"]
                                                              for x in res.rounds])),
         "fedavg_bytes_per_client": _per_client_round_bytes(res.rounds) + final_down}
    flags, thr, score = _threshold_detector(teachers[0], data["calib"], data["test"], cfg)
    r["f1_fedavg"], r["precision_fedavg"], r["recall_fedavg"] = prf(data["test_y"], flags)
    r["auroc_fedavg"] = auroc(data["test_y"], score)
    r["fedavg_threshold"] = thr
    return FedAvgTeachers(teachers, res, folder, seconds, r)


def fewshot_scores(cfg: AnomalyConfig, data: dict, out: Path, rounds: int, base: FedAvgTeachers | None = None,
                   say=print) -> TeacherScores:
    """Few-shot: the global teacher after ``rounds`` FedAvg rounds scores the public set. It is the teacher-
    baseline federation's round-``rounds`` global when that federation ran at least as many rounds and still
    holds it, else a federation of ``rounds`` rounds of its own. Every client holds the same global teacher, so
    the scores are computed once and every client uploads them; each client sets its threshold on its own
    share of the held-out normal sessions."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from lowres.federated.global_state import PREFIX
    from lowres.federated.wire import numpy_to_state

    path = base.folder / "global" / f"{PREFIX}{rounds:04d}.safetensors" if base else None
    if base is None or not path.is_file():
        base = fedavg_teacher_baseline(cfg, data, out / "fewshot", rounds, say)
        path = base.folder / "global" / f"{PREFIX}{rounds:04d}.safetensors"
    from safetensors.numpy import load_file

    teacher = base.teachers[0]
    own = get_peft_model_state_dict(teacher.model)
    final = {k: v.detach().clone() for k, v in own.items()}
    tensors = load_file(str(path))
    set_peft_model_state_dict(teacher.model, numpy_to_state(tensors, own))
    try:
        shares = np.array_split(np.arange(len(data["calib"])), cfg.clients)
        say(f"      few-shot: the {rounds}-round global teacher scores the {len(data['public'])} public sessions and "
            f"the {len(data['calib'])} held-out normal ones ...")
        pub, cal = _score_public_and_calib(teacher, data["public"], data["calib"], cfg.score_length)
    finally:
        set_peft_model_state_dict(teacher.model, final)  # the baseline's teacher is the final global again
    calib = [{k: v[idx] for k, v in cal.items()} for idx in shares]
    before = _per_client_round_bytes(base.result.rounds, rounds) + tensors_bytes(tensors)
    seconds = base.seconds * rounds / max(len(base.result.rounds), 1)
    return TeacherScores("few-shot", rounds, [pub] * cfg.clients, calib, _upload_bytes(pub), before, seconds,
                         teacher.tokenizer)


def pseudo_labels(ts: TeacherScores, aggregate: str, score: str, selection: str, k_normal: int, k_anomalous: int,
                  quantile: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(public-set indices, their pseudo-labels (1 = anomalous), the aggregated normality) from the clients'
    scores: top/bottom-k (``topk``) or every session against the aggregate of the clients' own thresholds
    (``threshold``, no filtering)."""
    agg = aggregate_scores([normality(s, score) for s in ts.public], aggregate)
    if selection == "topk":
        n_idx, a_idx = select_pseudo_labels(agg, k_normal, k_anomalous)
        return np.concatenate([n_idx, a_idx]), np.r_[np.zeros(len(n_idx), int), np.ones(len(a_idx), int)], agg
    thresholds = [threshold_from_normal(normality(c, score), quantile) for c in ts.calib]
    thr = float(np.mean(thresholds) if aggregate == "mean" else np.max(thresholds))
    idx = np.arange(len(agg))
    return idx, (agg < thr).astype(int), agg


@dataclass(frozen=True)
class Variant:
    """One way to pseudo-label and train the student from the same teacher scores."""

    aggregate: str = "mean"
    score: str = "loss"
    selection: str = "topk"
    k_normal: int = 600
    k_anomalous: int = 250
    student_size: str = "small"

    @classmethod
    def of(cls, cfg: AnomalyConfig, **changes) -> "Variant":
        base = cls(cfg.aggregate, cfg.score, cfg.selection, cfg.k_normal, cfg.k_anomalous, cfg.student_size)
        return cls(**{**base.__dict__, **changes})


def train_student_on(cfg: AnomalyConfig, data: dict, ts: TeacherScores, variant: Variant,
                     save_to: Path | None = None) -> tuple[Any, dict]:
    """Pseudo-label the public set from ``ts`` as ``variant`` says, train a student on it, score it on the test
    split. Returns (student, figures): pseudo-label purity, F1/precision/recall at P >= 0.5, AUROC, the same on
    test sessions whose exact event sequence is not in the public set, and bytes per client (everything before
    and the scores up, plus the student down)."""
    from lowres.anomaly.student import build_student, predict_proba, save_student, student_tensors, train_student

    t0 = time.perf_counter()
    idx, labels, agg = pseudo_labels(ts, variant.aggregate, variant.score, variant.selection, variant.k_normal,
                                     variant.k_anomalous, cfg.threshold_quantile)
    pub_y = data["public_y"]
    r: dict[str, Any] = {"pseudo_normal": int((labels == 0).sum()), "pseudo_anomalous": int(labels.sum()),
                         "auroc_public_aggregate": auroc(pub_y, agg)}
    r["pseudo_normal_purity"] = float(1 - pub_y[idx[labels == 0]].mean()) if (labels == 0).any() else float("nan")
    r["pseudo_anomalous_purity"] = float(pub_y[idx[labels == 1]].mean()) if labels.any() else float("nan")
    student = build_student(ts.tokenizer, variant.student_size, cfg.student_max_length, cfg.seed)
    fig = train_student(student, [data["public"][i] for i in idx], labels.tolist(), cfg.student_steps, seed=cfg.seed)
    r["student_seconds"] = time.perf_counter() - t0
    r["student_final_loss"] = fig["final_loss"]
    if save_to is not None:
        save_student(student, save_to)
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
    r["method_bytes_before_per_client"] = ts.bytes_before_per_client
    r["method_bytes_up_per_client"] = ts.bytes_up_per_client
    r["method_bytes_down_per_client"] = float(tensors_bytes(student_tensors(student)))
    r["method_bytes_per_client"] = (ts.bytes_before_per_client + ts.bytes_up_per_client
                                    + r["method_bytes_down_per_client"])
    return student, r


def fedavg_student_baseline(cfg: AnomalyConfig, data: dict, tokenizer: Any, size: str | None = None,
                            say=print) -> tuple[Any, dict]:
    """FedAvg of the student-sized classifier, supervised with each client's labelled sessions (as the
    reference's baseline): ``student_fedavg_rounds`` rounds of ``student_fedavg_local_steps`` steps per client,
    the adapter and head averaged weighted by examples. Bytes: exact wire bytes of the tensors both ways each
    round plus the final model down. Returns (the global student, figures)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from lowres.anomaly.student import build_student, predict_proba, student_tensors, train_student
    from lowres.federated.wire import numpy_to_state

    t0 = time.perf_counter()
    student = build_student(tokenizer, size or cfg.student_size, cfg.student_max_length, cfg.seed)
    own = get_peft_model_state_dict(student.model)
    glob = student_tensors(student)
    sent = 0.0
    for rnd in range(cfg.student_fedavg_rounds):
        updates, weights = [], []
        for c, (texts, labels) in enumerate(data["client_labeled"]):
            set_peft_model_state_dict(student.model, numpy_to_state(glob, own))
            sent += tensors_bytes(glob)
            train_student(student, texts, list(labels), cfg.student_fedavg_local_steps,
                          seed=cfg.seed * 1000 + rnd * 100 + c)
            local = student_tensors(student)
            sent += tensors_bytes(local)
            updates.append(local)
            weights.append(len(texts))
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        glob = {k: sum(wi * u[k] for wi, u in zip(w, updates)).astype(np.float32) for k in glob}
    set_peft_model_state_dict(student.model, numpy_to_state(glob, own))
    final_down = tensors_bytes(glob)
    p = predict_proba(student, data["test"])
    r = {"fedavg_student_seconds": time.perf_counter() - t0,
         "fedavg_student_bytes_per_client": sent / len(data["client_labeled"]) + final_down}
    r["f1_fedavg_student"], r["precision_fedavg_student"], r["recall_fedavg_student"] = prf(data["test_y"], p >= 0.5)
    r["auroc_fedavg_student"] = auroc(data["test_y"], -p)
    return student, r


def _fed_extra(cfg: AnomalyConfig) -> list[str]:
    return [f"run.data.max_length={cfg.max_length}", f"run.train.seed={cfg.seed}", f"partition.seed={cfg.seed}",
            *cfg.fed_overrides]


def prepare_run(cfg: AnomalyConfig, say=print) -> tuple[Path, dict]:
    """The output folder (federation folders of an earlier run replaced: they would be resumed, not retrained)
    and the data split, written where the stages and `lowres anomaly detect` read it."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("teachers", "fedavg", "fewshot"):
        if (out / sub).exists():
            say(f"note: replacing {out / sub} from an earlier run")
            shutil.rmtree(out / sub)
    data = split_data(cfg)
    (out / "normal_sessions.txt").write_text("\n".join(data["train"]) + "\n")
    # the held-out split, so `lowres anomaly detect test_sessions.csv --model <out>/student` repeats the F1
    write_sessions_csv(out / "test_sessions.csv", data["test_ids"], data["test_y"])
    return out, data


def run_pipeline(cfg: AnomalyConfig, say=print) -> dict[str, Any]:
    """Run method and baselines for one config; return every figure (also logged to MLflow when ``cfg.mlflow``)."""
    from lowres.anomaly.student import predict_proba
    from lowres.federated.client import clear_cache

    t_start = time.perf_counter()
    out, data = prepare_run(cfg, say)
    say(f"data: {len(data['train'])} normal training sessions over {cfg.clients} clients, public set "
        f"{len(data['public'])} ({int(data['public_y'].sum())} anomalous, labels hidden), test "
        f"{len(data['test'])} balanced")
    r: dict[str, Any] = {"mode": "few-shot" if cfg.teacher_rounds else "one-shot", "teacher_rounds": cfg.teacher_rounds}
    oneshot = cfg.teacher_rounds == 0
    n_steps = 5 if cfg.student_fedavg_rounds else 4
    if oneshot:
        say(f"[1/{n_steps}] teachers: one-shot, scores up ...")
        ts, teachers = oneshot_scores(cfg, data, out, say)
        r["teachers_seconds"] = ts.seconds
        say(f"      teacher 1 as a detector on the {len(data['test'])} test sessions ...")
        r.update({f"{k}_teacher" if k != "threshold" else "teacher_threshold": v
                  for k, v in teacher_detection(cfg, data, ts, teachers[0]).items()})
        del teachers
    say(f"[{1 if not oneshot else 2}/{n_steps}] FedAvg over the teachers: {cfg.fedavg_rounds} rounds x "
        f"{cfg.fedavg_local_steps} local steps, its global teacher as the baseline's detector ...")
    base = fedavg_teacher_baseline(cfg, data, out, say=say)
    r.update(base.figures)
    if not oneshot:
        say(f"[2/{n_steps}] teachers: few-shot, {cfg.teacher_rounds} FedAvg rounds, scores up ...")
        ts = fewshot_scores(cfg, data, out, cfg.teacher_rounds, base, say)
        r["teachers_seconds"] = ts.seconds  # its teacher is the baseline's global after fewer rounds
    say(f"[3/{n_steps}] student: {cfg.student_size}, {cfg.student_steps} steps on the pseudo-labelled public set ...")
    student, fig = train_student_on(cfg, data, ts, Variant.of(cfg), save_to=out / "student")
    r.update(fig)
    say(f"student: pseudo-labels {fig['pseudo_normal']} normal ({fig['pseudo_normal_purity']:.1%} truly normal), "
        f"{fig['pseudo_anomalous']} anomalous ({fig['pseudo_anomalous_purity']:.1%} truly anomalous); "
        f"{fig['student_seconds']:.0f} s, loss {fig['student_final_loss']:.3f}; saved to {out / 'student'}")
    if cfg.student_fedavg_rounds:
        say(f"[4/{n_steps}] FedAvg of the student-sized classifier on the clients' labelled sessions: "
            f"{cfg.student_fedavg_rounds} rounds x {cfg.student_fedavg_local_steps} steps ...")
        r.update(fedavg_student_baseline(cfg, data, ts.tokenizer, say=say)[1])

    # --- inference cost: the baseline's detector (a teacher) vs the student, the same sessions ----------------
    sample = data["test"][:cfg.latency_samples]
    say(f"[{n_steps}/{n_steps}] inference cost: {len(sample)} sessions one at a time through the teacher, then "
        "the student ...")
    teacher = base.teachers[0]
    teach = measure_inference(lambda x: score_sessions(teacher, x, batch_size=1, window=cfg.score_length), sample)
    stud = measure_inference(lambda x: predict_proba(student, x, batch_size=1), sample)
    for k, v in teach.items():
        r[f"teacher_{k}"] = v
    for k, v in stud.items():
        r[f"student_{k}"] = v
    r["teacher_param_bytes"] = float(_param_bytes(teacher.model))
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
