"""The FedDALE study's stages: few-shot teachers, pseudo-labelling without filtering, the supervised
student-sized FedAvg baseline, its byte accounting, and one seed of the study on a few sessions."""

import numpy as np
import pytest

SMALL = ["clients=2", "teacher_steps=2", "fedavg_rounds=2", "fedavg_local_steps=2", "max_length=64",
         "n_normal_train=40", "n_public=40", "n_test=20", "k_normal=8", "k_anomalous=8", "student_steps=3",
         "latency_samples=2", "mlflow=false", "student_fedavg_rounds=2", "student_fedavg_local_steps=2",
         "n_client_labeled=10", "n_calib=20"]


def _scores(loss_per_client, calib_per_client):
    from lowres.anomaly.pipeline import TeacherScores

    pub = [{"loss": np.asarray(x, np.float32), "accuracy": -np.asarray(x, np.float32),
            "max_loss": np.asarray(x, np.float32)} for x in loss_per_client]
    cal = [{"loss": np.asarray(x, np.float32), "accuracy": -np.asarray(x, np.float32),
            "max_loss": np.asarray(x, np.float32)} for x in calib_per_client]
    return TeacherScores("one-shot", 0, pub, cal, 100.0)


def test_topk_and_no_filtering_pseudo_labels():
    from lowres.anomaly.pipeline import pseudo_labels

    # two clients' losses of 6 public sessions: 0..2 normal (low loss), 3..5 anomalous (high loss)
    ts = _scores([[0.1, 0.2, 0.3, 2.0, 3.0, 4.0], [0.2, 0.1, 0.4, 1.0, 5.0, 3.0]],
                 [[0.1, 0.2, 0.3, 0.5], [0.1, 0.2, 0.3, 0.7]])
    idx, y, agg = pseudo_labels(ts, "mean", "loss", "topk", 2, 1, 0.5)
    assert dict(zip(idx.tolist(), y.tolist())) == {0: 0, 1: 0, 4: 1}
    assert agg[4] == pytest.approx(-4.0)
    # no filtering: every session, labelled against the mean of the clients' thresholds (median loss of each
    # client's held-out normal sessions: 0.25 and 0.25 → normality threshold -0.25)
    idx, y, _ = pseudo_labels(ts, "mean", "loss", "threshold", 2, 1, 0.5)
    assert idx.tolist() == list(range(6)) and y.tolist() == [0, 0, 1, 1, 1, 1]
    # max aggregation: a session is as normal as the client that knows it best
    idx, y, agg = pseudo_labels(ts, "max", "loss", "topk", 1, 1, 0.5)
    assert agg.tolist() == pytest.approx([-0.1, -0.1, -0.3, -1.0, -3.0, -3.0])
    assert y.tolist() == [0, 1] and idx[1] == 4  # ties (4 and 5 at -3.0) break by index


@pytest.fixture(scope="module")
def seed_rows(tmp_path_factory):
    from lowres.anomaly.pipeline import load_anomaly_config
    from lowres.anomaly.study import study_seed

    cfg = load_anomaly_config(None, SMALL + [f"output_dir={tmp_path_factory.mktemp('study')}"])
    said: list[str] = []
    return cfg, study_seed(cfg, seed=0, fewshot_rounds=1, ablations=True, say=said.append), said


def test_one_seed_has_every_row_with_figures(seed_rows):
    from lowres.anomaly.study import summarise, variants

    cfg, rows, said = seed_rows
    names = [r["row"] for r in rows]
    for v in variants(cfg, True):
        assert v in names
    assert "no filtering (threshold)" in names and "aggregate=max" in names and "student_size=tiny" in names
    assert any(n.startswith("student (few-shot, 1 round)") for n in names)
    assert any(n.startswith("FedAvg student-sized") for n in names)
    assert any(n.startswith("FedAvg teachers (2 rounds)") for n in names)
    for r in rows:
        assert 0.0 <= r["f1"] <= 1.0 and r["seed"] == 0
    table = summarise(rows + [{**r, "seed": 1, "f1": 1 - r["f1"]} for r in rows])
    main = next(s for s in table if s["row"] == "student (one-shot)")
    assert main["seeds"] == 2 and main["f1"] == pytest.approx(0.5) and main["f1_sd"] >= 0


