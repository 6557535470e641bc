"""The Streamlit dashboard under streamlit.testing's AppTest: every page, on an MLflow store seeded by real
`lowres train` runs of `tiny` (dash_helpers), shows the figures those runs logged, without exceptions."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from dash_helpers import APP, load_queries, seeded_store
from servers import prometheus_server, wait_until

GIB = 1024**3


@pytest.fixture(scope="session")
def seeded(tmp_path_factory):
    return seeded_store(tmp_path_factory.getbasetemp())


@pytest.fixture
def store_env(seeded, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", seeded.uri)
    monkeypatch.setenv("LOWRES_RUNS_DIR", str(seeded.runs_dir))
    monkeypatch.delenv("LOWRES_PROMETHEUS_URL", raising=False)
    return seeded


def _page(name: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=90).run()
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page(f"views/{name}.py").run()
    _ok(at, name)
    return at


def _ok(at: AppTest, name: str) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == [name.capitalize()]


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _charts(at: AppTest) -> int:
    return len(at.get("vega_lite_chart"))


def _chart_rows(chart) -> list[dict]:
    """The rows of a vega-lite chart's data (its Arrow datasets, read back)."""
    import pyarrow as pa

    return [r for ds in chart.proto.datasets for r in pa.ipc.open_stream(ds.data.data).read_all().to_pylist()]


def test_advisor_estimates_and_writes_the_run_config(store_env, tmp_path):
    from lowres.advisor import Candidate, estimate, largest_fitting_batch
    from lowres.config import load_config
    from lowres.hardware import load_profile
    from lowres.models import load_spec

    at = _page("advisor")
    assert _charts(at) >= 2  # memory breakdown with the limit, memory against batch size
    at.selectbox(key="adv_hw").set_value("a100-80g")
    at.selectbox(key="adv_model").set_value("tiny")
    at.select_slider(key="adv_rank").set_value(16)
    at.number_input(key="adv_batch").set_value(8)
    at.number_input(key="adv_seq").set_value(128)
    at.run()
    _ok(at, "advisor")
    cand = Candidate(lora_rank=16, batch_size=8, seq_len=128)
    hw, spec = load_profile("a100-80g"), load_spec("tiny")
    est = estimate(spec, hw, cand, headroom=0.10)
    shown = _metrics(at)
    assert shown["Predicted peak"] == f"{est.peak_bytes / GIB:.2f} GiB"
    assert shown["Usable memory"] == f"{est.budget_bytes / GIB:.2f} GiB"
    assert shown["Step time"] == f"{est.step_time_s:.3f} s"  # the A100 profile lists a roofline
    assert shown["Largest batch that fits"] == str(largest_fitting_batch(spec, hw, cand, headroom=0.10))
    assert _charts(at) == 3  # + step time against batch size
    grid = at.dataframe[0].value
    assert {"precision", "quant", "rank", "largest batch"} <= set(grid.columns) and len(grid) >= 4

    outside = tmp_path / "elsewhere" / "advised.yaml"  # the page writes only under its runs folder
    at.text_input(key="adv_path").set_value(str(outside))
    at.button(key="adv_write").click().run()
    assert not outside.exists() and any("outside the runs folder" in e.value for e in at.error)
    target = (store_env.runs_dir / "cfg" / "advised.yaml").resolve()
    at.text_input(key="adv_path").set_value("cfg/advised.yaml")
    at.button(key="adv_write").click().run()
    _ok(at, "advisor")
    assert any(str(target) in s.value for s in at.success)
    cfg = load_config(target, use_env=False)
    assert (cfg.model.name, cfg.lora.rank, cfg.train.batch_size, cfg.data.max_length) == ("tiny", 16, 8, 128)


def test_compare_lists_every_run_with_its_logged_figures(store_env):
    at = _page("compare")
    table = at.dataframe[0].value.set_index("run")
    assert set(table.index) == {"a", "b", "c"}
    for name, result in store_env.results.items():
        row = table.loc[name]
        assert row["run_id"] == result["run_id"]
        assert row["tokens_per_s"] == pytest.approx(result["tokens_per_s"], rel=1e-9)
        assert row["mfu"] == pytest.approx(result["mfu"], rel=1e-9)
        assert row["peak_memory_gib"] == pytest.approx(result["peak_rss_bytes"] / GIB, rel=1e-9)
        assert row["rank"] == (8 if name == "b" else 4) and row["model"] == "tiny" and row["steps"] == 4
    assert _metrics(at)["Runs shown"] == "3"
    assert _charts(at) == 4  # tokens/s, MFU, memory vs throughput, loss curves

    at.multiselect(key="cmp_rank").set_value([8]).run()
    _ok(at, "compare")
    assert list(at.dataframe[0].value["run"]) == ["b"]
    assert _metrics(at)["Runs shown"] == "1"


