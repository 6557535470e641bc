"""`lowres bench` writes one tagged MLflow run per workload with its step-time series, and `lowres compare`
tabulates and plots them. No timing is asserted: only that the figures exist, are sane and read back."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from lowres.bench import measure
from lowres.bench.suite import TAG_PRECISION, TAG_PRESET, TAG_SESSION, TAG_SUITE, TAG_WORKLOAD
from lowres.bench.workloads import SUITES, suite_workloads, workload_overrides
from lowres.cli.bench import bench, compare
from lowres.config import load_config
from lowres.errors import UsageError
from lowres.tracking import runs


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOWRES_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lowres-cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: whole names, no wrapping to 80 columns


def _cli(*args: str):
    app = typer.Typer()
    app.command("bench")(bench)
    app.command("compare")(compare)
    res = CliRunner().invoke(app, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


def test_figures_drop_warmup_and_cut_repeats():
    history = [{"step_seconds": s, "tokens": 100, "peak_memory_bytes": 1000 + i}
               for i, s in enumerate([9.0, 9.0, 1.0, 1.0, 0.5, 0.5])]
    f = measure.figures(history, warmup=2, steps_per_repeat=2, flops_per_token=10.0, peak_flops_per_s=1e4)
    assert f.step_seconds == [1.0, 1.0, 0.5, 0.5] and f.tokens_per_s == [100.0, 200.0]
    assert f.mfu == [0.1, 0.2] and f.peak_memory_bytes == [1002, 1003, 1004, 1005]
    s = f.summary()
    assert s["tokens_per_second_median"] == 150.0 and s["peak_memory_bytes_max"] == 1005 and s["repeats"] == 2
    keys = {k for k, *_ in measure.points(f, 0)}
    assert {measure.STEP_SECONDS, measure.PEAK_MEMORY, measure.TOKENS_PER_SECOND, measure.MFU} <= keys
    with pytest.raises(ValueError, match="fewer than one repeat"):
        measure.figures(history[:3], warmup=2, steps_per_repeat=2, flops_per_token=1.0, peak_flops_per_s=None)


def test_suites_are_fixed_configs_whose_hash_ignores_repeats_and_paths(tmp_path):
    assert {w.precision for w in SUITES["full"]} == {"fp32", "bf16", "nf4"}
    assert {w.preset for w in SUITES["quick"]} == {"tiny"} and len({w.rank for w in SUITES["quick"]}) == 2
    w = SUITES["quick"][0]
    a = load_config(None, workload_overrides(w, out_dir=tmp_path / "a", experiment="x", tracking_uri=None,
                                             run_name="a"), use_env=False)
    b = load_config(None, workload_overrides(w, out_dir=tmp_path / "b", experiment="y", tracking_uri="sqlite:///z",
                                             run_name="b"), use_env=False)
    assert a.config_hash() == b.config_hash()
    with pytest.raises(UsageError, match="unknown benchmark suite"):
        suite_workloads("huge")
    with pytest.raises(UsageError, match="no workload"):
        suite_workloads("quick", ["nothing-like-this"])


def test_bench_quick_subset_writes_tagged_runs_then_compare(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    only = "tiny-fp32-r4"
    res = _cli("bench", "--suite", "quick", "--repeats", "1", "--workload", only, "--tracking-uri", uri)
    print(res.output)
    assert res.exit_code == 0, res.output
    c = runs.client(uri)
    exp = c.get_experiment_by_name("lowres-bench")
    found = c.search_runs([exp.experiment_id])
    assert len(found) == 1
    run = found[0]
    t = run.data.tags
    w = next(w for w in SUITES["quick"] if only in w.name)
    assert (t[TAG_SUITE], t[TAG_WORKLOAD], t[TAG_PRESET], t[TAG_PRECISION]) == ("quick", w.name, "tiny", "fp32")
    assert t[TAG_SESSION] and run.info.status == "FINISHED"
    assert t[runs.TAG_FINGERPRINT] and t[runs.TAG_TIER] and t[runs.TAG_VERSION_PREFIX + "torch"]
    cfg = load_config(None, workload_overrides(w, out_dir=tmp_path, experiment="e", tracking_uri=None, run_name="n"),
                      use_env=False)
    assert t[runs.TAG_CONFIG_HASH] == cfg.config_hash()
    sha = runs.git_sha()
    assert t.get(runs.TAG_GIT_SHA) == sha  # None outside a git checkout: then the tag is absent
    steps = c.get_metric_history(run.info.run_id, measure.STEP_SECONDS)
    assert sorted(m.step for m in steps) == list(range(1, w.steps + 1)) and all(m.value > 0 for m in steps)
    assert len(c.get_metric_history(run.info.run_id, measure.PEAK_MEMORY)) == w.steps
    m = run.data.metrics
    assert m[measure.SUMMARY_PREFIX + "tokens_per_second_median"] > 0
    # MFU > 0 only: its roofline is measured on this machine, and under contention it can come out low
    assert m[measure.SUMMARY_PREFIX + "mfu_ratio_median"] > 0
    assert m[measure.SUMMARY_PREFIX + "peak_memory_bytes_max"] > 1e7  # a Python process with torch: > 10 MB

    png = tmp_path / "compare.png"
    res = _cli("compare", "--tracking-uri", uri, "--preset", "tiny", "--plot", str(png))
    assert res.exit_code == 0, res.output
    assert w.name in res.output and t[runs.TAG_FINGERPRINT] in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = _cli("compare", "--group", "--tracking-uri", uri, "--precision", "nf4")
    assert res.exit_code == 0 and "no finished benchmark runs" in res.output
