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
3. Other families. Four decoders of other shapes, from published config.json numbers scaled down to run on
   2 cores (``FAMILIES``: what was scaled is said beside each), random-init weights from a folder: their
   memory joins the memory error; they have no calibration rows, so their step time counts in the cold column.
4. Cold start. Every configuration's uncalibrated step time (the machine model: GEMM roofline, element-wise
   bandwidth, attention at the run's length, per-op cost) against measurement: ``cold_time_median_err``.
5. First probe. `tune --auto --dry-run` on a 151,936-token-vocabulary folder (Qwen2.5-0.5B's shapes, 4
   layers): seconds from its start to its first probe (``first_probe_s``; the goal is ≤ 60 s).
Every figure depends on the machine and how busy it is: the load average is printed at start and end
(``load_start``/``load_end``) — on a shared machine rerun quietly before quoting a step-time figure.
Last line: RESULT mem_median_err=… mem_max_err=… time_median_err=… cold_time_median_err=… chosen_vs_best=…
tune_seconds=… first_probe_s=… load_start=… load_end=…
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

# Published config.json numbers, scaled down where a few probe steps would not fit 2 cores in seconds (the
# families' structural features kept). Each row: (config, precision, batch, seq, LoRA targets).
FAMILIES = {
    # Qwen2.5-0.5B: hidden 896, 14 heads / 2 kv, inter 4864, vocab 151936, tied, q/k/v bias. Layers 24 → 4.
    "qwen2.5-0.5b-4l": (dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=4,
                             num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                             max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6,
                             rope_theta=1000000.0), "fp32", 2, 128, "attention_mlp"),
    # Gemma 3 270M: hidden 640, 4 heads / 1 kv, head_dim 256, inter 2048 GeGLU, vocab 262144, q/k norms,
    # four norms a layer, sliding window 512 with every 6th layer global, tied. Layers 18 → 4.
    "gemma3-270m-4l": (dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                            max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256,
                            hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
                            layer_types=["sliding_attention"] * 3 + ["full_attention"]), "bf16", 1, 128,
                       "attention_mlp"),
    # Pythia-410m (GPT-NeoX): LayerNorm, plain GELU MLP, fused qkv, rotary on 25 % of each head, parallel
    # residual, untied, vocab 50304. Hidden 1024 → 512 (16 → 8 heads, head_dim 64 kept), inter 4h, 24 → 4 layers.
    "pythia-410m-half-4l": (dict(model_type="gpt_neox", hidden_size=512, intermediate_size=2048,
                                 num_hidden_layers=4, num_attention_heads=8, vocab_size=50304,
                                 max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
                                 tie_word_embeddings=False), "fp32", 4, 128, "all_linear"),
    # Mistral-7B-v0.1: GQA 32/8 heads (4:1), SwiGLU inter 3.5h, vocab 32000, untied, sliding window 4096.
    # Hidden 4096 → 512 (8 / 2 heads, head_dim 64), inter 1792, 32 → 4 layers, window 4096 → 64 (shorter
    # than the 128-token sequences, so the mask is in play).
    "mistral-7b-mini-4l": (dict(model_type="mistral", hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
                                num_attention_heads=8, num_key_value_heads=2, vocab_size=32000,
                                max_position_embeddings=32768, sliding_window=64, rms_norm_eps=1e-5,
                                tie_word_embeddings=False), "bf16", 4, 128, "attention_mlp"),
}


def family_rows(root: str, bf16_ok: bool) -> list[dict]:
    """The families' folders (config.json only: random-init) and one configuration each."""
    import json

    rows = []
    for name, (cfg, compute, batch, seq, targets) in FAMILIES.items():
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f)
        rows.append(dict(model=folder, compute=compute if bf16_ok else "fp32", quant="none", rank=8,
                         batch=batch, seq=seq, targets=targets, family=name))
    return rows


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
                              f"lora.targets={row.get('targets', 'attention_mlp')}", "model.weights=random-init",
                              f"data.sample={data_sample}", "tracking.mlflow=false"], use_env=False)