def test_regressions_compare_the_newest_run_with_its_baseline(store_env):
    from lowres.bench.stats import ratio_test

    queries = load_queries()
    at = _page("regressions")
    assert at.number_input(key="reg_threshold").value == pytest.approx(0.05)  # lowres regress's default
    at.number_input(key="reg_threshold").set_value(0.0).run()
    _ok(at, "regressions")
    table = at.dataframe[0].value
    # a and c share a config hash on one machine: c (newer) against a; b (rank 8) alone has no baseline
    group = table[table["baseline_runs"] == 1].iloc[0]
    assert (group["latest_run"], group["rank"]) == ("c", 4)
    runs = queries.training_runs(store_env.uri).set_index("run")
    assert group["config"] == runs.loc["c", "config_hash_tag"] == runs.loc["a", "config_hash_tag"]
    steps = queries.step_seconds(store_env.uri, (runs.loc["a", "run_id"], runs.loc["c", "run_id"]))
    t = ratio_test(steps[runs.loc["a", "run_id"]], steps[runs.loc["c", "run_id"]])  # as `lowres regress` judges
    assert group["ratio"] == pytest.approx(t.ratio) and group["low"] == pytest.approx(t.low)
    assert group["status"] == ("regression" if t.regressed(0.0) else "improved" if t.improved(0.0) else "no change")
    assert "no baseline" in set(table["status"])
    shown = _metrics(at)
    assert shown["Machine × config groups"] == "2" and shown["With a baseline"] == "1"

    at.number_input(key="reg_threshold").set_value(0.99).run()  # nothing takes twice the time
    _ok(at, "regressions")
    assert _metrics(at)["Regressions"] == "0" and at.success


def test_regression_rule_is_lowres_regress_rule():
    regressions = load_queries().regressions

    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    rows = [{"run": f"r{i}", "run_id": f"id{i}", "status": "FINISHED", "started": t0 + pd.Timedelta(minutes=i),
             "machine": "m", "fingerprint": "f", "config": "k", "model": "tiny", "precision": "fp32", "rank": 8,
             "batch": 4, "tokens_per_s": 100.0} for i in range(3)]
    rows.append({**rows[0], "run": "other", "run_id": "other", "config": "k2"})
    rows.append({**rows[0], "run": "running", "run_id": "running", "status": "RUNNING",
                 "started": t0 + pd.Timedelta(hours=1)})  # unfinished runs are not judged
    base = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0]
    steps = {"id0": base, "id1": base, "id2": [v * 1.2 for v in base], "other": base}
    table = regressions(pd.DataFrame(rows), 0.05, steps).set_index("config")
    assert table.loc["k", "latest_run"] == "r2" and table.loc["k", "baseline_runs"] == 2
    assert table.loc["k", "ratio"] == pytest.approx(1.2, rel=0.02) and table.loc["k", "status"] == "regression"
    assert table.loc["k2", "status"] == "no baseline"
    # 20 % slower is not a regression at a 25 % threshold; 5 % slower within the noise is "no change"
    assert regressions(pd.DataFrame(rows), 0.25, steps).set_index("config").loc["k", "status"] == "no change"
    noisy = {**steps, "id2": [1.3, 0.7, 1.2, 0.8, 1.05, 1.1]}
    assert regressions(pd.DataFrame(rows), 0.0, noisy).set_index("config").loc["k", "status"] == "no change"
    assert regressions(pd.DataFrame(rows), 0.05, {**steps, "id2": [1.0]}).set_index(
        "config").loc["k", "status"] == "too few steps"


def test_regressions_page_without_a_baseline_says_so(store_env, monkeypatch):
    queries = load_queries()
    one = queries.training_runs(store_env.uri).head(1)
    monkeypatch.setattr(queries, "training_runs", lambda uri: one)
    at = _page("regressions")
    assert _metrics(at)["With a baseline"] == "0" and not at.success
    assert any("Nothing to compare yet" in w.value for w in at.warning), [w.value for w in at.warning]


def test_live_reads_the_runs_jsonl_file(store_env):
    path = next(store_env.runs_dir.rglob("profile.jsonl"))
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    last_tps = [s["value"] for s in samples if s["name"] == "lowres_train_tokens_per_second"][-1]
    at = _page("live")
    assert str(path) in at.selectbox(key="live_file").options
    shown = _metrics(at)
    assert shown["tokens/s"] == f"{last_tps:,.0f}"
    assert shown["run RSS"].endswith("GiB") and shown["loss"] != "—"
    # CPU, memory, throughput, loss and the MLflow phase timings; no GPU here, so no GPU charts
    assert _charts(at) == 5
    assert any("no readings" in c.value for c in at.caption)
    assert any(store_env.results["a"]["run_id"] in c.value for c in at.caption)


