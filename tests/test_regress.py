"""`lowres regress` on synthetic MLflow runs with known distributions: a clear 10 % shift is flagged, equal
distributions are not, runs of another config or machine are refused, and the exit codes say so."""

from __future__ import annotations

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from lowres.bench import measure
from lowres.bench.stats import ratio_test
from lowres.cli.bench import regress
from lowres.errors import LowresError
from lowres.tracking.runs import TAG_CONFIG_HASH, TAG_FINGERPRINT, TAG_GIT_SHA, TAG_VERSION_PREFIX

EXPERIMENT = "lowres-bench"
SHA_A, SHA_B = "a" * 40, "b" * 40


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def make_run(uri: str, *, seed: int, scale: float = 1.0, memory_scale: float = 1.0, config: str = "cfg1",
             fingerprint: str = "fp1", sha: str = SHA_A, torch: str = "2.13.0", n: int = 200, session: str = "s"):
    """A finished bench run whose step times are lognormal around 0.1 s × ``scale`` (10 % spread)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else c.create_experiment(EXPERIMENT)
    tags = {TAG_CONFIG_HASH: config, TAG_FINGERPRINT: fingerprint, TAG_GIT_SHA: sha,
            TAG_VERSION_PREFIX + "torch": torch, "lowres.bench.workload": "tiny-fp32-r4-s64",
            "lowres.bench.session": session}
    run = c.create_run(exp_id, tags=tags)
    rng = np.random.default_rng(seed)
    steps = 0.1 * scale * rng.lognormal(0.0, 0.1, n)
    memory = 7e8 * memory_scale + rng.integers(0, 1 << 20, n)
    metrics = [Metric(measure.STEP_SECONDS, float(v), 0, i) for i, v in enumerate(steps, 1)]
    metrics += [Metric(measure.PEAK_MEMORY, float(v), 0, i) for i, v in enumerate(memory, 1)]
    c.log_batch(run.info.run_id, metrics=metrics, params=[])
    c.set_terminated(run.info.run_id)
    return run.info.run_id


def cli(store: str, *args: str) -> tuple[int, str]:
    """Run `regress` as the CLI does; typed errors map to their exit codes as in lowres.cli.app."""
    app = typer.Typer()
    app.command("regress")(regress)
    app.command("noop")(lambda: None)  # two commands, so typer keeps `regress` as a subcommand name
    res = CliRunner().invoke(app, ["regress", *args, "--tracking-uri", store])
    if isinstance(res.exception, LowresError):
        return res.exception.exit_code, str(res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


def test_hodges_lehmann_ratio_and_its_interval_cover_the_truth():
    rng = np.random.default_rng(1)
    base, cand = rng.lognormal(0, 0.1, 300), 1.1 * rng.lognormal(0, 0.1, 300)
    a = ratio_test(base, cand)
    assert a == ratio_test(base, cand)  # no resampling: same data, same answer
    assert a.low < 1.1 < a.high and a.regressed(0.05) and a.p_value < 1e-6
    same = ratio_test(base, rng.lognormal(0, 0.1, 300))
    assert same.low < 1 < same.high and not same.regressed(0.05) and same.p_value > 0.001
    # the 95 % interval covers the true ratio in about 95 % of repeated experiments
    hits = 0
    for _ in range(300):
        t = ratio_test(rng.lognormal(0, 0.2, 40), 1.07 * rng.lognormal(0, 0.2, 40))
        hits += t.low <= 1.07 <= t.high
    assert 0.90 <= hits / 300 <= 0.99
    with pytest.raises(ValueError, match="at least 2"):
        ratio_test([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        ratio_test([1.0, 0.0], [1.0, 2.0])


def test_a_two_mode_machine_moves_the_median_ratio_not_the_hodges_lehmann_one():
    """Steps at two speeds (a neighbour's job on and off): 10 % slower everywhere, but the candidate caught
    fewer slow-mode steps. The ratio of medians jumps between the modes; Hodges–Lehmann stays near 1.1."""
    rng = np.random.default_rng(3)
    base = np.r_[rng.normal(80, 2, 45), rng.normal(100, 2, 55)]
    cand = 1.1 * np.r_[rng.normal(80, 2, 55), rng.normal(100, 2, 45)]
    t = ratio_test(base, cand)
    assert np.median(cand) / np.median(base) < 1.0  # the medians sit in different modes: "faster"
    assert 1.07 < t.ratio < 1.12
    assert t.regressed(0.05)


def test_large_samples_are_thinned_not_refused():
    rng = np.random.default_rng(4)
    t = ratio_test(rng.lognormal(0, 0.1, 5000), 1.2 * rng.lognormal(0, 0.1, 5000))
    assert t.n_baseline == t.n_candidate == 5000 and t.low < 1.2 < t.high and t.high / t.low < 1.05


def test_a_ten_percent_slowdown_exits_1_and_says_what_changed(store):
    base = make_run(store, seed=1)
    slow = make_run(store, seed=2, scale=1.10, sha=SHA_B, torch="2.14.0")
    code, out = cli(store, "--baseline", base, "--candidate", slow, "--metric", "step_time")
    print(out)
    assert code == 1, out
    assert "REGRESSION" in out and "1 regression" in out
    assert "2.13.0" in out and "2.14.0" in out and "lowres.git_sha" in out  # what changed


def test_a_rerun_of_the_same_code_exits_0(store):
    base, rerun = make_run(store, seed=1), make_run(store, seed=3)
    code, out = cli(store, "--baseline", base, "--candidate", rerun)
    assert code == 0, out
    assert "0 regressions" in out and "REGRESSION" not in out


def test_peak_memory_growth_is_flagged(store):
    base, hungry = make_run(store, seed=1), make_run(store, seed=1, memory_scale=1.2)
    assert cli(store, "-b", base, "-c", hungry, "--metric", "step_time")[0] == 0  # same step times
    code, out = cli(store, "-b", base, "-c", hungry, "--metric", "peak_memory")
    assert code == 1 and "peak_memory" in out


def test_other_config_or_machine_is_refused_with_exit_2(store):
    base = make_run(store, seed=1)
    other_cfg = make_run(store, seed=2, scale=2.0, config="cfg2")
    other_machine = make_run(store, seed=2, scale=2.0, fingerprint="fp2")
    for cand in (other_cfg, other_machine):
        code, msg = cli(store, "--baseline", base, "--candidate", cand)
        assert code == 2 and "share no config hash and hardware fingerprint" in msg, msg
    for bad, expected in ((("--baseline", "nonsense selector"), "cannot read the selector"),
                          (("--baseline", "c" * 12), "git sha starting with"),
                          (("--baseline", "tags.lowres.git_sha = 'nope'"), "matches no run"),
                          (("--baseline", base, "--metric", "energy"), "unknown metric")):
        args = list(bad) + (["--candidate", other_cfg] if "--candidate" not in bad else [])
        code, msg = cli(store, *args)
        assert code == 2 and expected in msg, (bad, msg)


def test_git_sha_tag_filter_latest_and_previous(store):
    make_run(store, seed=1, session="old")
    make_run(store, seed=4, session="old", config="cfg2")  # another workload of the same session
    make_run(store, seed=2, scale=1.10, sha=SHA_B, session="new")
    # by git sha (a prefix) and by tag filter: the old session holds two configs, one has a partner
    code, out = cli(store, "-b", SHA_A[:8], "-c", f"tags.`{TAG_GIT_SHA}` = '{SHA_B}'", "--metric", "step_time")
    assert code == 1 and "not compared" in out, out
    # latest = the newest session; previous = the newest earlier run of each of its configs
    code, out = cli(store, "-b", "previous", "-c", "latest", "--metric", "step_time")
    assert code == 1 and "REGRESSION" in out, out
