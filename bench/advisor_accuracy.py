"""How close the advisor's predictions come to measurement, and how good `tune --auto`'s choice is.

    .venv/bin/python bench/advisor_accuracy.py            # 14 configurations of tiny and SmolLM2-135M
    .venv/bin/python bench/advisor_accuracy.py --quick    # 12 configurations, shorter sequences

1. Accuracy. Every configuration of a grid (precision/quant × LoRA rank × batch × length, `tiny` and
   `SmolLM2-135M`, random-init) is probed for real (lowres.advisor.probe: a capped child process, a few
   recipe steps): peak RSS (VmHWM) and median step time after warm-up. Predictions are the estimator's on this
   machine's measured roofline, calibrated on at most 3 of the configurations (marked `cal`: two of 135M at
   different sizes, one of tiny — calibration is per machine and model) and judged on the others:
   |predicted − measured| / measured.
2. Choice. `tune --auto --dry-run` (objective fastest) runs for the 135M preset with the sweep's sequence
   length and effective batch, on an empty calibration cache (so its probing is timed honestly), and is timed.
   The sweep part of the grid — every precision/quant × micro-batch of that effective batch — is the
   exhaustive search; chosen_vs_best = the sweep's measured tokens/s of the chosen configuration / the sweep's
   best. Measurements of one machine shared with others are noisy: the table shows each probe's step times.
Last line: RESULT mem_median_err=… mem_max_err=… time_median_err=… chosen_vs_best=… tune_seconds=…
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMOL = "SmolLM2-135M"


def grid(quick: bool) -> tuple[list[dict], dict]:
    """(configurations, sweep) — the sweep: 135M at one length and rank, every precision × micro-batch that
    divides the effective batch; the rest vary rank and length. ``cal`` marks the calibration set."""
    s = 64 if quick else 128
    sweep = {"seq": s, "rank": 8, "effective": 4}
    rows = [dict(model="tiny", compute="fp32", quant="none", rank=8, batch=8, seq=2 * s, cal=True),
            dict(model="tiny", compute="bf16", quant="none", rank=64, batch=32, seq=2 * s),
            dict(model="tiny", compute="bf16", quant="nf4", rank=8, batch=8, seq=s),
            dict(model="tiny", compute="fp32", quant="int8", rank=16, batch=16, seq=2 * s)]
    for compute, quant in (("bf16", "none"), ("fp32", "none"), ("bf16", "nf4")):
        for b in (1, 2, 4):
            if quant == "nf4" and b < 4 and quick:
                continue
            rows.append(dict(model=SMOL, compute=compute, quant=quant, rank=8, batch=b, seq=s, sweep=True,
                             cal=(compute, quant, b) in (("bf16", "none", 1), ("bf16", "none", 4))))
    rows += [dict(model=SMOL, compute="bf16", quant="none", rank=32, batch=2, seq=2 * s),
             dict(model=SMOL, compute="fp32", quant="none", rank=16, batch=1, seq=2 * s)]
    if quick:
        rows = rows[:12]
    return rows, sweep


def config_for(row: dict, data_sample: str):
    from lowres.config import load_config

    return load_config(None, [f"model.name={row['model']}", f"precision.compute={row['compute']}",
                              f"precision.quant={row['quant']}", f"lora.rank={row['rank']}",
                              f"train.batch_size={row['batch']}", f"data.max_length={row['seq']}",
                              f"data.sample={data_sample}", "tracking.mlflow=false"], use_env=False)


def measure(rows: list[dict], args) -> None:
    """Probe each row for real; add its uncalibrated prediction beside (machine roofline, no calibration)."""
    from lowres.advisor.calibrate import machine_roofline
    from lowres.advisor.estimate import Candidate, estimate
    from lowres.advisor.probe import probe
    from lowres.hardware import detect
    from lowres.models import load_spec

    hw = detect()
    for i, row in enumerate(rows, 1):
        cfg = config_for(row, args.data)
        spec = load_spec(row["model"])
        est = estimate(spec, hw, Candidate.from_run_config(cfg), roofline=machine_roofline(spec, hw.fingerprint))
        res = probe(cfg, steps=args.steps, warmup=args.warmup, timeout_s=300)
        row.update(est=est, probe=res, cand=Candidate.from_run_config(cfg))
        print(f"  [{i}/{len(rows)}] {label(row)}: {'ran' if res.fits else res.reason} in {res.wall_s:.0f} s",
              file=sys.stderr, flush=True)


def label(row: dict) -> str:
    return f"{row['model']:>12} {row['compute']}/{row['quant']:<4} r{row['rank']:<2} b{row['batch']:<2} s{row['seq']}"


def calibrate(rows: list[dict]) -> dict:
    """Per model, a Calibration fitted on that model's ``cal`` rows only."""
    from lowres.advisor.calibrate import ProbePoint, fit_calibration

    cals = {}
    for model in {r["model"] for r in rows}:
        pts = [ProbePoint(candidate=r["cand"].model_dump(mode="json"), transient_bytes=r["est"].allocator_factor * r["est"].transient_bytes,
                          persistent_bytes=r["est"].live_tensor_bytes - r["est"].transient_bytes,
                          predicted_peak_bytes=r["est"].peak_bytes, predicted_step_s=r["est"].step_time_s,
                          measured_peak_bytes=r["probe"].peak_rss_bytes, measured_step_s=r["probe"].step_s,
                          fits=r["probe"].fits)
               for r in rows if r["model"] == model and r.get("cal") and r["probe"].fits]
        cals[model] = fit_calibration(pts)
    return cals


