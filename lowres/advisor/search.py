"""Search: for each precision/quantization the hardware allows, the largest micro-batch that fits with
headroom — predicted by the (calibrated) estimate, verified by probes — then a choice by objective.

The effective batch (sequences per optimizer step) stays what the user asked for: the micro-batch is a
divisor of it and gradient accumulation makes up the rest (b · accum = effective), so every candidate trains
the same optimisation problem and only speed and memory differ. No blind doubling: the estimate names the
largest divisor that fits; a probe verifies it, and one neighbour is probed — the next larger divisor when
the prediction held (the estimate may be cautious), the next smaller when it did not. Each probe re-fits the
calibration before the next prediction, so later predictions start closer.

Objectives: ``fastest`` (measured tokens/s), ``smallest`` (measured peak memory), ``time:SECONDS`` (the
smallest footprint whose predicted run time for ``max_steps`` fits in SECONDS; if none does, the fastest).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lowres.advisor import calibrate as cal_mod
from lowres.advisor.estimate import Calibration, Candidate, Estimate, estimate, resolve_compute, slow_precision
from lowres.advisor.probe import ProbeResult, probe
from lowres.errors import UsageError

GIB = 1024**3
# How far past the budget line (memory) or below the verified speed (time) a neighbour may be predicted and
# still be worth a probe: about the estimator's calibrated error (bench/advisor_accuracy.py).
NEIGHBOUR_MARGIN = 0.15
# Two probes closer than this in tokens/s are too close to call from one short probe each: on the development
# machine the same candidate measured 303-356 tokens/s in three 5-step probes, and tune once chose a micro-
# batch the exhaustive sweep measured 23 % slower (bench/advisor_accuracy.py). Both are probed again and
# decided on the pooled steps.
RUNOFF_MARGIN = 0.15


class DoesNotFitError(UsageError):
    """No setting of the model fits the memory budget (exit 2); the message gives the smallest footprint."""


@dataclass
class Trial:
    """One candidate at one micro-batch: its estimate when probed (calibrated so far) and the probe."""

    candidate: Candidate
    grad_accum: int
    estimate: Estimate
    uncalibrated: Estimate
    probe: ProbeResult | None = None
    probes: int = 0  # how many probes the measured figures pool

    @property
    def fits(self) -> bool | None:
        return None if self.probe is None else self.probe.fits

    @property
    def tokens_per_s(self) -> float | None:
        return self.probe.tokens_per_s if self.probe and self.probe.fits else None

    @property
    def predicted_step_s(self) -> float | None:
        """Predicted seconds of one optimizer step (grad_accum micro-batches), as the probe measures it."""
        s = self.estimate.step_time_s
        return None if s is None else s * self.grad_accum


@dataclass
class Choice:
    """The chosen candidate, why, and every trial that led there."""

    candidate: Candidate
    grad_accum: int
    estimate: Estimate
    trial: Trial | None
    objective: str
    reasons: list[str] = field(default_factory=list)
    trials: list[Trial] = field(default_factory=list)
    calibration: Calibration = field(default_factory=Calibration)
    max_steps: int | None = None


def divisors(n: int) -> list[int]:
    """Micro-batch sizes that keep ``n`` sequences per optimizer step exactly (ascending)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_objective(text: str) -> tuple[str, float | None]:
    """``fastest`` | ``smallest`` | ``time:SECONDS`` → (kind, seconds)."""
    if text in ("fastest", "smallest"):
        return text, None
    if text.startswith("time:"):
        try:
            seconds = float(text[5:])
        except ValueError:
            seconds = -1.0
        if seconds > 0:
            return "time", seconds
    raise UsageError(f"unknown objective {text!r}", hint="use fastest, smallest or time:SECONDS (e.g. time:600)")


def precision_options(hw: Any, quant_ok: bool = True) -> list[tuple[str, str]]:
    """(compute, quant) pairs worth trying here, unquantized first: fp32; bf16 only where it is native (on a
    CPU without AVX512_BF16/AMX it is emulated, tens of times slower); then int8 and nf4 bases (in the
    fastest native dtype), which the search probes only when nothing unquantized fits."""
    out = [("fp32", "none")]
    if not slow_precision(hw, "bf16"):
        out.append(("bf16", "none"))
    if quant_ok:
        fast = resolve_compute(hw, "auto")
        out += [(fast, "int8"), (fast, "nf4")]
    return out


