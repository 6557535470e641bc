"""The search, calibration, advice and `lowres tune`: laptop vs A100 through the whole search (probes faked
from the estimate, so it runs instantly), refusals, the calibration fit and cache, and one real
`tune --auto --dry-run` on `tiny` that writes a config load_config reads back."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from lowres.advisor import advice
from lowres.advisor import calibrate as C
from lowres.advisor.estimate import Candidate, estimate
from lowres.advisor.probe import ProbeResult
from lowres.advisor.search import DoesNotFitError, Searcher, divisors, parse_objective, search
from lowres.config import load_config
from lowres.errors import UsageError
from lowres.hardware import Roofline, load_profile
from lowres.models import load_spec

GIB = 1024**3


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRES_CACHE_DIR", str(tmp_path / "cache"))


def _app():
    from lowres.cli.tune import tune

    app = typer.Typer()
    app.command()(tune)
    app.command("noop")(lambda: None)
    return app


def _fake_probe(searcher_ref: list, slowdown: float = 1.0):
    """A probe that 'measures' the uncalibrated estimate (so the search runs on any profile, instantly)."""
    def fake(cfg, cap_bytes, steps, warmup, timeout_s):
        s = searcher_ref[0]
        est = s.predict(Candidate.from_run_config(cfg), calibrated=False)
        step = (est.step_time_s or 1.0) * slowdown * cfg.train.grad_accum
        return ProbeResult(fits=est.peak_bytes <= cap_bytes, peak_rss_bytes=int(est.peak_bytes), step_s=step,
                           tokens_per_s=est.tokens_per_step * cfg.train.grad_accum / step, cap_bytes=cap_bytes,
                           reason="fake")
    return fake


def _search_on(profile: str, objective: str = "fastest"):
    spec = load_spec("SmolLM2-135M")
    hw = load_profile(profile)
    cfg = load_config(None, ["model.name=SmolLM2-135M", "data.max_length=1024", "train.batch_size=64"],
                      use_env=False)
    rl = hw.roofline or Roofline(fp32_flops=3e11, bf16_flops=3e11, mem_bandwidth_bytes_s=3e10, source="measured")
    ref: list = []
    s = Searcher(spec, hw, cfg, roofline=rl, probe_fn=_fake_probe(ref), record=False)
    ref.append(s)
    return s, search(s, objective)


def test_laptop_and_a100_choices_differ_on_the_numbers():
    laptop_s, laptop = _search_on("laptop-8g-avx2")
    a100_s, a100 = _search_on("a100-80g")
    # same effective batch (64 sequences of 1024 tokens) everywhere, made up by accumulation
    for ch in (laptop, a100):
        assert ch.candidate.batch_size * ch.grad_accum == 64
    assert laptop.candidate.compute == "fp32"            # bf16 is emulated on an AVX2-only CPU
    assert a100.candidate.compute == "bf16"              # compute capability 8.0: native bf16
    assert laptop.candidate.batch_size <= 4 < 32 <= a100.candidate.batch_size
    assert laptop.trial.probe.peak_rss_bytes <= laptop_s.limit < a100.trial.probe.peak_rss_bytes
    assert laptop.candidate.quant == a100.candidate.quant == "none"
    # verified, not blindly doubled: at most two probes per precision
    assert len(laptop.trials) <= 2 * 1 and len(a100.trials) <= 2 * 2
    assert any("tokens/s" in r for r in laptop.reasons)


def test_smallest_objective_picks_micro_batch_one():
    _, ch = _search_on("laptop-8g-avx2", "smallest")
    assert ch.candidate.batch_size == 1 and ch.grad_accum == 64


def test_a_time_budget_too_short_cuts_max_steps():
    _, ch = _search_on("a100-80g", "time:0.5")
    step = ch.trial.probe.step_s
    assert ch.max_steps == max(1, int(0.5 // step)) and any("max_steps is cut" in r for r in ch.reasons)
    _, roomy = _search_on("a100-80g", "time:1e9")
    assert roomy.max_steps is None and "within" in roomy.reasons[0]


def test_a_model_too_large_is_refused_with_its_footprint():
    spec = load_spec("Llama-3.2-1B")
    hw = load_profile("laptop-8g-avx2")
    cfg = load_config(None, ["model.name=Llama-3.2-1B"], use_env=False)
    s = Searcher(spec, hw, cfg, budget_bytes=1 * GIB, record=False, probe_fn=lambda *a, **k: pytest.fail("probed"))
    with pytest.raises(DoesNotFitError) as err:
        search(s)
    msg = str(err.value)
    assert "Llama-3.2-1B" in msg and "does not fit in 1.00 GiB" in msg
    needs = float(msg.split("needs ")[1].split(" GiB")[0])
    # 1.2B parameters at 4 bits plus fp32 embeddings (~1.5 GiB), the fp32 copy quantizing leaves (~3.6 GiB)
    # and the runtime: well above the budget, well below the 4.9 GiB of fp32 weights plus all of that
    assert 4.0 < needs < 8.0
    assert err.value.exit_code == 2


def test_cli_refusals_exit_2(tmp_path):
    runner = CliRunner()
    big = runner.invoke(_app(), ["tune", "--auto", "--model", "Llama-3.2-1B", "--memory-budget", "1GB",
                                 "--dry-run", "--no-mlflow", "--out", str(tmp_path / "x.yaml")])
    assert isinstance(big.exception, DoesNotFitError) and big.exception.exit_code == 2
    huge = runner.invoke(_app(), ["tune", "--auto", "--memory-budget", "100TB", "--dry-run", "--no-mlflow"])
    assert isinstance(huge.exception, UsageError) and "larger than this machine" in str(huge.exception)
    unknown = runner.invoke(_app(), ["tune", "--auto", "--model", "nobody/no-such-model-xyz", "--dry-run",
                                     "--no-mlflow"])
    assert isinstance(unknown.exception, UsageError) and "no-such-model-xyz" in str(unknown.exception)
    assert not (tmp_path / "x.yaml").exists()


def test_calibration_fit_recovers_runtime_and_allocator_and_is_cached():
    pts = [C.ProbePoint(candidate={"quant": "none", "batch_size": b}, transient_bytes=t, persistent_bytes=3e8,
                        predicted_peak_bytes=450e6 + 3e8 + 1.85 * t, predicted_step_s=0.1 * b,
                        measured_peak_bytes=600e6 + 3e8 + 1.4 * t, measured_step_s=0.05 + 0.2 * b, fits=True)
           for b, t in ((1, 200e6), (4, 800e6))]
    cal = C.fit_calibration(pts)
    assert cal.runtime_bytes == pytest.approx(600e6) and cal.allocator_scale == pytest.approx(1.4)
    assert cal.step_overhead_s == pytest.approx(0.05) and cal.time_factor == pytest.approx(2.0)
    spec, hw = load_spec("tiny"), load_profile("laptop-8g-avx2")
    est = estimate(spec, hw, Candidate(compute="fp32", batch_size=2, seq_len=64), calibration=cal)
    persistent = est.live_tensor_bytes - est.transient_bytes
    assert est.peak_bytes == pytest.approx(600e6 + persistent + 1.4 * 1.85 * est.transient_bytes)
    C.record_points("abc", "tiny", pts)
    assert C.cache_path().is_file() and len(C.load_points("abc", "tiny")) == 2
    C.record_points("abc", "tiny", pts[:1])  # the same candidate again replaces, not duplicates
    assert len(C.load_points("abc", "tiny")) == 2
    assert C.load_calibration("other", "tiny").source == "uncalibrated"


def test_rank_and_federated_advice_give_numbers():
    spec = load_spec("SmolLM2-135M")
    assert advice.rank_for_data(spec, 100_000)[0] == 8
    assert advice.rank_for_data(spec, 400_000_000)[0] == 64
    per_rank = advice.lora_round_bytes(spec, 1, "attention_mlp")
    rank, why = advice.federated_rank(spec, 10.5 * per_rank)
    assert rank == 10 and "MB" in why[0]
    assert advice.lora_round_bytes(spec, rank, "attention_mlp") <= 10.5 * per_rank
    assert advice.federated_rank(spec, per_rank / 2)[0] is None
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert parse_objective("time:90") == ("time", 90.0)
    with pytest.raises(UsageError):
        parse_objective("quickest")


def test_tune_auto_dry_run_on_tiny_writes_a_loadable_config(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "chosen.yaml"
    result = CliRunner().invoke(_app(), ["tune", "--auto", "--dry-run", "--model", "tiny", "--out", str(out), "--seq-len", "64",
                                         "--effective-batch", "4", "--probe-steps", "3",
                                         "--set", "data.sample=instructions", "--set", "data.tokenizer_vocab=1024"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, (result.output, result.exception)
    cfg = load_config(out, use_env=False)
    assert cfg.model.name == "tiny" and cfg.data.max_length == 64
    assert cfg.train.batch_size * cfg.train.grad_accum == 4
    text = out.read_text()
    assert text.startswith("# chosen by `lowres tune --auto`") and "tokens/s" in text
    # one parent run, a child per probe with predicted and measured figures side by side
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("lowres").experiment_id])
    parents = [r for r in runs if r.data.tags.get("lowres.command") == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and children
    m = children[0].data.metrics
    for key in ("predicted_peak_bytes", "measured_peak_bytes", "predicted_step_s", "measured_step_s"):
        assert m[f"advisor/{key}"] > 0
    # the probes calibrated this machine: the next advice starts from them
    assert C.cache_path().is_file()


def test_calibration_keeps_a_time_factor_per_compute_dtype():
    """fp32 probes run at 1.5x their prediction, bf16 at 3x: each dtype's prediction gets its own factor."""
    def point(compute, b, k):
        return C.ProbePoint(candidate={"quant": "none", "compute": compute, "batch_size": b}, transient_bytes=1e8 * b,
                            persistent_bytes=3e8, predicted_peak_bytes=1e9, predicted_step_s=0.1 * b,
                            measured_peak_bytes=1e9, measured_step_s=0.02 + k * 0.1 * b, fits=True)

    cal = C.fit_calibration([point("bf16", 1, 3.0), point("bf16", 4, 3.0), point("fp32", 2, 1.5)])
    assert cal.step_overhead_s == pytest.approx(0.02)
    assert cal.time_factor_for("none", "bf16") == pytest.approx(3.0)
    assert cal.time_factor_for("none", "fp32") == pytest.approx(1.5, rel=1e-3)
    assert cal.time_factor_for("none", "fp16") == cal.time_factor == pytest.approx(3.0)  # the most probed dtype