def judge(rows: list[dict], cals: dict) -> tuple[list[float], list[float]]:
    from lowres.advisor.calibrate import machine_roofline
    from lowres.advisor.estimate import estimate
    from lowres.hardware import detect
    from lowres.models import load_spec

    hw = detect()
    mem_err, time_err = [], []
    print(f"{'configuration':<42} {'pred MiB':>9} {'meas MiB':>9} {'err':>7} {'pred s':>8} {'meas s':>8} "
          f"{'err':>7} {'tok/s':>7}  step times (s)")
    for r in rows:
        p = r["probe"]
        if not p.fits:
            print(f"{label(r):<42} did not run: {p.reason}")
            continue
        spec = load_spec(r["model"])
        est = estimate(spec, hw, r["cand"], roofline=machine_roofline(spec, hw.fingerprint), calibration=cals[r["model"]])
        me = (est.peak_bytes - p.peak_rss_bytes) / p.peak_rss_bytes
        te = (est.step_time_s - p.step_s) / p.step_s
        if not r.get("cal"):
            mem_err.append(abs(me))
            time_err.append(abs(te))
        print(f"{label(r) + (' cal' if r.get('cal') else ''):<42} {est.peak_bytes / 2**20:>9.0f} "
              f"{p.peak_rss_bytes / 2**20:>9.0f} {me:>+7.1%} {est.step_time_s:>8.3f} {p.step_s:>8.3f} {te:>+7.1%} "
              f"{p.tokens_per_s:>7.0f}  {' '.join(f'{t:.2f}' for t in p.step_times)}")
    return mem_err, time_err


def run_tune(sweep: dict, args) -> tuple[object, float]:
    from lowres.advisor.tune import tune
    from lowres.config import load_config

    cfg = load_config(None, [f"model.name={SMOL}", f"data.max_length={sweep['seq']}",
                             f"train.batch_size={sweep['effective']}", f"data.sample={args.data}",
                             "tracking.mlflow=false"], use_env=False)
    out = os.path.join(tempfile.mkdtemp(prefix="lowres-bench-"), "chosen.yaml")
    t0 = time.perf_counter()
    result = tune(cfg, objective="fastest", dry_run=True, out=out, rank=sweep["rank"], probe_steps=args.steps)
    return result, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="12 configurations, shorter sequences")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per probe")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    ap.add_argument("--data", default="hdfs_logs", help="shipped sample to train on")
    args = ap.parse_args()
    rows, sweep = grid(args.quick)
    print(f"measuring {len(rows)} configurations ({sum(bool(r.get('cal')) for r in rows)} for calibration)",
          file=sys.stderr)
    t0 = time.perf_counter()
    measure(rows, args)
    mem_err, time_err = judge(rows, calibrate(rows))
    print(f"\njudged on {len(mem_err)} configurations; memory |err| median {statistics.median(mem_err):.1%} "
          f"max {max(mem_err):.1%}; step time |err| median {statistics.median(time_err):.1%} "
          f"max {max(time_err):.1%}  ({time.perf_counter() - t0:.0f} s of probing)")

    # tune starts from an empty calibration cache, so nothing learnt before may help it; the machine's
    # roofline (measured once per machine, like `lowres hw` does) is copied over
    from lowres.advisor import calibrate as cal_mod
    from lowres.train.mfu import cache_path as roofline_cache

    roofline_file = roofline_cache()
    bandwidth = {k: v for k, v in cal_mod._read().items() if k.endswith("|bandwidth")}
    os.environ["LOWRES_CACHE_DIR"] = tempfile.mkdtemp(prefix="lowres-cal-")
    if roofline_file.is_file():
        shutil.copy(roofline_file, roofline_cache())
    cal_mod._write(bandwidth)
    result, tune_s = run_tune(sweep, args)
    c = result.config
    sweep_rows = [r for r in rows if r.get("sweep") and r["probe"].fits]
    best = max(sweep_rows, key=lambda r: r["probe"].tokens_per_s)
    same = [r for r in sweep_rows if (r["compute"], r["quant"], r["batch"]) ==
            (c.precision.compute, c.precision.quant, c.train.batch_size)]
    chosen_tps = same[0]["probe"].tokens_per_s if same else float("nan")
    ratio = chosen_tps / best["probe"].tokens_per_s
    print(f"\ntune --auto chose {c.precision.compute}/{c.precision.quant} micro-batch {c.train.batch_size} × "
          f"grad_accum {c.train.grad_accum} in {tune_s:.0f} s ({len(result.choice.trials)} probes); in the sweep it "
          f"ran at {chosen_tps:.0f} tokens/s; the sweep's best is {label(best).strip()} at "
          f"{best['probe'].tokens_per_s:.0f} tokens/s → chosen_vs_best {ratio:.3f}")
    for reason in result.reasons:
        print(f"  - {reason}")
    print(f"RESULT mem_median_err={statistics.median(mem_err):.3f} mem_max_err={max(mem_err):.3f} "
          f"time_median_err={statistics.median(time_err):.3f} chosen_vs_best={ratio:.3f} tune_seconds={tune_s:.1f}")


if __name__ == "__main__":
    main()
