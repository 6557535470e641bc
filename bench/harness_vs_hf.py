"""lowres' train recipe vs Hugging Face ``Trainer`` + PEFT: same model, tokens and settings, interleaved.

    .venv/bin/python bench/harness_vs_hf.py            # SmolLM2-135M-Instruct (real weights), minutes on 2 cores
    .venv/bin/python bench/harness_vs_hf.py --quick    # the tiny preset, short sequences: well under a minute
    .venv/bin/python bench/harness_vs_hf.py --cpuinfo laptop-cpuinfo.txt   # contenders as on that CPU (a copy of its /proc/cpuinfo)
    .venv/bin/python bench/harness_vs_hf.py --isa avx2   # both sides' kernels capped to AVX2 (oneDNN, MKL, ATen)

Contenders, each in its own worker process (so peak RSS is each one's own) and taking turns round after round
(the order rotates each round), so a noisy neighbour slows all of them alike:

* HF Trainer + PEFT in fp32 (its CPU default);
* lowres in fp32 (equal settings);
* lowres in what ``precision: auto`` picks on this CPU (bf16 with AVX512_BF16/AMX; fp32 elsewhere, where this
  contender *is* the fp32 one — lowres refuses emulated bf16, so the bench never asks for it).

Both sides get the same packed token blocks (no padding) in the same order; the first forward of each is
hashed and compared. Each round runs ``--steps`` optimizer steps per contender; the first ``--warmup`` of each
round are dropped. Throughput is tokens per second of the kept steps; ratios are per round, then the median
and spread (min-max) over rounds. MFU of the best contender is over the largest peak FLOP/s seen: the cached
or measured roofline, one re-measurement per round, and the achieved rate itself — the recipe's re-measure
rule (a roofline measured while the machine was busy is neither trusted nor cached), so it never reads above
100 %. Memory: peak RSS of the training steps (VmHWM reset after setup), lowres fp32 over HF fp32.
Where the best contender is not the fp32 one, the fp32 contender's MFU over its own fp32 peak (the same rule)
is printed too, and follows ``dtype=…`` in the RESULT line as ``mfu_fp32=…``.
Last line: ``RESULT ratio_equal_settings=… ratio_best_vs_hf_default=… mfu_135m=… mem_ratio=… isa=… dtype=…``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = ("In the beginning the student had only a laptop, and the laptop had only a CPU. Still she wanted to "
          "teach a small language model the manners of her logs, one line at a time, without a GPU. ")


# ---------------------------------------------------------------------------------------- the machine
# --isa: the settings that cap the ISA of torch's CPU kernels, for both contenders (their workers inherit the
# environment) and for lowres' own detection (lowres.hardware.cpu.isa_cap reads the same variables).
ISA_ENV = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "ATEN_CPU_CAPABILITY": "avx512"},
    "avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
                    "ATEN_CPU_CAPABILITY": "avx512"},
}


def machine(cpuinfo: str | None = None):
    """This machine's HardwareProfile; ``cpuinfo`` (a /proc/cpuinfo-format file) replaces its CPU, to see
    what the bench would race on another CPU (e.g. an AVX2-only laptop)."""
    from lowres.hardware import detect
    from lowres.hardware.cpu import read_cpu

    hw = detect()
    if cpuinfo:
        hw = hw.model_copy(update={"cpu": read_cpu(cpuinfo)})
    return hw


def uncapped_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's relevant flags as /proc/cpuinfo (or ``cpuinfo``) lists them, before any ISA setting caps them."""
    from lowres.hardware.cpu import parse_cpuinfo

    return parse_cpuinfo(Path(cpuinfo or "/proc/cpuinfo").read_text(errors="replace"))[1]


def best_compute(hw, model: str | None = None, tokens: int = 0, threads: int = 0) -> tuple[str, str]:
    """(dtype, reason): what ``precision: auto`` resolves to on ``hw`` — lowres' best contender there. With
    ``model`` (this machine, not a simulated CPU) it is the recipe's decision: bf16 kept only where its GEMMs
    at the model's shapes measure fast enough against fp32's (lowres.train.mfu.measured_auto_precision)."""
    from lowres.config import PrecisionConfig
    from lowres.models import resolve_precision

    p = PrecisionConfig(compute="auto")
    rp = resolve_precision(p, hw, "cpu")
    if model:
        import torch

        from lowres.config import ModelConfig
        from lowres.models import locate_weights
        from lowres.train.mfu import measured_auto_precision

        torch.set_num_threads(threads or torch.get_num_threads())  # the rooflines are keyed by threads
        rp = measured_auto_precision(p, rp, hw, locate_weights(ModelConfig(name=model)).spec, tokens)
    return rp.compute_dtype, rp.reasons[0]


