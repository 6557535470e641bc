"""lowres' train recipe vs Hugging Face ``Trainer`` + PEFT: same model, data and settings, interleaved.

    .venv/bin/python bench/harness_vs_hf.py            # SmolLM2-135M (random-init), a few minutes on 2 cores
    .venv/bin/python bench/harness_vs_hf.py --quick    # the tiny preset, seconds

Three contenders share one process and take turns, round after round, so a noisy neighbour slows all of
them alike: HF Trainer + PEFT in fp32 (its CPU default), lowres in fp32 (equal settings), lowres in bf16
(what lowres picks on a CPU with AVX512_BF16). Each round runs ``--steps`` optimizer steps per contender;
the first ``--warmup`` steps of each round are dropped. Throughput is tokens per second of the kept steps;
ratios are per round, then the median and the spread (min-max) over rounds are printed.
Last line: ``RESULT ratio_equal_settings=… ratio_best_vs_hf_default=… mfu_135m=…``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = ("In the beginning the student had only a laptop, and the laptop had only a CPU. Still she wanted to "
          "teach a small language model the manners of her logs, one line at a time, without a GPU. ")


def lowres_config(args, out: Path, compute: str):
    from lowres.config import load_config

    return load_config(None, [
        f"output_dir={out / compute}", f"model.name={args.model}", f"data.path={args.data}",
        f"data.max_length={args.seq_len}", "data.eval_fraction=0", f"train.batch_size={args.batch_size}",
        f"train.max_steps={10_000}", "train.lr=2e-4", "train.warmup_steps=2", "train.warmup_ignore_steps=0",
        f"lora.rank={args.rank}", "lora.targets=attention_mlp", f"precision.compute={compute}",
        "tracking.mlflow=false", 'tracking.profiler_mode="off"', "tracking.jsonl=false",
    ], use_env=False)


class HFContender:
    """HF Trainer + PEFT on the same architecture, the same token blocks, the same LoRA and optimizer settings."""

    def __init__(self, args, recipe, out: Path):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        spec = recipe.loc.spec
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(spec.to_hf_config(), dtype=torch.float32)
        base.config.use_cache = False
        self.model = get_peft_model(base, LoraConfig(
            r=args.rank, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        blocks = recipe.data.train
        self.dataset = [{"input_ids": blocks.input_ids[i], "labels": blocks.labels[i]} for i in range(len(blocks))]
        self.args, self.out = args, out

    def run(self, steps: int) -> list[tuple[float, int]]:
        """(seconds, tokens) of each of ``steps`` optimizer steps through a fresh Trainer."""
        from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

        times: list[tuple[float, int]] = []
        tokens = self.args.batch_size * self.args.seq_len

        class Timer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                times.append((time.perf_counter() - self.t0, tokens))

        targs = TrainingArguments(
            output_dir=str(self.out / "hf"), per_device_train_batch_size=self.args.batch_size, max_steps=steps,
            learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0,
            logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
            disable_tqdm=True, seed=0)
        Trainer(model=self.model, args=targs, train_dataset=self.dataset, data_collator=default_data_collator,
                callbacks=[Timer()]).train()
        return times


def lowres_steps(recipe, steps: int) -> list[tuple[float, int]]:
    start = len(recipe.history)
    recipe.train(steps=steps)
    return [(r["step_seconds"], r["tokens"]) for r in recipe.history[start:]]


def tps(times: list[tuple[float, int]], warmup: int) -> float:
    kept = times[warmup:] or times
    return sum(t for _, t in kept) / sum(s for s, _ in kept)


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny preset, short sequences: seconds, not minutes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per contender per round")
    p.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of each round")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args()
    args.model = "tiny" if args.quick else "SmolLM2-135M"
    args.seq_len = args.seq_len or (64 if args.quick else 256)

    import torch
    from rich.console import Console

    from lowres.hardware import detect
    from lowres.train.recipe import Recipe

    with tempfile.TemporaryDirectory(prefix="lowres-bench-") as tmp:
        out = Path(tmp)
        args.data = str(out / "corpus.txt")
        Path(args.data).write_text("\n".join(f"{i}: {CORPUS * 3}" for i in range(400)))
        quiet = Console(stderr=True, quiet=True)
        recipes = {}
        for compute in ("fp32", "bf16"):
            recipes[compute] = Recipe(lowres_config(args, out, compute), console=quiet, progress=False).setup()
        hf = HFContender(args, recipes["fp32"], out)
        hw = detect()
        print(f"model {args.model} (random-init, {recipes['fp32'].info['params_total'] / 1e6:.1f}M params), "
              f"seq {args.seq_len} × batch {args.batch_size}, LoRA r={args.rank} attention_mlp, "
              f"{torch.get_num_threads()} threads, CPU {hw.cpu.model}, bf16_fast={hw.cpu.bf16_fast}", flush=True)

        ratios_equal, ratios_best, mfus = [], [], []
        for r in range(args.rounds):
            hf_tps = tps(hf.run(args.steps), args.warmup)
            fp32_tps = tps(lowres_steps(recipes["fp32"], args.steps), args.warmup)
            bf16_tps = tps(lowres_steps(recipes["bf16"], args.steps), args.warmup)
            rb = recipes["bf16"]
            mfus.append(bf16_tps * rb.flops_per_token / rb.roofline.flops_per_s)
            ratios_equal.append(fp32_tps / hf_tps)
            ratios_best.append(bf16_tps / hf_tps)
            print(f"round {r + 1}: HF fp32 {hf_tps:,.0f} tok/s · lowres fp32 {fp32_tps:,.0f} tok/s · "
                  f"lowres bf16 {bf16_tps:,.0f} tok/s · bf16 MFU {mfus[-1]:.1%}", flush=True)

        rb = recipes["bf16"]
        print(f"lowres fp32 / HF fp32 (equal settings): {spread(ratios_equal)}")
        print(f"lowres bf16 / HF fp32 (best here vs HF default): {spread(ratios_best)}")
        print(f"MFU (lowres bf16): {spread(mfus)} — {rb.flops_per_token / 1e6:.1f} MFLOP/token over a "
              f"{rb.roofline.flops_per_s / 1e9:.0f} GFLOP/s roofline (this model's GEMMs in bf16, "
              f"{rb.roofline.threads} threads, {rb.roofline.source})")
        for recipe in recipes.values():
            recipe.cleanup()
        name = "mfu_tiny" if args.quick else "mfu_135m"
        print(f"RESULT ratio_equal_settings={statistics.median(ratios_equal):.3f} "
              f"ratio_best_vs_hf_default={statistics.median(ratios_best):.3f} {name}={statistics.median(mfus):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