def test_bytes_are_counted_the_same_way_for_every_method(seed_rows):
    """One-shot: scores up + student down. Few-shot: the same plus its FedAvg round (adapters both ways) and the
    round's global down. FedAvg teachers: every round both ways plus the final global down."""
    cfg, rows, _ = seed_rows
    get = {r["row"]: r for r in rows}
    one = get["student (one-shot)"]
    few = next(r for k, r in get.items() if k.startswith("student (few-shot"))
    fav = next(r for k, r in get.items() if k.startswith("FedAvg teachers"))
    adapter = fav["message_bytes"]  # one adapter message up
    assert one["bytes_per_client"] == pytest.approx(one["message_bytes"] + one["student_message_bytes"])
    assert 3 * 40 * 4 < one["message_bytes"] < 3000  # 3 score arrays of 40 sessions + thresholds
    # few-shot = one round (down + up) + the global down + scores up + student down; adapters dominate
    assert few["bytes_per_client"] == pytest.approx(one["bytes_per_client"] + 3 * adapter, rel=0.01)
    # FedAvg teachers: 2 rounds both ways + final down ≈ 5 adapter messages
    assert fav["bytes_per_client"] == pytest.approx(5 * adapter, rel=0.01)
    assert one["bytes_per_client"] < 0.1 * fav["bytes_per_client"]


def test_the_study_table_one_size_is_the_federations_own_message(seed_rows):
    from lowres.anomaly.study import message_sizes

    _, rows, _ = seed_rows
    fav = next(r for r in rows if r["row"].startswith("FedAvg teachers"))
    # the same rank-8 adapter of the tiny teacher, built afresh: a reply adds only a few metrics to it
    assert message_sizes(["tiny"])["tiny"] == pytest.approx(fav["message_bytes"], rel=0.01)


def test_student_fedavg_counts_every_message(tmp_path):
    from lowres.anomaly.pipeline import fedavg_student_baseline, load_anomaly_config, split_data
    from lowres.anomaly.scoring import tensors_bytes
    from lowres.anomaly.student import build_student, student_tensors
    from lowres.models.tokenizer import train_tokenizer

    cfg = load_anomaly_config(None, SMALL + [f"output_dir={tmp_path}"])
    data = split_data(cfg)
    assert len(data["client_labeled"]) == 2
    for texts, labels in data["client_labeled"]:
        assert len(texts) == 10 and 0 < labels.sum() < 10
    tok = train_tokenizer(data["train"][:40], 512)
    student, r = fedavg_student_baseline(cfg, data, tok, say=lambda s: None)
    one = tensors_bytes(student_tensors(build_student(tok, cfg.student_size, cfg.student_max_length, 0)))
    # 2 rounds x (down + up) + the final model down, per client, all messages of the same tensors
    assert r["fedavg_student_bytes_per_client"] == pytest.approx(5 * one)
    assert 0.0 <= r["f1_fedavg_student"] <= 1.0


def test_bench_refuses_unknown_teachers(capsys):
    with pytest.raises(SystemExit) as exc:
        _bench().main(["--teachers", "gpt5"])
    assert exc.value.code == 2 and "unknown ['gpt5']" in capsys.readouterr().err


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "anomaly_study.py"
    spec = importlib.util.spec_from_file_location("anomaly_study_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_seeds_in_separate_processes_merge_into_one_table(seed_rows, tmp_path, capsys):
    """--seed-list runs exactly the seeds named; --merge summarises several --json outputs as one study, the
    F1 of a row being the mean over the merged seeds."""
    import json

    cfg, rows, _ = seed_rows
    bench = _bench()
    sets = [x for s in SMALL if not s.startswith("mlflow") for x in ("--set", s)]
    assert bench.main(["--teachers", "tiny", "--seed-list", "1", "--no-ablations", "--threads", "1",
                       "--json", str(tmp_path / "s1.json"), *sets]) == 0
    s1 = json.loads((tmp_path / "s1.json").read_text())
    assert {r["seed"] for r in s1["rows"]} == {1} and s1["configs"]["tiny"]["n_public"] == cfg.n_public
    # seed 0 from the module's study (same row names), written as the bench writes its JSON
    s0 = {"rows": [{**r, "teachers": "tiny"} for r in rows if r["row"] in {x["row"] for x in s1["rows"]}],
          "configs": s1["configs"]}
    (tmp_path / "s0.json").write_text(json.dumps(s0, default=float))
    capsys.readouterr()
    assert bench.main(["--merge", str(tmp_path / "s0.json"), "--merge", str(tmp_path / "s1.json")]) == 0
    out = capsys.readouterr().out
    result = dict(kv.split("=", 1) for kv in out.strip().splitlines()[-1].split()[1:])
    one = [r["f1"] for r in s0["rows"] + s1["rows"] if r["row"] == "student (one-shot)"]
    assert result["seeds"] == "2" and float(result["f1_oneshot"]) == pytest.approx(sum(one) / 2, abs=1e-4)
    # merging a seed twice is refused rather than counted twice
    with pytest.raises(SystemExit) as exc:
        bench.main(["--merge", str(tmp_path / "s1.json"), "--merge", str(tmp_path / "s1.json")])
    assert exc.value.code == 2 and "appears twice" in capsys.readouterr().err
