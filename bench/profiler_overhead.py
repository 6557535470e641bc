"""What sampling costs a training run: lowres' profiler at 1 Hz and 10 Hz (sampler process) and MLflow's own
SystemMetricsMonitor at its default (10 s) and at 0.1 s, against no profiler, on two fixed workloads:

- torch: LoRA steps of a small random-init Llama (hidden 256, 4 layers), mostly time in torch kernels;
- python: a greedy longest-match tokeniser in a pure Python loop, all time holding the GIL — where a
  sampler *thread* hurts most.

Configurations run interleaved in one process, in a fresh random order each round, and repeated. Each
monitored block (two units of one workload) sits between two unmonitored units of the same workload
(B A A B); its slowdown is the ratio of the two sums, reported as median and spread (min..max) over rounds. Samples taken vs expected and the sampler's own CPU per tick come from lowres' summaries.

    python bench/profiler_overhead.py            # about three minutes
    python bench/profiler_overhead.py --quick    # about a minute

The last line is machine-readable: ``RESULT slowdown_1hz=… slowdown_10hz=… samples_taken_ratio=…
mlflow_default_slowdown=… mlflow_0.1s_slowdown=… sampler_ms_per_tick=…`` (slowdowns: the worse workload).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

CONFIGS = ["none", "lowres_1hz", "lowres_10hz", "mlflow_default", "mlflow_0.1s"]


# -- workloads --------------------------------------------------------------------------------------------
def make_torch_workload():
    """One LoRA step function on a random-init Llama built from a config (no download)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                                              target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, cfg.vocab_size, (4, 128))

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_python_workload():
    """Tokenise a fixed text with a greedy longest-match over a fixed vocabulary, in a Python loop."""
    rng = random.Random(0)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = ["".join(rng.choice(letters[: rng.randint(5, 26)]) for _ in range(rng.randint(2, 10)))
             for _ in range(3000)]
    vocab = {w[:k] for w in words for k in range(1, min(len(w), 6) + 1)} | set(letters)
    vocab_ids = {t: i for i, t in enumerate(sorted(vocab))}
    text = [rng.choice(words) for _ in range(4000)]

    def step() -> None:
        ids = []
        for word in text:
            i = 0
            while i < len(word):
                for k in range(min(6, len(word) - i), 0, -1):
                    piece = word[i : i + k]
                    if piece in vocab_ids:
                        ids.append(vocab_ids[piece])
                        i += k
                        break
        assert ids

    return step


def calibrate(step, target_s: float) -> int:
    """Steps per unit so that one unit takes about ``target_s`` (after two warm-up steps)."""
    step()
    step()
    t = time.perf_counter()
    step()
    one = time.perf_counter() - t
    return max(1, round(target_s / one))


# -- monitors ---------------------------------------------------------------------------------------------
class Monitors:
    """Starts and stops each configuration's monitor around a round of both workloads."""

    def __init__(self, tmp: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.ERROR)
        self.uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.exp = self.client.create_experiment("profiler-overhead")
        self.summaries: dict[str, list] = {"lowres_1hz": [], "lowres_10hz": []}

    def start(self, config: str):
        from profiler import Profiler

        if config == "none":
            return None
        if config.startswith("lowres"):
            return Profiler(interval=1.0 if config == "lowres_1hz" else 0.1, mode="process").start()
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        run_id = self.client.create_run(self.exp).info.run_id
        mon = SystemMetricsMonitor(run_id, sampling_interval=10 if config == "mlflow_default" else 0.1,
                                   tracking_uri=self.uri)
        mon.start()
        mon._lowres_run = run_id
        return mon

    def stop(self, config: str, mon) -> None:
        if mon is None:
            return
        if config.startswith("lowres"):
            self.summaries[config].append(mon.stop())
            return
        mon.finish()
        self.client.set_terminated(mon._lowres_run)


# -- the benchmark ----------------------------------------------------------------------------------------
def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.4f}  [{min(values):.4f} .. {max(values):.4f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter rounds (about a minute)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--unit-s", type=float, default=None, help="seconds per workload unit")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine, using every core "
                         "makes the torch timings measure the other tenants, not the profiler)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 8)
    unit_s = args.unit_s or (0.4 if args.quick else 0.6)
    import torch

    torch.set_num_threads(args.torch_threads)

    print(f"building workloads (rounds={rounds}, unit≈{unit_s} s, torch threads={torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs) ...", flush=True)
    workloads = {"torch": make_torch_workload(), "python": make_python_workload()}
    steps = {name: calibrate(fn, unit_s) for name, fn in workloads.items()}
    print("steps per unit:", steps, flush=True)
    tmp = tempfile.mkdtemp(prefix="lowres-bench-")
    mons = Monitors(tmp)

    def unit(wname: str) -> float:
        fn, t = workloads[wname], time.perf_counter()
        for _ in range(steps[wname]):
            fn()
        return time.perf_counter() - t

    # Paired and mirrored (B A A B): a monitored block sits between two unmonitored units of the same
    # workload, so the other tenants' load, which drifts over seconds, hits both sides alike.
    ratios: dict[tuple[str, str], list[float]] = {(c, w): [] for c in CONFIGS[1:] for w in workloads}
    base: dict[str, list[float]] = {w: [] for w in workloads}
    rng = random.Random(1)
    for r in range(rounds):
        jobs = [(c, w) for c in CONFIGS[1:] for w in workloads]
        rng.shuffle(jobs)
        for config, wname in jobs:
            b1 = unit(wname)
            mon = mons.start(config)
            a = unit(wname) + unit(wname)
            mons.stop(config, mon)
            b2 = unit(wname)
            ratios[(config, wname)].append(a / (b1 + b2))
            base[wname] += [b1, b2]
        print(f"round {r + 1}/{rounds} done", flush=True)

    worst: dict[str, float] = {}
    print("\nslowdown vs no profiler: monitored / unmonitored time of paired units (median [min .. max])")
    for config in CONFIGS[1:]:
        for w in workloads:
            print(f"  {config:15s} {w:7s} {spread(ratios[(config, w)])}")
            worst[config] = max(worst.get(config, 0.0), statistics.median(ratios[(config, w)]))
    print("\nno-profiler unit times (s):", {w: spread(v) for w, v in base.items()})

    taken = expected = 0
    ms = []
    for config in ("lowres_1hz", "lowres_10hz"):
        sums = mons.summaries[config]
        t = sum(s.self_cost["ticks"] for s in sums)
        e = sum(s.self_cost["expected_ticks"] for s in sums)
        per_tick = [s.self_cost["ms_per_tick"] for s in sums]
        print(f"{config}: samples {t}/{e} taken ({t / e:.3f}); sampler ms/tick {spread(per_tick)}; "
              f"overhead ratio {spread([s.self_cost['overhead_ratio'] for s in sums])}")
        if config == "lowres_10hz":
            taken, expected, ms = t, e, per_tick
    print(f"RESULT slowdown_1hz={worst['lowres_1hz']:.4f} slowdown_10hz={worst['lowres_10hz']:.4f} "
          f"samples_taken_ratio={taken / expected:.3f} mlflow_default_slowdown={worst['mlflow_default']:.4f} "
          f"mlflow_0.1s_slowdown={worst['mlflow_0.1s']:.4f} sampler_ms_per_tick={statistics.median(ms):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