class Searcher:
    """Holds the model, machine, budget, calibration and trials of one search; ``search()`` chooses."""

    def __init__(self, spec: Any, hw: Any, base_cfg: Any, *, roofline: Any = None, headroom: float = 0.10,
                 budget_bytes: float | None = None, calibration: Calibration | None = None,
                 probe_steps: int = 5, probe_warmup: int = 2, probe_timeout_s: float = 180.0, record: bool = True,
                 on_trial: Callable[[str, Trial], None] | None = None, probe_fn: Callable = probe,
                 probe_deadline: float | None = None):
        from lowres.advisor.estimate import memory_budget_bytes

        self.spec, self.hw, self.base_cfg, self.roofline, self.headroom = spec, hw, base_cfg, roofline, headroom
        self.budget = float(budget_bytes or memory_budget_bytes(hw))
        self.limit = self.budget * (1.0 - headroom)
        # The probe's hard cap: the budget, and on this machine never more than 90 % of what is available now.
        # (A saved profile of another machine cannot be probed for real; a test's fake probe gets its budget.)
        self.cap = int(self.budget if hw.is_estimate_only else min(self.budget, _available_cap()))
        self.calibration = calibration or Calibration()
        self.points: list[cal_mod.ProbePoint] = []
        self.trials: list[Trial] = []
        # Two warm-up steps: here the first two steps of a fresh process ran 2-40x slower than the rest
        # (oneDNN kernel selection per shape, allocator growth), so one was not enough.
        self.probe_steps, self.probe_warmup = probe_steps, min(probe_warmup, probe_steps - 1)
        self.probe_timeout_s, self.record = probe_timeout_s, record
        self.on_trial = on_trial or (lambda event, trial: None)
        self.probe_fn = probe_fn
        self.effective = base_cfg.train.batch_size * base_cfg.train.grad_accum
        self.base = Candidate.from_run_config(base_cfg)
        # time.monotonic() after which no optional probe starts (a neighbour, another precision, a runoff): a
        # time budget (`tune --time-budget`) leaves the rest to training. A first verified setting is always probed.
        self.probe_deadline = probe_deadline
        self.skipped: list[str] = []

    def can_probe(self, what: str) -> bool:
        """True while optional probes fit the time budget; else records ``what`` was left out, and False."""
        if self.probe_deadline is None or time.monotonic() < self.probe_deadline:
            return True
        self.skipped.append(what)
        return False

    # ------------------------------------------------------------------ predictions
    def predict(self, cand: Candidate, calibrated: bool = True) -> Estimate:
        return estimate(self.spec, self.hw, cand, roofline=self.roofline, headroom=self.headroom,
                        calibration=self.calibration if calibrated else None)

    def predicted_fit(self, cand: Candidate) -> bool:
        return self.predict(cand).peak_bytes <= self.limit

    def largest_predicted(self, cand: Candidate) -> int:
        """The largest divisor of the effective batch predicted to fit; 0 when not even 1 does."""
        fitting = [b for b in divisors(self.effective) if self.predicted_fit(cand.model_copy(update={"batch_size": b}))]
        return max(fitting, default=0)

    # ------------------------------------------------------------------ probing
    def run_probe(self, cand: Candidate) -> Trial:
        """Probe ``cand`` (cached in this search), record the point, re-fit the calibration."""
        for t in self.trials:
            if t.candidate == cand and t.probe is not None:
                return t
        trial = Trial(cand, self.effective // cand.batch_size, self.predict(cand), self.predict(cand, False))
        self.on_trial("start", trial)
        from lowres.advisor.tune import run_config_for  # one place turns a candidate into a RunConfig

        cfg = run_config_for(self.base_cfg, cand, trial.grad_accum)
        trial.probe = self.probe_fn(cfg, cap_bytes=self.cap, steps=self.probe_steps, warmup=self.probe_warmup,
                                    timeout_s=self.probe_timeout_s)
        # A run that finished but went past the headroom line does not fit either: the OS saw too much.
        if trial.probe.fits and (trial.probe.peak_rss_bytes or 0) > self.limit:
            trial.probe.fits = False
            trial.probe.reason = (f"ran, but its peak {trial.probe.peak_rss_bytes / GIB:.2f} GiB is above the "
                                  f"{self.limit / GIB:.2f} GiB budget line")
        trial.probes = 1
        self.trials.append(trial)
        u = trial.uncalibrated
        ran = trial.probe.peak_rss_bytes is not None and trial.probe.step_s is not None
        self.points.append(cal_mod.ProbePoint(
            candidate=cand.model_dump(mode="json"), transient_bytes=u.allocator_factor * u.transient_bytes,
            persistent_bytes=u.live_tensor_bytes - u.transient_bytes,
            predicted_peak_bytes=u.peak_bytes, predicted_step_s=u.step_time_s,
            measured_peak_bytes=trial.probe.peak_rss_bytes if ran else None,
            # the estimate is per micro-batch; a probe's step is one optimizer step of grad_accum micro-batches
            measured_step_s=trial.probe.step_s / trial.grad_accum if ran else None, fits=ran or trial.probe.fits,
            cpu_share=trial.probe.cpu_share, load=trial.probe.load or None))
        self.calibration = self.refit()
        self.on_trial("done", trial)
        return trial

    def remeasure(self, trial: Trial) -> Trial:
        """Probe ``trial``'s candidate once more and pool the timed steps of both probes (their median): a
        decision between near-equal candidates then rests on twice the steps, taken at two moments."""
        if trial.probes != 1 or not trial.fits:
            return trial
        self.on_trial("rerun-start", trial)
        from lowres.advisor.tune import run_config_for

        first = trial.probe
        again = self.probe_fn(run_config_for(self.base_cfg, trial.candidate, trial.grad_accum), cap_bytes=self.cap,
                              steps=self.probe_steps, warmup=self.probe_warmup, timeout_s=self.probe_timeout_s)
        trial.probes = 2
        if again.fits and again.step_s:
            w = self.probe_warmup
            timed = ((first.step_times[w:] or first.step_times) + (again.step_times[w:] or again.step_times)
                     or [first.step_s, again.step_s])
            step = statistics.median(timed)
            tokens_per_step = first.tokens_per_s * first.step_s
            trial.probe = dataclasses.replace(
                first, step_s=step, tokens_per_s=tokens_per_step / step, step_times=first.step_times + again.step_times,
                peak_rss_bytes=max(first.peak_rss_bytes or 0, again.peak_rss_bytes or 0), wall_s=first.wall_s + again.wall_s,
                reason="ran (two probes pooled)")
            if (trial.probe.peak_rss_bytes or 0) > self.limit:  # the second probe went past the line
                trial.probe.fits = False
                trial.probe.reason = (f"ran, but its peak {trial.probe.peak_rss_bytes / GIB:.2f} GiB (second "
                                      f"probe) is above the {self.limit / GIB:.2f} GiB budget line")
            key = trial.candidate.model_dump(mode="json")
            for point in self.points:
                if point.candidate == key:
                    point.measured_step_s = step / trial.grad_accum
                    point.measured_peak_bytes = trial.probe.peak_rss_bytes
            self.calibration = self.refit()
        self.on_trial("rerun-done", trial)
        return trial

    def faster(self, a: Trial, b: Trial) -> Trial:
        """The faster of two trials that ran; when they are within ``RUNOFF_MARGIN`` of each other, both are
        probed again first (a runoff), so noise does not pick the winner."""
        ta, tb = a.tokens_per_s or 0.0, b.tokens_per_s or 0.0
        if (min(ta, tb) > 0 and max(ta, tb) < min(ta, tb) * (1 + RUNOFF_MARGIN)
                and self.can_probe("a second probe of the two closest settings")):
            self.remeasure(a)
            self.remeasure(b)
        return a if (a.tokens_per_s or 0.0) >= (b.tokens_per_s or 0.0) else b

    def refit(self) -> Calibration:
        old = cal_mod.load_points(self.hw.fingerprint, self.spec.name)
        mine = {str(p.candidate) for p in self.points}
        pts = [p for p in old if str(p.candidate) not in mine] + self.points
        return cal_mod.fit_calibration(pts)

    def largest_verified(self, cand: Candidate) -> Trial | None:
        """Predict the largest fitting micro-batch, probe it and one neighbour; the largest that ran."""
        sizes = divisors(self.effective)
        b = self.largest_predicted(cand)
        if b == 0:
            return None
        first = self.run_probe(cand.model_copy(update={"batch_size": b}))
        i = sizes.index(b)
        if first.fits:
            # the larger neighbour, when the (re-fitted) estimate puts it within its own error of the line
            if i + 1 < len(sizes):
                up_cand = cand.model_copy(update={"batch_size": sizes[i + 1]})
                if (self.predict(up_cand).peak_bytes <= self.limit * (1 + NEIGHBOUR_MARGIN)
                        and self.can_probe(f"{cand.compute}/{cand.quant} micro-batch {sizes[i + 1]}")):
                    up = self.run_probe(up_cand)
                    return up if up.fits else first
            # else the smaller one, when the re-fitted estimate says it may be as fast (CPU caches can favour it)
            if i > 0:
                down_cand = cand.model_copy(update={"batch_size": sizes[i - 1]})
                down_tps = self.predict(down_cand).tokens_per_s
                if (down_tps and first.tokens_per_s and down_tps >= first.tokens_per_s * (1 - NEIGHBOUR_MARGIN)
                        and self.can_probe(f"{cand.compute}/{cand.quant} micro-batch {sizes[i - 1]}")):
                    down = self.run_probe(down_cand)
                    if down.fits:
                        return self.faster(first, down)
            return first
        if first.fits is None or i == 0:
            return None  # failed for another reason (reported), or even batch 1 does not fit
        # the estimate was optimistic: the re-fitted calibration names a smaller batch; probe that one
        smaller = self.largest_predicted(cand) or sizes[i - 1]
        down = self.run_probe(cand.model_copy(update={"batch_size": min(smaller, sizes[i - 1])}))
        return down if down.fits else None

    def finish(self) -> None:
        if self.record and self.points:
            cal_mod.record_points(self.hw.fingerprint, self.spec.name, self.points)


def _available_cap() -> int:
    from lowres.advisor.probe import default_cap_bytes

    return default_cap_bytes()


def smallest_footprint(s: Searcher, options: list[tuple[str, str]] | None = None) -> Estimate:
    """The least memory any setting needs: micro-batch 1, gradient checkpointing, rank 1, each precision."""
    options = options or precision_options(s.hw)
    ests = [s.predict(s.base.model_copy(update={"compute": c, "quant": q, "batch_size": 1, "lora_rank": 1,
                                                "gradient_checkpointing": True})) for c, q in options]
    return min(ests, key=lambda e: e.peak_bytes)


def refuse_if_nothing_fits(s: Searcher) -> None:
    """DoesNotFitError when even the smallest footprint is predicted above the budget line — before any
    probe or roofline measurement, so a hopeless request is answered at once."""
    small = smallest_footprint(s)
    if small.peak_bytes <= s.limit:
        return
    c = small.candidate
    raise DoesNotFitError(
        f"{s.spec.name} does not fit in {s.budget / GIB:.2f} GiB at any setting: the smallest footprint found "
        f"({c.compute}, quant {c.quant}, micro-batch 1 of {c.seq_len} tokens, rank 1, gradient checkpointing) "
        f"needs {small.peak_bytes / GIB:.2f} GiB, i.e. {small.peak_bytes / (1 - s.headroom) / GIB:.2f} GiB of "
        f"budget with {s.headroom:.0%} headroom (calibration: {s.calibration.source})",
        hint="use a smaller model or shorter sequences (lowres advise shows the terms), or more memory")


def search(s: Searcher, objective: str = "fastest", quant_ok: bool = True) -> Choice:
    """Probe the candidates of ``s`` and choose one by ``objective`` (see the module docstring).

    fastest/time: the largest verified micro-batch of each unquantized precision; only when none fits, the
    quantized bases, then each with gradient checkpointing, until one fits. smallest: micro-batch 1 of the
    two precisions predicted smallest."""
    kind, seconds = parse_objective(objective)
    refuse_if_nothing_fits(s)
    options = precision_options(s.hw, quant_ok)
    plain = [o for o in options if o[1] == "none"]
    quantized = [o for o in options if o[1] != "none"]
    reasons: list[str] = []
    winners: list[Trial] = []
    if kind == "smallest":
        ones = sorted((s.base.model_copy(update={"compute": c, "quant": q, "batch_size": 1}) for c, q in options),
                      key=lambda c: s.predict(c).peak_bytes)
        for cand in [c for c in ones if s.predicted_fit(c)][:2]:
            t = s.run_probe(cand)
            if t.fits:
                winners.append(t)
        reasons.append("objective smallest: micro-batch 1 of the two precisions predicted smallest, probed")
    else:
        if s.probe_deadline is not None:  # the predicted fastest first: it is the one probed if time runs short
            plain.sort(key=lambda o: -_predicted_tps(s, s.base.model_copy(update={"compute": o[0], "quant": o[1]})))
        for compute, quant in plain:
            if winners and not s.can_probe(f"{compute}/{quant}"):
                continue
            t = s.largest_verified(s.base.model_copy(update={"compute": compute, "quant": quant}))
            if t is not None:
                winners.append(t)
        if winners and quantized:
            reasons.append(f"no 4-bit/8-bit base: an unquantized one fits, and on this {s.hw.tier} machine "
                           "bitsandbytes dequantises every weight at each matmul, which costs time")
        fallback = [(c, q, False) for c, q in quantized] + [(c, q, True) for c, q in plain + quantized]
        for compute, quant, gc in fallback if not winners else []:
            if gc and s.base.gradient_checkpointing:
                continue
            t = s.largest_verified(s.base.model_copy(update={"compute": compute, "quant": quant,
                                                             "gradient_checkpointing": gc or s.base.gradient_checkpointing}))
            if t is not None:
                winners.append(t)
                reasons.append(f"{quant} base{' with gradient checkpointing' if gc else ''}: needed to fit — "
                               "no unquantized setting fits the budget even at micro-batch 1")
                break
    s.finish()
    if s.skipped:
        reasons.append("time budget: probing stopped to leave time for training; not probed: " + ", ".join(s.skipped))
    if not winners:
        small = smallest_footprint(s, options)
        tried = "; ".join(f"{t.candidate.compute}/{t.candidate.quant} b{t.candidate.batch_size}: {t.probe.reason}"
                          for t in s.trials) or "none probed"
        raise DoesNotFitError(
            f"{s.spec.name}: no setting ran within {s.budget / GIB:.2f} GiB (probes: {tried}); the smallest "
            f"predicted footprint needs {small.peak_bytes / GIB:.2f} GiB",
            hint="use a smaller model or shorter sequences, or more memory")
    return _choose(s, kind, seconds, winners, reasons)


def _predicted_tps(s: Searcher, cand: Candidate) -> float:
    """Predicted tokens/s of ``cand`` at the largest micro-batch predicted to fit (0 when none fits)."""
    b = s.largest_predicted(cand)
    return (s.predict(cand.model_copy(update={"batch_size": b})).tokens_per_s or 0.0) if b else 0.0


def _choose(s: Searcher, kind: str, seconds: float | None, winners: list[Trial], reasons: list[str]) -> Choice:
    steps = s.base_cfg.train.max_steps
    max_steps = None

    def run_seconds(t: Trial) -> float:  # a probe's step is a whole optimizer step (accumulation included)
        return steps * (t.probe.step_s or math.inf)

    if kind == "fastest":
        ranked = sorted(winners, key=lambda t: t.tokens_per_s or 0.0, reverse=True)
        best = s.faster(ranked[0], ranked[1]) if len(ranked) > 1 else ranked[0]
        why = "fastest measured"
    elif kind == "smallest":
        best = min(winners, key=lambda t: t.probe.peak_rss_bytes or math.inf)
        why = "smallest measured peak memory"
    else:
        within = [t for t in winners if run_seconds(t) <= seconds]
        if within:
            best = min(within, key=lambda t: t.probe.peak_rss_bytes or math.inf)
            why = f"smallest footprint that finishes {steps} steps within {seconds:.0f} s"
        else:
            best = max(winners, key=lambda t: t.tokens_per_s or 0.0)
            per_step = best.probe.step_s
            max_steps = max(1, int(seconds // per_step))
            why = (f"no candidate finishes {steps} steps in {seconds:.0f} s; the fastest does "
                   f"{max_steps} steps ({per_step:.2f} s each), so max_steps is cut to {max_steps}")
    c = best.candidate
    pooled = (f" (two probes pooled: the runner-up was within {RUNOFF_MARGIN:.0%})" if best.probes > 1 else "")
    reasons.insert(0, f"{why}: {c.compute}, quant {c.quant}, micro-batch {c.batch_size} × grad_accum "
                      f"{best.grad_accum} (effective {s.effective}) — {best.tokens_per_s:,.0f} tokens/s{pooled}, "
                      f"peak {best.probe.peak_rss_bytes / GIB:.2f} GiB of a {s.limit / GIB:.2f} GiB budget line")
    for t in winners:
        if t is not best:
            reasons.append(f"{t.candidate.compute}/{t.candidate.quant} at micro-batch {t.candidate.batch_size}: "
                           f"{t.tokens_per_s:,.0f} tokens/s, peak {t.probe.peak_rss_bytes / GIB:.2f} GiB")
    return Choice(candidate=c, grad_accum=best.grad_accum, estimate=s.predict(c), trial=best,
                  objective=kind if seconds is None else f"time:{seconds:g}", reasons=reasons,
                  trials=list(s.trials), calibration=s.calibration, max_steps=max_steps)
