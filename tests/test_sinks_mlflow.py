"""The MLflow sink and run wiring against real stores: a temp SQLite store, a real `mlflow server`, and a
closed port (the unreachable path). Values are read back with MlflowClient."""

import math
import re
import warnings

import pytest

from lowres import tracking
from lowres.tracking.runs import TAG_CONFIG_HASH, TAG_FINGERPRINT, TAG_GIT_SHA, TAG_TIER, standard_tags
from profiler.reading import Sample
from profiler.sinks import build
from profiler.sinks.mlflow import read_spool, resolve_tracking_uri
from servers import free_port, mlflow_server

pytestmark = pytest.mark.server

T0 = 1_700_000_000.0
CPU = "lowres_system_cpu_utilization_ratio"
RSS = "lowres_process_resident_memory_bytes"
NET = "lowres_system_network_receive_bytes_total"
GPU_MEM = "lowres_gpu_memory_used_bytes"


def known_samples() -> list[Sample]:
    """Three 10 s windows of 4 ticks each, with values whose mean and max are easy to state."""
    out = []
    for window in range(3):
        for tick in range(4):
            ts = T0 + window * 10 + tick * 2.5
            out += [
                Sample(ts, CPU, (window + 1) * 0.1 * (tick + 1) / 4),
                Sample(ts, RSS, 1e9 + tick * 1e8),
                Sample(ts, NET, 1e6 * (window * 4 + tick + 1)),
                Sample(ts, GPU_MEM, 2e9, (("gpu", "0"),)),
                Sample(ts, "lowres_system_cpu_core_utilization_ratio", 0.5, (("cpu", "0"),)),  # no MLflow name
            ]
    return out


