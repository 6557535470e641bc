"""Never lose a figure: the spool (shared with the profiler's MLflow sink), ``SpoolingLogger`` and ``lowres sync``.

The fast tests use a temp SQLite store and a closed port (the unreachable server). The acceptance test runs a
real PostgreSQL behind a real ``mlflow server`` with basic auth, stops it in the middle of a run, restarts it
and syncs: every point arrives exactly once, and a second sync uploads nothing.
"""

import contextlib
import threading
import time
import warnings

import pytest
import typer
from typer.testing import CliRunner

from lowres.cli.sync import sync as sync_cmd
from lowres.tracking import runs, spool
from lowres.tracking.logger import SpoolingLogger
from lowres.tracking.sync import sync
from profiler.reading import Sample
from profiler.sinks.mlflow import MlflowSink, read_spool
from servers import free_port, mlflow_server, postgres_server

ADMIN_PASSWORD = "lowres-test-admin-pw"  # test-only, >= 12 characters as MLflow requires


def dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # free a moment ago: nothing listens, connections are refused


def history(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in runs.client(uri).get_metric_history(run_id, key))


def test_spool_is_one_format_with_the_sink(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the sink's own client: fail fast here
    uri = dead_uri()
    logger = SpoolingLogger("r1", uri, spool_dir=tmp_path, timeout_s=1)
    t0 = time.monotonic()
    assert logger.log_metrics({"train/loss": 2.5, "train/lr": 1e-4}, step=7, timestamp_ms=1000) is False
    assert logger.log_metrics({"train/loss": 2.4}, step=8, timestamp_ms=2000) is False  # no retry: spooled at once
    assert time.monotonic() - t0 < 5
    assert logger.spooled == 3 and logger.failures == 1 and logger.warning and "lowres sync" in logger.warning
    # The sink's reader reads the logger's metric lines, field for field.
    assert read_spool(logger.spool_path) == [
        {"run_id": "r1", "key": "train/loss", "value": 2.5, "timestamp": 1000, "step": 7, "tracking_uri": uri},
        {"run_id": "r1", "key": "train/lr", "value": 1e-4, "timestamp": 1000, "step": 7, "tracking_uri": uri},
        {"run_id": "r1", "key": "train/loss", "value": 2.4, "timestamp": 2000, "step": 8, "tracking_uri": uri}]
    # ... and sync's reader reads what the real sink spools.
    sink = MlflowSink("r1", uri, interval_s=10, spool_path=str(tmp_path / "r1.mlflow.jsonl"), close_timeout_s=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # its "spooled, run `lowres sync`" notice
        sink.write([Sample(100.0, "lowres_system_cpu_utilization_ratio", 0.5)])
        sink.close()
    recs = [r for r, _ in spool.read_records(tmp_path / "r1.mlflow.jsonl")]
    assert {(r["key"], r["step"], spool.kind(r)) for r in recs} == {
        ("system/cpu_utilization_percentage", 0, "metric"), ("system/cpu_utilization_percentage_max", 0, "metric")}


def test_torn_lines_are_repaired_and_unfinished_lines_wait(tmp_path):
    path = tmp_path / "x.lowres.jsonl"
    path.write_text('{"run_id": "a", "key": "k", "value": 1, "timestamp": 1, "step": 0}\n{"run_id": "a", "ke')
    assert [r["step"] for r, _ in spool.read_records(path)] == [0]  # the unfinished line may still be written
    spool.append_records(path, [spool.metric_record("a", "k", 2.0, 2, 1, "u")])
    assert [r["step"] for r, _ in spool.read_records(path)] == [0, 1]  # the torn line no longer eats the next


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_sync_uploads_once_across_reruns_and_lost_markers(store, tmp_path):
    """Run R has steps 0–4 on the server; the spool holds 3–9 (3, 4 repeated), params, tags, an artifact, the
    end of the run, a sink file, and a run started while the server was down."""
    sdir, down = tmp_path / "spool", dead_uri()
    run = runs.start_run("sync-test", tracking_uri=store)
    for step in range(5):
        runs.log_metrics(run.run_id, {"train/loss": 1.0 / (step + 1)}, step, tracking_uri=store)
    lg = SpoolingLogger(run.run_id, down, spool_dir=sdir, timeout_s=1)
    for step in range(3, 10):
        lg.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    lg.log_params({"lr": 0.1, "lora": {"rank": 8}})
    lg.set_tags({"phase": "done"})
    (tmp_path / "config.yaml").write_text("rank: 8\n")
    lg.log_artifact(tmp_path / "config.yaml", "configs")
    lg.end("FINISHED")
    spool.append_records(sdir / f"{run.run_id}.mlflow.jsonl", [
        spool.metric_record(run.run_id, "system/cpu_utilization_percentage", 50.0, 1000, s, down) for s in range(4)])
    pending = SpoolingLogger.start("sync-test", tracking_uri=down, spool_dir=sdir, timeout_s=1, tags={"who": "t"})
    assert pending.pending and pending.run_id.startswith("local-")
    for step in range(3):
        assert pending.log_metrics({"train/loss": 3.0 - step}, step) is False
    pending.end()

    dry = sync(sdir, store, dry_run=True)
    assert (dry.metrics_uploaded, dry.metrics_skipped, dry.runs_created) == (5 + 4 + 3, 2, 1)
    assert history(store, run.run_id, "train/loss") == list(range(5))  # a dry run writes nothing

    first = sync(sdir, store)
    print("first sync:", first)
    assert first.problems == []
    assert (first.metrics_uploaded, first.metrics_skipped, first.runs_created) == (12, 2, 1)
    assert (first.params_uploaded, first.tags_set, first.artifacts_uploaded, first.runs_ended) == (2, 1, 1, 2)
    c = runs.client(store)
    assert history(store, run.run_id, "train/loss") == list(range(10))
    assert history(store, run.run_id, "system/cpu_utilization_percentage") == list(range(4))
    got = c.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.params == {"lr": "0.1", "lora.rank": "8"}
    assert got.data.tags["phase"] == "done"
    assert [a.path for a in c.list_artifacts(run.run_id, "configs")] == ["configs/config.yaml"]
    server_id = first.run_ids[pending.run_id]
    assert history(store, server_id, "train/loss") == [0, 1, 2]
    assert c.get_run(server_id).data.tags[spool.TAG_LOCAL_RUN_ID] == pending.run_id

    second = sync(sdir, store)
    print("second sync:", second)
    assert second.uploaded == 0 and second.problems == []

    # A sync killed between upload and marker: the server's history still stops every duplicate.
    for marker in sdir.glob("*.synced"):
        marker.unlink()
    third = sync(sdir, store)
    assert (third.metrics_uploaded, third.params_uploaded, third.artifacts_uploaded, third.runs_created) == (0,) * 4
    assert third.metrics_skipped == 5 + 2 + 4 + 3
    assert history(store, run.run_id, "train/loss") == list(range(10))


def test_a_changed_param_is_reported_not_overwritten(store, tmp_path):
    run = runs.start_run("sync-test", tracking_uri=store)
    runs.log_params(run.run_id, {"lr": 0.1}, tracking_uri=store)
    SpoolingLogger(run.run_id, dead_uri(), spool_dir=tmp_path, timeout_s=1).log_params({"lr": 0.2})
    report = sync(tmp_path, store)
    assert len(report.problems) == 1 and "'lr'" in report.problems[0] and "0.2" in report.problems[0]
    assert runs.client(store).get_run(run.run_id).data.params == {"lr": "0.1"}


def test_sync_cli_refuses_an_unreachable_server(tmp_path, monkeypatch):
    _restore_retry_env(monkeypatch)
    SpoolingLogger("r1", dead_uri(), spool_dir=tmp_path, timeout_s=1).log_metrics({"a": 1.0}, 0)
    res = _cli(["--spool-dir", str(tmp_path)])
    assert res.exit_code != 0 and "does not answer" in str(res.exception)
    assert not list(tmp_path.glob("*.synced"))


def _restore_retry_env(monkeypatch):
    """The CLI bounds MLflow's retries in its (usually dedicated) process; undo that after the test."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def _cli(args):
    app = typer.Typer()
    app.command()(sync_cmd)
    app.command("noop")(lambda: None)  # two commands, so typer keeps `sync` as a subcommand name
    return CliRunner().invoke(app, ["sync", *args])


# -- acceptance: a real PostgreSQL behind a real mlflow server with basic auth -----------------------------------
STEPS, KEYS = 300, ("train/loss", "train/tokens_per_second")


@pytest.mark.server
def test_server_stopped_mid_run_then_sync_uploads_everything_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    _restore_retry_env(monkeypatch)
    sdir, work, port = tmp_path / "spool", tmp_path / "server", free_port()
    work.mkdir()
    with postgres_server() as pg:
        backend = pg.create_database("mlflow")
        auth_ini = work / "basic_auth.ini"
        auth_ini.write_text("[mlflow]\ndefault_permission = READ\nadmin_username = admin\n"
                            f"database_uri = {pg.create_database('mlflow_auth')}\nauth_cache_ttl_seconds = 60\n")
        env = {**pg.env, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-csrf-key-0123456789abcdef"}
        server = lambda: mlflow_server(backend, app_name="basic-auth", env=env, port=port, workdir=work)  # noqa: E731

        with contextlib.ExitStack() as running:
            uri = running.enter_context(server())
            lg = SpoolingLogger.start("outage", tracking_uri=uri, spool_dir=sdir, timeout_s=3, retry_after_s=0.5)
            assert not lg.pending
            lg.log_params({"lr": 0.001})
            half = threading.Event()

            def train():
                for step in range(STEPS):
                    lg.log_metrics({k: step * (i + 1.5) for i, k in enumerate(KEYS)}, step)
                    if step == STEPS // 3:
                        half.set()
                    time.sleep(0.01)

            writer = threading.Thread(target=train)
            writer.start()
            assert half.wait(120)
            running.close()  # the server goes away mid-run
        writer.join(300)
        assert not writer.is_alive()
        (tmp_path / "adapter.bin").write_bytes(b"\0" * 1000)
        assert lg.log_artifact(tmp_path / "adapter.bin") is False
        assert lg.end() is False
        late = SpoolingLogger.start("outage", tracking_uri=uri, spool_dir=sdir, timeout_s=1)  # started while down
        assert late.pending
        late.log_metrics({"train/loss": 9.0}, 0)
        print(f"during the run: {lg.sent} requests sent, {lg.spooled} records spooled, {lg.failures} failures")
        assert lg.spooled > 0 and lg.sent > STEPS // 3

        with server():
            res = _cli(["--spool-dir", str(sdir)])
            print(res.output)
            assert res.exit_code == 0, res.output
            c = runs.client(uri)
            for key in KEYS:
                steps = [m.step for m in c.get_metric_history(lg.run_id, key)]
                assert sorted(steps) == list(range(STEPS)), f"{key}: missing or duplicated steps"
            total = sum(len(c.get_metric_history(lg.run_id, k)) for k in KEYS)
            print(f"after sync: {total} points on the server for {STEPS} steps x {len(KEYS)} keys")
            assert total == STEPS * len(KEYS)
            run = c.get_run(lg.run_id)
            assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.001"}
            assert [(a.path, a.file_size) for a in c.list_artifacts(lg.run_id)] == [("adapter.bin", 1000)]
            late_id = c.search_runs([run.info.experiment_id],
                                    filter_string=f"tags.`{spool.TAG_LOCAL_RUN_ID}` = '{late.run_id}'")[0].info.run_id
            assert [m.value for m in c.get_metric_history(late_id, "train/loss")] == [9.0]

            again = sync(sdir)
            print("second sync:", again)
            assert again.uploaded == 0 and again.problems == []
            assert total == sum(len(c.get_metric_history(lg.run_id, k)) for k in KEYS)