def test_live_reads_prometheus_when_configured(store_env, monkeypatch):
    from profiler.reading import Sample
    from profiler.sinks.prometheus import PrometheusExporter

    exporter = PrometheusExporter(port=0)
    run = store_env.results["a"]["run_id"]
    labels = (("fingerprint", "test"), ("run", run))
    exporter.write([Sample(time.time(), "lowres_train_tokens_per_second", 1234.4, labels),
                    Sample(time.time(), "lowres_train_loss", 2.5, labels),
                    Sample(time.time(), "lowres_process_resident_memory_bytes", 2 * GIB, labels)])
    try:
        with prometheus_server([f"127.0.0.1:{exporter.port}"]) as prom:
            from urllib.request import urlopen

            wait_until(lambda: json.load(urlopen(f"{prom}/api/v1/query?query=lowres_train_loss"))["data"]["result"],
                       30, "Prometheus to scrape the exporter")
            monkeypatch.setenv("LOWRES_PROMETHEUS_URL", prom)
            at = _page("live")
            assert at.selectbox(key="live_run").options == [run]
            shown = _metrics(at)
            assert (shown["tokens/s"], shown["loss"], shown["run RSS"]) == ("1,234", "2.5000", "2.00 GiB")
    finally:
        exporter.close()


def test_federations_show_rounds_bytes_failures_and_client_health(store_env):
    at = _page("federations")
    at.number_input(key="fed_offline").set_value(3600).run()
    _ok(at, "federations")
    shown = _metrics(at)
    assert (shown["Federations"], shown["Running"], shown["Clients online"], shown["Clients offline"]) == \
        ("2", "1", "2", "0")
    feds = at.dataframe[0].value.set_index("federation")
    alpha, beta = feds.loc["alpha"], feds.loc["beta"]
    assert (alpha["status"], alpha["rounds"], alpha["failures"]) == ("RUNNING", 3, 1)
    assert (alpha["health"], beta["health"]) == ("running", "finished")  # alpha's server (this process) beats
    assert alpha["eval_loss"] == pytest.approx(2.7) and beta["eval_loss"] == pytest.approx(2.25)
    assert alpha["bytes_sent"] == 2 * 6000  # running: the rounds' bytes_down added up
    assert beta["bytes_sent"] == 6000 and beta["bytes_received"] == 2400  # closed: the monitor's totals
    clients = at.dataframe[1].value
    rows = {(f, c): (h, fails, up) for f, c, h, fails, up in
            zip(clients["federation"], clients["client"], clients["health"], clients["failures"], clients["bytes_up"])}
    assert rows == {("alpha", "c1"): ("online", 0, 2400), ("alpha", "c2"): ("online", 1, 1600),
                    ("beta", "c1"): ("finished", 0, 2400)}
    assert _charts(at) >= 4  # eval loss, train loss, round time, bytes, clients …
    # evaluation per round: centralised beside federated, loss and token accuracy, one line per federation
    evals = [c for c in at.get("vega_lite_chart") if "strokeDash" in c.proto.spec]
    assert len(evals) == 2
    acc = next(c for c in evals if "token accuracy" in c.proto.spec)
    got = {(r["federation"], r["eval"], r["step"]): round(r["value"], 6) for r in _chart_rows(acc)}
    assert got[("alpha", "centralised", 3)] == 0.3 and got[("beta", "federated", 2)] == 0.1

    # silent for more than 5 s: alpha's clients go offline, beta's finished client stays finished
    time.sleep(max(0.0, 6.0 - (time.time() - store_env.federations_at)))
    at.number_input(key="fed_offline").set_value(5).run()
    _ok(at, "federations")
    assert (_metrics(at)["Clients online"], _metrics(at)["Clients offline"]) == ("0", "2")


def test_client_health_prefers_prometheus_last_reports():
    health = load_queries().client_health
    clients = pd.DataFrame({"federation": ["f", "f", "f", "f"], "client": ["a", "b", "c", "d"],
                            "status": ["RUNNING", "RUNNING", "FAILED", "FINISHED"],
                            "last_report_s": [990.0, 800.0, 995.0, 100.0]})
    out = health(clients, offline_after_s=60, now=1000.0)
    assert list(out["health"]) == ["online", "offline", "offline", "finished"]
    out = health(clients, offline_after_s=60, now=1000.0, prometheus_last={("f", "b"): 999.0, ("f", "a"): 900.0})
    assert list(out["health"]) == ["offline", "online", "offline", "finished"]


def test_pages_on_an_empty_store_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    monkeypatch.setenv("LOWRES_RUNS_DIR", str(tmp_path / "no-runs"))
    monkeypatch.delenv("LOWRES_PROMETHEUS_URL", raising=False)
    expected = {"live": "No running or recent job", "compare": "No MLflow store at",
                "regressions": "No MLflow store at", "federations": "No MLflow store at"}
    for page, text in expected.items():
        at = _page(page)
        assert any(text in i.value for i in at.info), (page, [i.value for i in at.info])
    assert not (tmp_path / "empty.db").exists()  # reading a store that is not there does not create one
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'empty.db'}").search_experiments()  # a store now, with no runs
    expected.update(compare="No training runs", regressions="No finished training runs",
                    federations="No federations yet")
    for page, text in expected.items():
        at = _page(page)
        assert any(text in i.value for i in at.info), (page, [i.value for i in at.info])