def test_a_close_call_is_probed_again_and_decided_on_pooled_steps():
    """Micro-batch 1 looks 5 % faster in one probe, but a second probe of each says otherwise: the runoff
    pools both probes' steps and picks micro-batch 2. A clear winner is not probed again."""
    calls: dict[int, int] = {}
    steps_by_batch = {1: [1.00, 1.30], 2: [1.05, 1.05], 4: [2.0, 2.0]}

    def probe_fn(cfg, cap_bytes, steps, warmup, timeout_s):
        b = cfg.train.batch_size
        i = calls[b] = calls.get(b, 0) + 1
        step = steps_by_batch[b][i - 1]
        tokens = b * cfg.data.max_length * cfg.train.grad_accum
        return ProbeResult(fits=True, peak_rss_bytes=10**9, step_s=step, tokens_per_s=tokens / step,
                           step_times=[9.0] * warmup + [step] * 3, cap_bytes=cap_bytes, reason="fake")

    spec, hw = load_spec("tiny"), load_profile("laptop-8g-avx2")
    cfg = load_config(None, ["model.name=tiny", "data.max_length=64", "train.batch_size=4"], use_env=False)
    s = Searcher(spec, hw, cfg, roofline=Roofline(fp32_flops=3e11, bf16_flops=3e11, source="measured"),
                 probe_fn=probe_fn, record=False)
    base = s.base.model_copy(update={"compute": "fp32", "quant": "none"})
    one, two, four = (s.run_probe(base.model_copy(update={"batch_size": b})) for b in (1, 2, 4))
    assert one.tokens_per_s > two.tokens_per_s
    assert s.faster(one, two) is two and calls == {1: 2, 2: 2, 4: 1}
    assert one.probes == two.probes == 2 and one.probe.step_s == pytest.approx(1.15)
    assert s.faster(two, four) is two and calls[4] == 1  # twice as fast: no runoff