def measure(rows: list[dict], args) -> None:
    """Probe each row for real; add its uncalibrated prediction beside (machine roofline, no calibration)."""
    from lowres.advisor.calibrate import machine_roofline
    from lowres.advisor.estimate import Candidate, estimate
    from lowres.advisor.probe import probe
    from lowres.hardware import detect
    from lowres.models.spec import resolve_spec

    hw = detect()
    for i, row in enumerate(rows, 1):
        cfg = config_for(row, args.data)
        spec = resolve_spec(row["model"])
        rl = machine_roofline(spec, hw.fingerprint, hw=hw, seq_len=row["seq"], quant=row["quant"] != "none")
        row["roofline"] = rl
        est = estimate(spec, hw, Candidate.from_run_config(cfg), roofline=rl)
        res = probe(cfg, steps=args.steps, warmup=args.warmup, timeout_s=300)
        row.update(est=est, probe=res, cand=Candidate.from_run_config(cfg))
        print(f"  [{i}/{len(rows)}] {label(row)}: {'ran' if res.fits else res.reason} in {res.wall_s:.0f} s",
              file=sys.stderr, flush=True)


def label(row: dict) -> str:
    return f"{row.get('family', row['model']):>19} {row['compute']}/{row['quant']:<4} r{row['rank']:<2} b{row['batch']:<2} s{row['seq']}"


def calibrate(rows: list[dict]) -> dict:
    """Per model, a Calibration fitted on that model's ``cal`` rows only."""
    from lowres.advisor.calibrate import ProbePoint, fit_calibration

    cals = {}
    for model in {r["model"] for r in rows}:
        pts = [ProbePoint(candidate=r["cand"].model_dump(mode="json"), transient_bytes=r["est"].allocator_factor * r["est"].transient_bytes,
                          persistent_bytes=r["est"].live_tensor_bytes - r["est"].transient_bytes,
                          predicted_peak_bytes=r["est"].peak_bytes, predicted_step_s=r["est"].step_time_s,
                          measured_peak_bytes=r["probe"].peak_rss_bytes, measured_step_s=r["probe"].step_s,
                          fits=r["probe"].fits, cpu_share=r["probe"].cpu_share)
               for r in rows if r["model"] == model and r.get("cal") and r["probe"].fits]
        if pts:
            cals[model] = fit_calibration(pts)
    return cals


def judge(rows: list[dict], cals: dict) -> tuple[list[float], list[float], list[float]]:
    from lowres.advisor.calibrate import MIN_CPU_SHARE
    from lowres.advisor.estimate import estimate
    from lowres.hardware import detect
    from lowres.models.spec import resolve_spec

    hw = detect()
    mem_err, time_err, cold_err = [], [], []
    print(f"{'configuration':<49} {'pred MiB':>9} {'meas MiB':>9} {'err':>7} {'pred s':>8} {'meas s':>8} "
          f"{'err':>7} {'cold s':>8} {'err':>7} {'share':>5} {'tok/s':>7}  step times (s)")
    for r in rows:
        p = r["probe"]
        if not p.fits:
            print(f"{label(r):<42} did not run: {p.reason}")
            continue
        spec = resolve_spec(r["model"])
        cal = cals.get(r["model"])
        est = estimate(spec, hw, r["cand"], roofline=r["roofline"], calibration=cal)
        me = (est.peak_bytes - p.peak_rss_bytes) / p.peak_rss_bytes
        te = (est.step_time_s - p.step_s) / p.step_s
        cold = r["est"].step_time_s  # uncalibrated: the machine model alone
        ce = (cold - p.step_s) / p.step_s
        # a probe whose steps got under MIN_CPU_SHARE of their cores timed a busy machine, not this one: its
        # memory is judged, its step time is not (the same rule keeps it out of calibrations)
        healthy = p.cpu_share is None or p.cpu_share >= MIN_CPU_SHARE
        if healthy:
            cold_err.append(abs(ce))
        if not r.get("cal"):
            mem_err.append(abs(me))
            if healthy and cal is not None and cal.time_factor_by_quant:  # calibrated only where probes did
                time_err.append(abs(te))
        share = "" if p.cpu_share is None else f"{p.cpu_share:.2f}"
        print(f"{label(r) + (' cal' if r.get('cal') else ''):<49} {est.peak_bytes / 2**20:>9.0f} "
              f"{p.peak_rss_bytes / 2**20:>9.0f} {me:>+7.1%} {est.step_time_s:>8.3f} {p.step_s:>8.3f} {te:>+7.1%} "
              f"{cold:>8.3f} {ce:>+7.1%} {share:>5} {p.tokens_per_s:>7.0f}  "
              f"{' '.join(f'{t:.2f}' for t in p.step_times)}")
    return mem_err, time_err, cold_err


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


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _max(xs: list[float]) -> float:
    return max(xs) if xs else float("nan")


class _FirstProbe(Exception):
    """Raised from tune's trial callback at its first probe: the bench only times the way there."""