def expected() -> dict[str, list[float]]:
    """Per MLflow key, the value at steps 0, 1, 2."""
    cpu = [[(w + 1) * 0.1 * (t + 1) / 4 * 100 for t in range(4)] for w in range(3)]
    return {
        "system/cpu_utilization_percentage": [sum(v) / 4 for v in cpu],
        "system/cpu_utilization_percentage_max": [max(v) for v in cpu],
        "system/lowres/process_rss_megabytes": [1150.0] * 3,
        "system/lowres/process_rss_megabytes_max": [1300.0] * 3,
        "system/network_receive_megabytes": [4.0, 8.0, 12.0],  # a counter: its last value, no mean or max
        "system/gpu_0_memory_usage_megabytes": [2000.0] * 3,
        "system/gpu_0_memory_usage_megabytes_max": [2000.0] * 3,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: creating its schema is the slow part."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    keys = c.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) for k in keys}


def assert_windows(got: dict, first_step: int = 0) -> None:
    want = expected()
    assert set(got) == set(want)  # per-core CPU has no MLflow name and must not appear
    for key, values in want.items():
        assert [s for s, _ in got[key]] == [first_step + i for i in range(3)], key
        assert [v for _, v in got[key]] == pytest.approx(values, rel=1e-9), key


def test_windows_become_mean_and_max_with_one_log_batch_each(store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    calls = []
    real = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, run_id, **kw: calls.append(kw) or real(
        self, run_id, **kw))
    run = tracking.start_run("sinks", tracking_uri=store)
    sink = build({"kind": "mlflow", "tracking_uri": store, "run_id": run.run_id, "interval_s": 10.0,
                  "spool_path": str(tmp_path / "spool.jsonl")})
    samples = known_samples()
    for i in range(0, len(samples), 5):  # one tick's batch at a time, as the sampler hands them over
        sink.write(samples[i:i + 5])
    sink.close()

    assert_windows(history(store, run.run_id))
    assert len(calls) == 3  # one per window, never one per value
    d = sink.describe()
    assert (d["windows"], d["sent_points"], d["spooled_points"], d["failures"]) == (3, 21, 0, 0)
    assert not (tmp_path / "spool.jsonl").exists()


def test_run_tags_params_artifact_and_resume(store):
    from mlflow import MlflowClient

    config = {"model": "tiny", "lora": {"rank": 8}}
    run = tracking.start_run("sinks", tracking_uri=store, fingerprint="fp-123", tier="laptop-8g", config=config)
    c = MlflowClient(store)
    tags = c.get_run(run.run_id).data.tags
    assert tags[TAG_FINGERPRINT] == "fp-123" and tags[TAG_TIER] == "laptop-8g"
    assert tags[TAG_CONFIG_HASH] == tracking.config_hash({"lora": {"rank": 8}, "model": "tiny"})
    assert tags["lowres.version.mlflow"] == __import__("mlflow").__version__
    assert {"lowres.version.torch", "lowres.version.transformers", "lowres.version.peft"} <= set(tags)

    tracking.log_params(run.run_id, config, tracking_uri=store)
    tracking.log_text(run.run_id, "model: tiny\n", "config.yaml", tracking_uri=store)
    assert c.get_run(run.run_id).data.params == {"model": "tiny", "lora.rank": "8"}
    assert c.download_artifacts(run.run_id, "config.yaml", dst_path=None)

    tracking.log_metrics(run.run_id, {"train/loss": 2.5, "train/tokens_per_second": 100.0}, step=7,
                         tracking_uri=store)
    assert tracking.max_logged_step(run.run_id, "train/loss", tracking_uri=store) == 7
    assert tracking.max_logged_step(run.run_id, "train/absent", tracking_uri=store) is None

    tracking.end_run(run.run_id, tracking_uri=store)
    resumed = tracking.start_run("sinks", run_id=run.run_id, tracking_uri=store, fingerprint="fp-123")
    assert resumed.resumed and resumed.run_id == run.run_id
    assert c.get_run(run.run_id).info.status == "RUNNING"

    # A resumed sink continues after the steps the run already has.
    sink = build({"kind": "mlflow", "tracking_uri": store, "run_id": run.run_id, "first_step": 8})
    for s in known_samples():
        sink.write([s])
    sink.close()
    got = {k: v for k, v in history(store, run.run_id).items() if k.startswith("system/")}
    assert_windows(got, first_step=8)


def test_git_sha_tag_in_a_checkout(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}", standard_tags(fingerprint=None, tier=None, git_path=repo)[TAG_GIT_SHA])
    assert TAG_GIT_SHA not in standard_tags(fingerprint=None, tier=None, git_path=tmp_path)


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_unreachable_mlflow_spools_every_point_and_warns(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    spool = tmp_path / "run" / "spool.jsonl"
    sink = build({"kind": "mlflow", "tracking_uri": uri, "run_id": "r-offline", "interval_s": 10.0,
                  "spool_path": str(spool), "close_timeout_s": 2.0})
    for s in known_samples():
        sink.write([s])  # the run goes on: writing never waits for the server
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink.close()
    assert any(str(spool) in str(w.message) and "unreachable" in str(w.message) for w in caught)

    points = read_spool(spool)
    got: dict[str, list] = {}
    for p in points:
        assert p["run_id"] == "r-offline" and p["tracking_uri"] == uri
        got.setdefault(p["key"], []).append((p["step"], p["value"]))
    assert_windows({k: sorted(v) for k, v in got.items()})
    assert sink.describe()["spooled_points"] == len(points) == 21
    assert sink.describe()["failures"] >= 1


def test_a_refused_write_is_spooled_by_the_writer(store, tmp_path):
    # The store answers but refuses (no such run): the writer thread spools and the run goes on.
    spool = tmp_path / "spool.jsonl"
    sink = build({"kind": "mlflow", "tracking_uri": store, "run_id": "0" * 32, "spool_path": str(spool)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in known_samples():
            sink.write([s])
        sink.close()
    assert len(read_spool(spool)) == 21
    assert sink.describe()["failures"] >= 1 and sink.describe()["sent_points"] == 0


def test_real_mlflow_server_receives_the_windows():
    with mlflow_server() as uri:
        run = tracking.start_run("server", tracking_uri=uri, fingerprint="fp-srv", tier="t")
        sink = build({"kind": "mlflow", "tracking_uri": uri, "run_id": run.run_id, "close_timeout_s": 30.0})
        samples = known_samples()
        for i in range(0, len(samples), 5):
            sink.write(samples[i:i + 5])
        sink.close()
        assert sink.describe()["spooled_points"] == 0, sink.describe()
        assert_windows(history(uri, run.run_id))


def test_a_resume_while_the_server_is_away_continues_the_steps(tmp_path):
    """Two processes of one run, both spooling (server away): with the run's start as origin the second
    process's steps follow the first's — even when it resumes inside the window the first died in — so sync
    keeps both instead of dropping the second as duplicates."""
    uri = f"http://127.0.0.1:{free_port()}"
    steps = []
    # process 1: windows 0-2 of the run; process 2 resumes 1 s after process 1's last sample (same window)
    first_of_second = math.floor((T0 + 28.5 - T0) / 10.0) + 1  # what lowres.train.recipe passes on resume
    for proc, (offset, first_step) in enumerate(((0.0, 0), (28.5, first_of_second))):
        spool = tmp_path / f"spool-{proc}.jsonl"
        sink = build({"kind": "mlflow", "tracking_uri": uri, "run_id": "r-resumed", "interval_s": 10.0,
                      "spool_path": str(spool), "close_timeout_s": 2.0, "first_step": first_step,
                      "origin_ts": T0})
        for s in known_samples():
            sink.write([Sample(s.ts + offset, s.name, s.value, s.labels)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sink.close()
        steps.append(sorted({p["step"] for p in read_spool(spool)}))
    assert steps[0] == [0, 1, 2]
    assert steps[1] == [3, 4, 5]  # from the run's start: 28.5 s + 0..27.5 s → windows 2..5, 2 lifted to 3
    assert not set(steps[0]) & set(steps[1])