def test_a_time_budget_stops_optional_probes_after_the_first_verified_setting(monkeypatch):
    """With a probe deadline, the predicted-fastest precision is probed first and, once the deadline has passed,
    no neighbour, other precision or runoff starts; the reasons say what was left out. Without one, the same
    search probes more."""
    import lowres.advisor.search as S

    spec, hw = load_spec("SmolLM2-135M"), load_profile("a100-80g")
    cfg = load_config(None, ["model.name=SmolLM2-135M", "data.max_length=1024", "train.batch_size=64"], use_env=False)
    rl = hw.roofline or Roofline(fp32_flops=3e11, bf16_flops=6e11, mem_bandwidth_bytes_s=3e10, source="measured")
    clock = [0.0]
    monkeypatch.setattr(S.time, "monotonic", lambda: clock[0])

    def run(deadline):
        ref: list = []
        fake = _fake_probe(ref)

        def probe_fn(*a, **k):
            clock[0] += 60.0  # each probe "takes" a minute
            return fake(*a, **k)
        s = Searcher(spec, hw, cfg, roofline=rl, probe_fn=probe_fn, record=False, probe_deadline=deadline)
        ref.append(s)
        return search(s, "fastest")

    free = run(None)
    clock[0] = 0.0
    tight = run(30.0)  # the deadline passes during the first probe
    assert len(tight.trials) == 1 < len(free.trials)
    # the one probed is the predicted-fastest precision (bf16 on an A100), and it is what was chosen
    assert tight.candidate.compute == "bf16" and tight.trial is tight.trials[0]
    assert any(r.startswith("time budget: probing stopped") and "fp32/none" in r for r in tight.reasons)