def first_probe_seconds(root: str) -> float:
    """Seconds from `tune --auto --dry-run` starting on a 151,936-vocabulary folder to its first probe, on an
    empty cache (rooflines, machine model and all are measured on the way)."""
    import json

    from lowres.advisor.tune import tune
    from lowres.config import load_config

    folder = os.path.join(root, "qwen2.5-0.5b-4l-firstprobe")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(FAMILIES["qwen2.5-0.5b-4l"][0], f)
    cfg = load_config(None, [f"model.name={folder}", "model.weights=random-init", "data.max_length=256",
                             "train.batch_size=4", "tracking.mlflow=false"], use_env=False)
    saved = os.environ.get("LOWRES_CACHE_DIR")
    os.environ["LOWRES_CACHE_DIR"] = tempfile.mkdtemp(prefix="lowres-cold-")

    def stop(event: str, trial) -> None:
        if event == "start":
            raise _FirstProbe

    t0 = time.perf_counter()
    try:
        tune(cfg, dry_run=True, on_trial=stop, rank=8)
    except _FirstProbe:
        pass
    finally:
        if saved is None:
            os.environ.pop("LOWRES_CACHE_DIR", None)
        else:
            os.environ["LOWRES_CACHE_DIR"] = saved
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="12 configurations, shorter sequences")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per probe")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    ap.add_argument("--data", default="hdfs_logs", help="shipped sample to train on")
    ap.add_argument("--skip-tune", action="store_true", help="leave out part 2 (tune against the sweep)")
    args = ap.parse_args()
    from lowres.advisor.calibrate import machine_load
    from lowres.hardware import detect

    load_start = machine_load()
    hw = detect()
    native = [f for f in hw.cpu.flags if f.startswith(("avx512_bf16", "amx"))] or ["no native bf16"]
    print(f"CPU: {hw.cpu.model} ({', '.join(native)}); load {load_start}", file=sys.stderr)
    rows, sweep = grid(args.quick)
    work = tempfile.mkdtemp(prefix="lowres-families-")
    rows += family_rows(work, hw.cpu.bf16_fast)
    first_s = first_probe_seconds(work)
    print(f"tune --auto --dry-run on a 151,936-token vocabulary reached its first probe in {first_s:.1f} s",
          file=sys.stderr)
    print(f"measuring {len(rows)} configurations ({sum(bool(r.get('cal')) for r in rows)} for calibration)",
          file=sys.stderr)
    t0 = time.perf_counter()
    measure(rows, args)
    mem_err, time_err, cold_err = judge(rows, calibrate(rows))
    print(f"\njudged on {len(mem_err)} configurations; memory |err| median {_med(mem_err):.1%} "
          f"max {_max(mem_err):.1%}; calibrated step time |err| median {_med(time_err):.1%} max {_max(time_err):.1%} "
          f"on {len(time_err)}; cold (uncalibrated) step time |err| median {_med(cold_err):.1%} max "
          f"{_max(cold_err):.1%} on {len(cold_err)} (probes whose steps got under 40 % of their cores are not "
          f"timed)  ({time.perf_counter() - t0:.0f} s of probing)")
    if args.skip_tune:
        print(f"RESULT mem_median_err={_med(mem_err):.3f} mem_max_err={_max(mem_err):.3f} "
              f"time_median_err={_med(time_err):.3f} cold_time_median_err={_med(cold_err):.3f} "
              f"timed_n={len(cold_err)} chosen_vs_best=nan tune_seconds=nan first_probe_s={first_s:.1f} "
              f"load_start={load_start.get('load1', float('nan')):.2f} "
              f"load_end={machine_load().get('load1', float('nan')):.2f}")
        return

    # tune starts from an empty calibration cache, so nothing learnt before may help it; the machine's
    # roofline (measured once per machine, like `lowres hw` does) is copied over
    from lowres.advisor import calibrate as cal_mod
    from lowres.train.mfu import cache_path as roofline_cache

    roofline_file = roofline_cache()
    bandwidth = {k: v for k, v in cal_mod._read().items() if k.endswith(("|bandwidth", "|machine"))}
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
    load_end = machine_load()
    print(f"RESULT mem_median_err={_med(mem_err):.3f} mem_max_err={_max(mem_err):.3f} "
          f"time_median_err={_med(time_err):.3f} cold_time_median_err={_med(cold_err):.3f} timed_n={len(cold_err)} "
          f"chosen_vs_best={ratio:.3f} tune_seconds={tune_s:.1f} first_probe_s={first_s:.1f} "
          f"load_start={load_start.get('load1', float('nan')):.2f} load_end={load_end.get('load1', float('nan')):.2f}")


if __name__ == "__main__":
    main()
