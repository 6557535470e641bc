"""`lowres tune --auto` as a function: detect → estimate → probe → choose → write the RunConfig → train.

    result = tune(cfg, objective="fastest", dry_run=True, out="chosen.yaml")
    result.config        # the chosen RunConfig (also written to ``out``, its reasons as comments)
    result.choice.reasons

One MLflow parent run holds the search; each probe is a child run (tag ``mlflow.parentRunId``) with the
predicted and measured figures side by side: ``advisor/predicted_peak_bytes``, ``advisor/measured_peak_bytes``,
``advisor/predicted_step_s``, ``advisor/measured_step_s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lowres.advisor import advice
from lowres.advisor.calibrate import load_calibration, machine_roofline
from lowres.advisor.estimate import Candidate, estimate
from lowres.advisor.search import GIB, Choice, Searcher, Trial, parse_objective, refuse_if_nothing_fits, search
from lowres.errors import UsageError


@dataclass
class TuneResult:
    config: Any
    choice: Choice
    yaml_text: str
    out_path: str | None
    seconds: float
    reasons: list[str]
    parent_run_id: str | None = None
    train_result: Any = None
    hardware: Any = None
    extra: dict = field(default_factory=dict)


def run_config_for(base_cfg: Any, cand: Candidate, grad_accum: int, max_steps: int | None = None) -> Any:
    """``base_cfg`` with the candidate's knobs set: precision, quantization, rank, targets, micro-batch,
    gradient accumulation, sequence length, checkpointing, loss chunks, optimizer."""
    data = base_cfg.model_dump()
    targets = cand.lora_targets if isinstance(cand.lora_targets, str) else list(cand.lora_targets)
    data["precision"].update(compute=cand.compute, weights="auto", quant=cand.quant,
                             double_quant=cand.double_quant, gradient_checkpointing=cand.gradient_checkpointing)
    data["lora"].update(rank=cand.lora_rank, targets=targets)
    data["data"]["max_length"] = cand.seq_len
    data["train"].update(batch_size=cand.batch_size, grad_accum=grad_accum,
                         loss_chunk_tokens=cand.loss_chunk_tokens, optimizer=cand.optimizer)
    if max_steps is not None:
        data["train"]["max_steps"] = max_steps
    return type(base_cfg).model_validate(data)


def budget_for(hw: Any, budget_bytes: float | None) -> float:
    """The memory budget: the one asked for, refused when larger than what this machine has available."""
    usable = float(hw.usable_memory_bytes())
    if budget_bytes is None:
        return usable
    if budget_bytes <= 0:
        raise UsageError(f"memory budget must be positive, got {budget_bytes:.0f} bytes")
    if budget_bytes > usable:
        raise UsageError(
            f"memory budget {budget_bytes / GIB:.2f} GiB is larger than this machine's available memory "
            f"({usable / GIB:.2f} GiB of {hw.memory.total_bytes / GIB:.1f} GiB installed)",
            hint="give a budget at most that size, or leave it out to use what is available")
    return float(budget_bytes)


def tune(cfg: Any, *, objective: str = "fastest", budget_bytes: float | None = None, headroom: float = 0.10,
         rank: int | None = None, out: str | Path | None = None, dry_run: bool = False,
         on_trial: Callable[[str, Trial], None] | None = None, probe_steps: int = 5, hw: Any = None,
         probe_fn: Callable | None = None, console: Any = None, round_bytes: float | None = None,
         time_budget_s: float | None = None) -> TuneResult:
    """Choose a RunConfig for ``cfg``'s model and data on this machine, write it to ``out``, and train with
    it unless ``dry_run``. ``rank`` None: advised from the data size and budget, or for a federated client
    from ``round_bytes`` (bytes it may move per round, both ways: rank and uplink codec chosen together from
    measured message sizes, ``lowres.advisor.fedbudget``; the codec in ``result.extra["fed"]`` and the reasons). ``time_budget_s``: tune and training together
    should end within it — max_steps is cut to what the chosen setup's measured step time allows."""
    from lowres.hardware import detect
    from lowres.models import locate_weights

    t0 = time.perf_counter()
    parse_objective(objective)  # UsageError before any work
    if not 0.0 <= headroom < 1.0:
        raise UsageError(f"headroom must be in [0, 1), got {headroom}")
    hw = hw or detect()
    budget = budget_for(hw, budget_bytes)
    spec = locate_weights(cfg.model).spec  # ModelError: unknown model offline
    calibration = load_calibration(hw.fingerprint, spec.name)
    # A hopeless request is refused from the memory estimate alone, before measuring anything.
    refuse_if_nothing_fits(Searcher(spec, _with_budget(hw, budget), cfg, headroom=headroom, budget_bytes=budget,
                                    calibration=calibration, record=False))
    # only the dtypes this machine will train in are measured, each within seconds (never an emulated bf16)
    # (bitsandbytes' dequantisation rates are left to the probes: quantized bases are probed only when nothing
    # unquantized fits, and a probe measures them better than a microbenchmark would)
    roofline = machine_roofline(spec, hw.fingerprint, hw=hw, seq_len=cfg.data.max_length, quant=False)
    bf16 = f"{roofline.bf16_flops / 1e9:.0f} GFLOP/s" if roofline.bf16_flops else "not measured (emulated here)"
    reasons = [f"machine {hw.tier} ({hw.fingerprint}): budget {budget / GIB:.2f} GiB, {headroom:.0%} kept free; "
               f"roofline fp32 {roofline.fp32_flops / 1e9:.0f} GFLOP/s, bf16 {bf16}; "
               f"calibration: {calibration.source}"]
    fed_choice = None
    if rank is None and round_bytes:
        # rank and codec together, from the serialised bytes of a round's messages (lowres.advisor.fedbudget)
        from lowres.advisor import fedbudget

        fed_choice, why = fedbudget.advise(spec, cfg, round_bytes)
        if fed_choice is None:
            raise UsageError(why[-1])
        rank = fed_choice.rank
        reasons += why
    if rank is None:
        rank, why = advice.rank_for_data(spec, advice.data_bytes(cfg.data), _targets_name(cfg))
        reasons += why
        smallest = Candidate.from_run_config(cfg).model_copy(update={"batch_size": 1, "gradient_checkpointing": True})
        rank, why = advice.fit_rank_to_budget(rank, lambda r: bool(estimate(
            spec, _with_budget(hw, budget), smallest.model_copy(update={"lora_rank": r}), roofline=roofline,
            calibration=calibration, headroom=headroom).fits))
        reasons += why
    base = run_config_for(cfg, Candidate.from_run_config(cfg).model_copy(update={"lora_rank": rank}),
                          cfg.train.grad_accum)

    parent = _start_parent(base, hw, objective)
    log_trial = _child_logger(base, hw, parent, on_trial)
    # With a time budget, optional probes (neighbours, a second precision, runoffs) stop after PROBE_SHARE of
    # it, so training keeps the larger part; the first verified setting is always probed.
    deadline = (time.monotonic() + PROBE_SHARE * time_budget_s - (time.perf_counter() - t0)) if time_budget_s else None
    searcher = Searcher(spec, _with_budget(hw, budget), base, roofline=roofline, headroom=headroom, budget_bytes=budget,
                        calibration=calibration, probe_steps=probe_steps, on_trial=log_trial,
                        probe_deadline=deadline, **({"probe_fn": probe_fn} if probe_fn else {}))
    try:
        choice = search(searcher, objective)
    except BaseException:
        _end(parent, "FAILED")
        raise
    reasons += choice.reasons
    chosen = run_config_for(base, choice.candidate, choice.grad_accum, choice.max_steps)
    if time_budget_s and choice.trial is not None and choice.trial.probe.step_s:
        steps, why = steps_for_time(chosen, choice.trial.probe.step_s, time_budget_s - (time.perf_counter() - t0))
        chosen = chosen.model_copy(update={"train": chosen.train.model_copy(update={"max_steps": steps})})
        reasons.append(why)
    seconds = time.perf_counter() - t0
    reasons.append(f"chosen in {seconds:.0f} s after {len(choice.trials)} probe(s); "
                   f"calibration now: {choice.calibration.source}")
    text = render_yaml(chosen, reasons)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    if parent:
        from lowres.tracking import log_metrics, log_text

        log_text(parent.run_id, text, "chosen.yaml", parent.tracking_uri)
        log_metrics(parent.run_id, {"advisor/tune_seconds": seconds, "advisor/probes": len(choice.trials),
                                    "advisor/chosen_tokens_per_s": choice.trial.tokens_per_s or 0.0}, 0,
                    tracking_uri=parent.tracking_uri)
        _end(parent, "FINISHED")
    result = TuneResult(chosen, choice, text, None if out is None else str(out), seconds, reasons,
                        parent.run_id if parent else None, hardware=hw)
    if fed_choice is not None:  # what the federation config should say for this client
        result.extra["fed"] = {"rank": fed_choice.rank, "up": fed_choice.up, "down": fed_choice.down,
                               "qat": fed_choice.qat, "bytes_down": fed_choice.bytes_down,
                               "bytes_up": fed_choice.bytes_up, "overrides": fed_choice.overrides()}
    if not dry_run:
        from lowres.train import run

        result.train_result = run(chosen, console=console)
    return result