def contenders(hw, best: str | None = None) -> dict[str, str]:
    """name → what it runs: HF fp32, lowres fp32, and lowres' auto pick when that is not fp32."""
    best = best or best_compute(hw)[0]
    out = {"hf-fp32": "hf", "lowres-fp32": "fp32"}
    if best != "fp32":
        out[f"lowres-{best}"] = best
    return out


# ---------------------------------------------------------------------------------------- workers
def lowres_config(args, out: Path, compute: str, extra: list[str] = ()):
    from lowres.config import load_config

    return load_config(None, [
        f"output_dir={out / compute}", f"model.name={args['model']}", f"data.path={args['data']}",
        f"data.max_length={args['seq_len']}", "data.eval_fraction=0", f"train.batch_size={args['batch_size']}",
        f"train.max_steps={10_000}", "train.lr=2e-4", "train.warmup_steps=2", "train.warmup_ignore_steps=0",
        f"lora.rank={args['rank']}", "lora.targets=attention_mlp", f"precision.compute={compute}",
        "tracking.mlflow=false", 'tracking.profiler_mode="off"', "tracking.jsonl=false", *extra,
    ], use_env=False)


def first_forward_probe(model):
    """Record (sha1 of the token ids, tokens) of the first forward through the input embedding."""
    import torch

    seen: dict = {}
    emb = model.get_input_embeddings()

    @torch.compiler.disable  # hashing is not traceable: under train.compile it runs eagerly, outside the graph
    def hook(_module, inputs):
        if not seen:
            ids = inputs[0].detach().cpu().contiguous()
            seen.update(sha1=hashlib.sha1(ids.numpy().tobytes()).hexdigest()[:12], tokens=int(ids.numel()),
                        shape=list(ids.shape))

    emb.register_forward_pre_hook(hook)
    return seen


def peak_rss() -> int:
    from lowres.train.timing import peak_memory

    return peak_memory(False)


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM restarts from the current RSS
        return True
    except OSError:
        return False


class LowresWorker:
    def __init__(self, args: dict, compute: str):
        from rich.console import Console

        from lowres.train.recipe import Recipe

        out = Path(args["tmp"])
        self.recipe = Recipe(lowres_config(args, out, compute, args.get("set", [])),
                             console=Console(stderr=True, quiet=True), progress=False).setup()
        self.first = first_forward_probe(self.recipe.model)
        r = self.recipe
        if compute == "fp32":  # the blocks in the order lowres draws them: HF gets the same ones
            import torch

            from lowres.data import BatchIterator

            order = BatchIterator(r.data.train, 1, r.cfg.train.seed)
            rows = [int(order._permutation(0)[i]) for i in range(len(r.data.train))]
            blocks = r.data.train.select(torch.tensor(rows))
            torch.save({"input_ids": blocks.input_ids, "labels": blocks.labels,
                        "attention_mask": blocks.attention_mask}, out / "blocks.pt")
        self.info = {"dtype": r.precision.compute_dtype, "params_total": r.info["params_total"],
                     "threads": r.info["threads"], "weights": r.info["weights_source"],
                     "flops_per_token": r.flops_per_token, "roofline": r.roofline.flops_per_s,
                     "roofline_source": r.roofline.source, "packed": r.data.train.attention_mask is None,
                     "block_length": int(r.data.train.input_ids.shape[1]), "malloc": r.info["malloc"]}

    def run(self, steps: int) -> list[tuple[float, int]]:
        start = len(self.recipe.history)
        self.recipe.train(steps=steps)
        self.losses = [h["loss"] for h in self.recipe.history[start:]]
        self.info["compile"] = self.recipe.info.get("compile")  # train.compile=auto decides mid-run
        self.info["compile_seconds"] = self.recipe._compile_info().get("compile_seconds")
        return [(h["step_seconds"], h["tokens"]) for h in self.recipe.history[start:]]

    def roofline(self) -> float:
        from lowres.train.mfu import measure_gemm_flops

        r = self.recipe.roofline
        return measure_gemm_flops(r.shapes, r.dtype, "cpu", budget_s=1.5)

    def finish(self, achieved: float) -> dict:
        """The recipe's re-measure rule: an achieved rate above the roofline re-measures it (and caches the
        larger figure); then the run's folder lock is released."""
        from lowres.train.mfu import raise_to_achieved

        r = self.recipe
        new = raise_to_achieved(r.roofline, achieved, fingerprint=r.hw.fingerprint, device="cpu")
        r.cleanup()
        return {"roofline": new.flops_per_s, "roofline_source": new.source,
                "compile_seconds": r._compile_info().get("compile_seconds")}


