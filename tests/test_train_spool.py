"""Never lose a figure, the recipe's side: `lowres train` goes on when MLflow is unreachable at the start or
goes away mid-run, spools every step's points exactly once, and `lowres sync` uploads them to a real
``mlflow server`` once."""

from __future__ import annotations

import warnings

import pytest
from rich.console import Console

from lowres.cli.app import main
from lowres.config import load_config
from lowres.tracking import runs, spool
from lowres.train import Recipe, run
from servers import free_port, mlflow_server
from train_helpers import tiny_overrides, write_corpus

STEPS = 4
KEYS = ("train/loss", "train/step_seconds", "train/tokens_per_second", "train/peak_memory_megabytes")


@pytest.fixture(autouse=True)
def _env(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOWRES_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lowres-cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the spool is .lowres/spool in the working directory
    # `lowres sync` bounds MLflow's HTTP retries with setdefault in its own process; keep that test-local.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def _sync(capsys) -> str:
    try:
        main(["sync"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    return out.out


def _spooled_metrics(run_id: str) -> list[tuple[str, int]]:
    path = spool.default_spool_dir() / f"{run_id}{spool.LOWRES_SUFFIX}"
    return [(r["key"], r["step"]) for r, _ in spool.read_records(path) if spool.kind(r) == spool.METRIC]


def _check_server_run(uri: str, run_id: str, steps: range) -> None:
    c = runs.client(uri)
    for key in KEYS:
        got = sorted(m.step for m in c.get_metric_history(run_id, key))
        assert got == list(steps), f"{key}: missing or duplicated steps {got}"
    r = c.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["config.train.max_steps"] == str(STEPS)
    assert r.data.tags[runs.TAG_CONFIG_HASH] and r.data.tags["weights"] == "random-init"
    assert {"config.yaml", "adapter", "tokenizer"} <= {a.path for a in c.list_artifacts(run_id)}


def test_dead_server_at_start_spools_every_step_once_then_sync_uploads(tmp_path, capsys):
    port = free_port()
    dead = f"http://127.0.0.1:{port}"
    data = write_corpus(tmp_path, lines=40)
    cfg = load_config(None, tiny_overrides(tmp_path, data, steps=STEPS, **{
        "tracking.mlflow_uri": dead, "tracking.experiment": "outage", "train.eval_batches": 1}))
    console = Console(record=True, width=300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the logger's own "spooled" notice
        result = run(cfg, progress=False, console=console)
    assert result.step == STEPS and spool.is_local_run_id(result.run_id)
    said = console.export_text()
    assert "lowres sync" in said and "spooled" in said, said

    points = _spooled_metrics(result.run_id)
    assert len(points) == len(set(points)), "a point was spooled twice"
    for key in KEYS:
        assert sorted(s for k, s in points if k == key) == list(range(1, STEPS + 1)), key
    assert f"{len(points)} metric points" in " ".join(said.split())

    with mlflow_server(port=port) as uri:  # the server comes back at the address the run was given
        out = _sync(capsys)
        print(out)
        c = runs.client(uri)
        exp = c.get_experiment_by_name("outage")
        found = c.search_runs([exp.experiment_id],
                              filter_string=f"tags.`{spool.TAG_LOCAL_RUN_ID}` = '{result.run_id}'")
        assert len(found) == 1
        _check_server_run(uri, found[0].info.run_id, range(1, STEPS + 1))
        assert "nothing to sync" in _sync(capsys)
        _check_server_run(uri, found[0].info.run_id, range(1, STEPS + 1))  # a second sync added nothing


def test_server_gone_mid_run_then_back(tmp_path, capsys):
    port, work = free_port(), tmp_path / "server"
    work.mkdir()
    data = write_corpus(tmp_path, lines=40)
    with mlflow_server(port=port, workdir=work) as uri:
        cfg = load_config(None, tiny_overrides(tmp_path, data, steps=STEPS, **{
            "tracking.mlflow_uri": uri, "tracking.experiment": "midrun", "train.eval_batches": 1}))
        recipe = Recipe(cfg, progress=False, console=Console(record=True, width=300)).setup()
        assert not recipe.tracker.pending
        recipe.train(steps=2)
        recipe.logger.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = recipe.train()  # the server is gone: steps 3 and 4, the adapter and the end are spooled
        recipe.cleanup()
    assert result.step == STEPS
    assert "lowres sync" in recipe.console.export_text()
    points = _spooled_metrics(result.run_id)
    assert points and len(points) == len(set(points))
    assert {s for _, s in points} == {3, 4}  # steps 1 and 2 reached the server before it went away

    with mlflow_server(port=port, workdir=work) as uri:
        _sync(capsys)
        _check_server_run(uri, result.run_id, range(1, STEPS + 1))
