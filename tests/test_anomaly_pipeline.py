"""A small end-to-end run of the anomaly pipeline (a few sessions, a couple of steps), then `detect`."""

import math

import pytest

from lowres.anomaly.preprocess import data_file

SMALL = ["clients=2", "teacher_steps=2", "fedavg_rounds=1", "fedavg_local_steps=2", "max_length=64",
         "n_normal_train=40", "n_public=40", "n_test=20", "k_normal=8", "k_anomalous=8", "student_steps=3",
         "latency_samples=2", "mlflow=false",
         "student_fedavg_rounds=1", "student_fedavg_local_steps=2", "n_client_labeled=10", "n_calib=20"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from lowres.anomaly.pipeline import load_anomaly_config, run_pipeline

    out = tmp_path_factory.mktemp("anomaly")
    cfg = load_anomaly_config(None, SMALL + [f"output_dir={out}"])
    return out, run_pipeline(cfg, say=lambda s: None)


def test_pipeline_reports_every_figure(run):
    out, r = run
    for key in ("f1_student", "f1_teacher", "f1_fedavg"):
        assert 0.0 <= r[key] <= 1.0
    # scores of 40 sessions (3 float32 arrays) and 3 thresholds are far smaller than a rank-8 adapter of the
    # tiny teacher
    assert 3 * 40 * 4 + 3 * 4 < r["method_bytes_up_per_client"] < 3000
    assert r["fedavg_bytes_up_per_client_round"] > 100_000
    assert r["comm_ratio"] < 1
    assert math.isfinite(r["latency_ratio"]) and r["latency_ratio"] > 0
    assert (out / "student" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "student" / "tokenizer" / "tokenizer.json").is_file()


def test_detect_on_the_written_test_split_repeats_the_students_f1(run):
    from lowres.anomaly.detect import detect_file

    out, r = run
    res = detect_file(out / "student", out / "test_sessions.csv")
    assert res.kind == "sessions" and len(res.labels) == 20 and res.labels.sum() == 10
    assert res.metrics["f1"] == pytest.approx(r["f1_student"])


def test_detect_labelled_csv_and_raw_lines(run, tmp_path):
    from lowres.anomaly.detect import detect_file

    out, _ = run
    csv = tmp_path / "s.csv"
    csv.write_text("Sequence,label\n5 5 22 11 9 26 23 21,0\n5 22 7 11 9 26,1\n")
    res = detect_file(out / "student", csv)
    assert res.kind == "sessions" and len(res.proba) == 2 and set(res.metrics) >= {"f1", "precision", "recall"}
    raw = tmp_path / "raw.log"
    raw.write_text("\n".join(data_file("HDFS_1k.log").read_text().splitlines()[:30]))
    res = detect_file(out / "student", raw)
    assert res.kind == "raw" and res.labels is None and len(res.keys) == len(set(res.keys)) > 5


def test_too_small_public_set_is_refused(tmp_path):
    from lowres.anomaly.pipeline import load_anomaly_config, split_data
    from lowres.anomaly.scoring import SelectionError, select_pseudo_labels

    cfg = load_anomaly_config(None, ["n_public=10", "n_test=10", "n_normal_train=10"])
    data = split_data(cfg)
    assert len(data["public"]) == 10 and sum(data["test_y"]) == 5
    with pytest.raises(SelectionError, match="needs at least 12"):
        select_pseudo_labels(data["public_y"].astype(float), 6, 6)


def test_cli_detect_prints_f1(run, tmp_path):
    from typer.testing import CliRunner

    from lowres.cli.anomaly import anomaly_app

    out, _ = run
    csv = tmp_path / "s.csv"
    csv.write_text("Sequence,label\n5 5 22 11 9 26 23 21,0\n5 22 7 11 9 26,1\n")
    res = CliRunner().invoke(anomaly_app, ["detect", "--model", str(out / "student"), str(csv)])
    assert res.exit_code == 0, res.output
    assert "2 sessions (sessions)" in res.output and "F1 " in res.output
    assert "ms per session" in res.output and "peak RSS" in res.output
    res = CliRunner().invoke(anomaly_app, ["detect", "--model", str(out / "student"), str(csv), "--json"])
    assert res.exit_code == 0, res.output
    import json

    cost = json.loads(res.output)["cost"]
    assert cost["seconds"] > 0 and cost["seconds_per_session"] == pytest.approx(cost["seconds"] / 2)
    import psutil

    assert cost["peak_rss_bytes"] >= psutil.Process().memory_info().rss * 0.5  # this process, model loaded


def test_shipped_configs_validate(tmp_path):
    from lowres.anomaly.pipeline import AnomalyConfig, load_anomaly_config
    from lowres.anomaly.teachers import teacher_fed_config
    from lowres.paths import configs_dir

    cfg = load_anomaly_config(configs_dir() / "anomaly/hdfs-tiny.yaml")
    assert isinstance(cfg, AnomalyConfig) and cfg.k_normal + cfg.k_anomalous <= cfg.n_public
    fed = teacher_fed_config(tmp_path / "n.txt", tmp_path, cfg.clients, cfg.fedavg_rounds, cfg.fedavg_local_steps)
    assert fed.clients == 3 and fed.run_config().model.name == "tiny"
    with pytest.raises(Exception, match="aggregate"):
        load_anomaly_config(None, ["aggregate=median"])


def test_a_rerun_in_the_same_folder_trains_afresh(run):
    """The federation folders an earlier run left are replaced, not resumed (which would train no teacher). The
    rerun is few-shot (teacher_rounds=1): its teacher is the baseline federation's round-1 global, and its bytes
    add that round's adapters to the scores and the student."""
    from lowres.anomaly.pipeline import load_anomaly_config, run_pipeline

    out, first = run
    said: list[str] = []
    again = run_pipeline(load_anomaly_config(None, SMALL + [f"output_dir={out}", "teacher_rounds=1"]),
                         say=said.append)
    assert any("replacing" in s and "fedavg" in s for s in said)
    assert 0.0 <= again["f1_fedavg"] <= 1.0 and again["fedavg_bytes_per_client"] == first["fedavg_bytes_per_client"]
    assert first["mode"] == "one-shot" and again["mode"] == "few-shot" and "f1_teacher" not in again
    # one round both ways and the global down: about the baseline's whole bytes (1 round + final down)
    assert again["method_bytes_before_per_client"] == pytest.approx(first["fedavg_bytes_per_client"], rel=0.01)
    assert again["method_bytes_per_client"] > again["method_bytes_before_per_client"] > 0
    assert 0.0 <= again["f1_fedavg_student"] <= 1.0 and again["fedavg_student_bytes_per_client"] > 0


def test_the_mlflow_run_is_tagged_with_the_machine_and_goes_where_told(tmp_path):
    """An anomaly run lands in the store `--tracking-uri` names, tagged with the hardware fingerprint and tier
    like a training run (so two lab machines' runs compare), its figures under eval/ fed/ anomaly/, and the URI
    itself is not logged as a param."""
    import mlflow

    from lowres.anomaly.pipeline import _log_mlflow, load_anomaly_config
    from lowres.hardware import detect
    from lowres.tracking.runs import TAG_FINGERPRINT, TAG_TIER

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = load_anomaly_config(None, [f"output_dir={tmp_path / 'out'}", f"tracking_uri={uri}", "experiment=anom-t"])
    r = {"f1_student": 0.8, "method_bytes_up_per_client": 1200.0, "latency_ratio": 0.05, "note": "text"}
    _log_mlflow(cfg, r)
    run = mlflow.MlflowClient(uri).get_run(r["mlflow_run_id"])
    hw = detect()
    assert run.data.tags[TAG_FINGERPRINT] == hw.fingerprint and run.data.tags[TAG_TIER] == hw.tier
    assert run.data.metrics == {"eval/f1_student": 0.8, "fed/method_bytes_up_per_client": 1200.0,
                                "anomaly/latency_ratio": 0.05}
    assert "tracking_uri" not in run.data.params and run.info.status == "FINISHED"