# What a training run spends besides its steps, in step times and seconds: loading the model and data
# (~15-25 s for a 135M model from the converted cache on 2 cores, imports included), and the two held-out
# evaluations at the end (the adapter's and the base's: eval_batches forward passes each, ~1/3 of a step's
# compute per micro-batch).
TRAIN_SETUP_S = 25.0
MIN_STEPS = 5
# The share of a time budget that optional probes may use (from tune's start): on 2 cores a 135M probe takes
# 40-60 s, so a 5-minute budget allows the first setting and one more before training takes over.
PROBE_SHARE = 0.4


def steps_for_time(cfg: Any, step_s: float, remaining_s: float) -> tuple[int, str]:
    """(max_steps, reason): as many of ``cfg``'s steps as fit ``remaining_s`` seconds at the measured
    ``step_s`` per optimizer step, after the run's setup and its two evaluations; never more than configured,
    never fewer than MIN_STEPS (the reason says when that overruns the budget)."""
    evals = 2 * cfg.train.eval_batches * step_s / (3 * cfg.train.grad_accum)
    left = remaining_s - TRAIN_SETUP_S - evals
    fit = int(left // step_s) if left > 0 else 0
    steps = max(MIN_STEPS, min(cfg.train.max_steps, fit))
    head = (f"time budget: {remaining_s:.0f} s left after probing; the chosen setup measured {step_s:.2f} s per "
            f"step, plus ~{TRAIN_SETUP_S:.0f} s to load and ~{evals:.0f} s for the base and adapter evaluations")
    if fit >= cfg.train.max_steps:
        return steps, f"{head}: all {cfg.train.max_steps} configured steps fit"
    if fit < MIN_STEPS:
        return steps, (f"{head}: fewer than {MIN_STEPS} steps fit, so {MIN_STEPS} run and the budget is overrun "
                       "(raise --time-budget, or give a smaller model or shorter sequences)")
    return steps, f"{head}: train.max_steps cut from {cfg.train.max_steps} to {steps}"


def _targets_name(cfg: Any) -> str:
    return cfg.lora.targets if isinstance(cfg.lora.targets, str) else "attention_mlp"


def _with_budget(hw: Any, budget: float) -> Any:
    """``hw`` as if ``budget`` bytes were available (the estimator reads the budget from the profile)."""
    return hw.model_copy(update={"memory": hw.memory.model_copy(update={"available_bytes": int(budget)}),
                                 "cgroup": hw.cgroup.model_copy(update={"memory_limit_bytes": None})})


def render_yaml(cfg: Any, reasons: list[str]) -> str:
    """The RunConfig as YAML, headed by the reasons as comments (so the file explains itself)."""
    lines = ["# chosen by `lowres tune --auto`; every figure below was measured or predicted on this machine"]
    lines += [f"# - {r}" for r in reasons]
    return "\n".join(lines) + "\n" + cfg.to_yaml()


def _start_parent(cfg: Any, hw: Any, objective: str):
    if not cfg.tracking.mlflow:
        return None
    from lowres.tracking import start_run

    return start_run(cfg.tracking.experiment, run_name=f"tune-{cfg.model.name}", tracking_uri=cfg.tracking.mlflow_uri,
                     fingerprint=hw.fingerprint, tier=hw.tier, config=cfg.model_dump(mode="json"),
                     tags={"lowres.command": "tune", "lowres.advisor.objective": objective})


def _end(handle: Any, status: str) -> None:
    if handle:
        from lowres.tracking import end_run

        end_run(handle.run_id, status, handle.tracking_uri)


def _child_logger(cfg: Any, hw: Any, parent: Any, on_trial: Callable | None) -> Callable[[str, Trial], None]:
    """Per probe: a child run of ``parent`` with predicted and measured figures side by side."""
    def log(event: str, trial: Trial) -> None:
        if on_trial:
            on_trial(event, trial)
        if event not in ("done", "rerun-done") or not parent:
            return
        from lowres.tracking import end_run, log_metrics, log_params, start_run

        c, p, est = trial.candidate, trial.probe, trial.estimate
        again = "-again" if event == "rerun-done" else ""  # a runoff: its figures pool both probes
        child = start_run(cfg.tracking.experiment, run_name=f"probe-{c.compute}-{c.quant}-r{c.lora_rank}-b{c.batch_size}{again}",
                          tracking_uri=parent.tracking_uri, fingerprint=hw.fingerprint, tier=hw.tier,
                          tags={"mlflow.parentRunId": parent.run_id, "lowres.command": "tune-probe",
                                "lowres.advisor.fits": str(p.fits), "lowres.advisor.reason": p.reason[:500]})
        log_params(child.run_id, {"candidate": c.model_dump(mode="json"), "grad_accum": trial.grad_accum},
                   child.tracking_uri)
        metrics = {"advisor/predicted_peak_bytes": est.peak_bytes, "advisor/cap_bytes": p.cap_bytes or 0,
                   "advisor/fits": 1.0 if p.fits else 0.0, "advisor/probe_wall_s": p.wall_s}
        if trial.predicted_step_s is not None:
            metrics["advisor/predicted_step_s"] = trial.predicted_step_s
        if p.peak_rss_bytes is not None:
            metrics["advisor/measured_peak_bytes"] = p.peak_rss_bytes
        if p.step_s is not None:
            metrics["advisor/measured_step_s"] = p.step_s
            metrics["advisor/measured_tokens_per_s"] = p.tokens_per_s
        log_metrics(child.run_id, metrics, 0, tracking_uri=child.tracking_uri)
        end_run(child.run_id, "FINISHED" if p.fits else "FAILED", child.tracking_uri)
    return log