class HFWorker:
    """HF Trainer + PEFT on the same weights, token blocks (same order), LoRA and optimizer settings."""

    def __init__(self, args: dict):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from lowres.config import ModelConfig
        from lowres.models import locate_weights

        torch.set_num_threads(args["threads"])
        malloc = "glibc's defaults"
        if args.get("hf_malloc_tuning"):  # lowres' allocator setting, given to HF too: what it alone buys
            from lowres.train.allocator import tune_malloc

            malloc = tune_malloc()
        loc = locate_weights(ModelConfig(name=args["model"]))
        if loc.path and loc.kind != "random-init":
            base = AutoModelForCausalLM.from_pretrained(loc.path, dtype=torch.float32)
        else:
            from lowres.models.loading import random_model

            base = random_model(loc.spec.to_hf_config(), torch.float32, 0)  # lowres' random init, train.seed = 0
        base.config.use_cache = False
        torch.manual_seed(0)
        self.model = get_peft_model(base, LoraConfig(
            r=args["rank"], lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        self.first = first_forward_probe(self.model)
        blocks = torch.load(Path(args["tmp"]) / "blocks.pt")
        self.dataset = [{"input_ids": blocks["input_ids"][i], "labels": blocks["labels"][i]}
                        | ({} if blocks["attention_mask"] is None else {"attention_mask": blocks["attention_mask"][i]})
                        for i in range(len(blocks["input_ids"]))]
        self.args, self.out = args, Path(args["tmp"])
        self.info = {"dtype": "fp32", "threads": torch.get_num_threads(), "packed": blocks["attention_mask"] is None,
                     "malloc": malloc}

    def run(self, steps: int) -> list[tuple[float, int]]:
        """(seconds, tokens) of each of ``steps`` optimizer steps through a fresh Trainer."""
        from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

        times: list[tuple[float, int]] = []
        tokens = self.args["batch_size"] * self.args["seq_len"]

        class Timer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                times.append((time.perf_counter() - self.t0, tokens))

        targs = TrainingArguments(
            output_dir=str(self.out / "hf"), per_device_train_batch_size=self.args["batch_size"], max_steps=steps,
            learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0,
            logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
            disable_tqdm=True, seed=0, train_sampling_strategy="sequential")
        Trainer(model=self.model, args=targs, train_dataset=self.dataset, data_collator=default_data_collator,
                callbacks=[Timer()]).train()
        return times

    def roofline(self) -> float:
        return 0.0

    def finish(self, achieved: float) -> dict:
        return {}


def worker_main(kind: str, args: dict) -> int:
    """A contender's process: set up, then answer one JSON line per command read from stdin."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # HF prints its train summary on stdout: keep the protocol channel clean

    def say(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    from lowres.cli.app import _quiet_third_party_noise

    _quiet_third_party_noise()  # as `lowres` does: bitsandbytes' offline hub-kernel warning, a v5 deprecation
    w = HFWorker(args) if kind == "hf" else LowresWorker(args, kind)
    setup_peak = peak_rss()
    reset = reset_peak_rss()
    say({"ready": True, "info": w.info, "setup_peak_rss": setup_peak, "peak_reset": reset})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "run":
            times = w.run(cmd["steps"])
            say({"times": times, "peak_rss": peak_rss(), "first": dict(w.first), "losses": getattr(w, "losses", []),
                 "info": getattr(w, "info", {})})
        elif cmd["cmd"] == "roofline":
            say({"roofline": w.roofline()})
        elif cmd["cmd"] == "finish":
            say(w.finish(cmd.get("achieved", 0.0)))
            return 0
    return 0


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, name: str, kind: str, args: dict):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--worker-args", json.dumps(args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()
        self.peak = 0

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the {self.name} worker exited with status {self.proc.wait()} (its stderr is "
                             "above); nothing was measured")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self, achieved: float = 0.0) -> dict:
        out = self.ask(cmd="finish", achieved=achieved)
        self.proc.wait(timeout=120)
        return out


# ---------------------------------------------------------------------------------------- the race
def tps(times: list, warmup: int) -> float:
    kept = times[warmup:] or times
    return sum(t for _, t in kept) / sum(s for s, _ in kept)


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def load_now() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny preset, short sequences: seconds, not minutes")
    p.add_argument("--model", default=None, help="model (default SmolLM2-135M-Instruct; --quick: tiny)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per contender per round")
    p.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of each round")
    p.add_argument("--warm-steps", type=int, default=10, help="steps every contender runs once before the rounds, "
                   "not measured: warm caches, and lowres' train.compile=auto decision (timed eager steps, the "
                   "compiling step, timed compiled steps: 8 steps) done before anything is compared")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--cpuinfo", default=None, help="a /proc/cpuinfo-format file: choose the contenders as on that "
                   "CPU (the run itself still uses this one)")
    p.add_argument("--isa", choices=["native", *ISA_ENV], default="native",
                   help="cap the ISA every contender's kernels may use (oneDNN, MKL and ATen's settings, which "
                   "lowres' detection also reads): what a CPU without AMX, or an AVX2-only one, gets — measured "
                   "on this CPU's cores, caches and memory, so a stand-in for that CPU, not the CPU itself")
    p.add_argument("--set", action="append", default=[], metavar="A.B=C",
                   help="extra lowres config for both lowres contenders (e.g. train.compile=true)")
    p.add_argument("--hf-malloc-tuning", action="store_true", help="give the HF contender lowres' malloc setting "
                   "too (train.malloc_tuning: glibc keeps freed blocks for reuse), to see what it alone buys")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.worker_args))
    if args.isa != "native":
        os.environ.update(ISA_ENV[args.isa])  # before torch loads: the workers inherit it
    model = args.model or ("tiny" if args.quick else "SmolLM2-135M-Instruct")
    seq_len = args.seq_len or (64 if args.quick else 256)

    from lowres.hardware import usable_cpus
    from lowres.hardware.profile import isa_label

    hw = machine(args.cpuinfo)
    isa = isa_label(hw.cpu.flags)
    best, why = best_compute(hw, None if args.cpuinfo else model, args.batch_size * seq_len, usable_cpus())
    race = contenders(hw, best)
    print(f"CPU {hw.cpu.model}, ISA {isa} ({', '.join(hw.cpu.flags) or 'none'}"
          f"{', simulated from ' + args.cpuinfo if args.cpuinfo else ''}"
          f"{'; capped by ' + hw.cpu.isa_capped_by if hw.cpu.isa_capped_by else ''}); "
          f"precision auto → {best} ({why})")
    print(f"load average at start: {load_now()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="lowres-bench-") as tmp:
        data = Path(tmp) / "corpus.txt"
        data.write_text("\n".join(f"{i}: {CORPUS * 3}" for i in range(400)))
        wargs = dict(model=model, data=str(data), seq_len=seq_len, batch_size=args.batch_size, rank=args.rank,
                     tmp=tmp, threads=usable_cpus(), set=args.set, hf_malloc_tuning=args.hf_malloc_tuning)
        workers: dict[str, Worker] = {}
        try:
            workers["lowres-fp32"] = Worker("lowres-fp32", "fp32", wargs)  # first: it writes the token blocks
            for name, kind in race.items():
                if name not in workers:
                    workers[name] = Worker(name, kind, wargs)
            info = workers["lowres-fp32"].ready["info"]
            best_name = f"lowres-{best}"
            bi = workers[best_name].ready["info"]
            print(f"model {model} ({info['weights']}, {info['params_total'] / 1e6:.1f}M params), seq {seq_len} × "
                  f"batch {args.batch_size}, LoRA r={args.rank} attention_mlp, {info['threads']} threads each; "
                  f"packed blocks of {info['block_length']} tokens, no padding: {info['packed']}", flush=True)
            print("malloc: " + " · ".join(f"{n} {w.ready['info'].get('malloc', '?')}" for n, w in workers.items()),
                  flush=True)
            names = list(workers)
            if args.warm_steps:
                warm = {n: workers[n].ask(cmd="run", steps=args.warm_steps) for n in names}
                print(f"warm-up: {args.warm_steps} steps each, not measured; " + " · ".join(
                    f"{n} compile: {rep['info'].get('compile')}" for n, rep in warm.items() if n != "hf-fp32"),
                    flush=True)
            rates: dict[str, list[float]] = {n: [] for n in names}
            peaks: dict[str, list[float]] = {"roofline": [bi["roofline"]], "fp32": [info["roofline"]]}
            for r in range(args.rounds):
                order = names[r % len(names):] + names[: r % len(names)]  # rotate: no contender always first
                replies = {n: workers[n].ask(cmd="run", steps=args.steps) for n in order}
                peaks["roofline"].append(workers[best_name].ask(cmd="roofline")["roofline"])
                if best_name != "lowres-fp32":  # the equal-settings contender's own peak, for its MFU
                    peaks["fp32"].append(workers["lowres-fp32"].ask(cmd="roofline")["roofline"])
                for n, rep in replies.items():
                    rates[n].append(tps(rep["times"], args.warmup))
                    workers[n].peak = rep["peak_rss"]
                    workers[n].first = rep["first"]
                print(f"round {r + 1} (load {load_now()}): " + " · ".join(
                    f"{n} {rates[n][-1]:,.0f} tok/s" for n in names), flush=True)
            same = workers["hf-fp32"].first == workers["lowres-fp32"].first
            print(f"first batch: HF {workers['hf-fp32'].first} · lowres {workers['lowres-fp32'].first} → "
                  f"{'the same tokens' if same else 'DIFFERENT tokens'}")
            achieved = [t * bi["flops_per_token"] for t in rates[best_name]]
            achieved32 = [t * info["flops_per_token"] for t in rates["lowres-fp32"]]
            closing = {n: w.close(max(achieved) if n == best_name else max(achieved32) if n == "lowres-fp32" else 0.0)
                       for n, w in workers.items()}
        finally:
            for w in workers.values():
                if w.proc.poll() is None:
                    w.proc.kill()
        peak = max(peaks["roofline"] + [closing[best_name].get("roofline", 0.0)] + achieved)
        mfus = [a / peak for a in achieved]
        peak32 = peak if best_name == "lowres-fp32" else max(
            peaks["fp32"] + [closing["lowres-fp32"].get("roofline", 0.0)] + achieved32)
        mfus32 = [a / peak32 for a in achieved32]
        equal = [a / h for a, h in zip(rates["lowres-fp32"], rates["hf-fp32"])]
        best_ratio = [a / h for a, h in zip(rates[best_name], rates["hf-fp32"])]
        mem_ratio = workers["lowres-fp32"].peak / workers["hf-fp32"].peak
        print(f"lowres fp32 / HF fp32 (equal settings): {spread(equal)}")
        print(f"lowres {best} / HF fp32 (what auto picks here vs HF's default): {spread(best_ratio)}")
        print(f"MFU (lowres {best}): {spread(mfus)} — {bi['flops_per_token'] / 1e6:.1f} MFLOP/token over a "
              f"{peak / 1e9:.0f} GFLOP/s peak: the largest of the setup roofline ({bi['roofline'] / 1e9:.0f}, "
              f"{bi['roofline_source']}), {args.rounds} re-measurements "
              f"({', '.join(f'{x / 1e9:.0f}' for x in peaks['roofline'][1:])}) and the achieved rates")
        if best_name != "lowres-fp32":
            print(f"MFU (lowres fp32, the equal-settings contender): {spread(mfus32)} over its own "
                  f"{peak32 / 1e9:.0f} GFLOP/s fp32 peak (the same rule)")
        for n, w in workers.items():
            print(f"peak RSS {n}: {w.peak / 2**20:,.0f} MiB while training (setup peak "
                  f"{w.ready['setup_peak_rss'] / 2**20:,.0f} MiB{'' if w.ready['peak_reset'] else '; not reset'})")
        print(f"lowres fp32 / HF fp32 peak RSS: {mem_ratio:.3f} · load average at end: {load_now()}")
        name = "mfu_tiny" if args.quick else "mfu_135m"
        print(f"RESULT ratio_equal_settings={statistics.median(equal):.3f} "
              f"ratio_best_vs_hf_default={statistics.median(best_ratio):.3f} {name}={statistics.median(mfus):.4f} "
              f"mem_ratio={mem_ratio:.3f} isa={isa} dtype={best}"
              + (f" mfu_fp32={statistics.median(mfus32):.4f}" if best_name != "lowres-fp32" else "")
              + (f" isa_capped_from={isa_label(sorted(uncapped_flags(args.cpuinfo)))}" if hw.cpu.isa_capped_by else ""))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
