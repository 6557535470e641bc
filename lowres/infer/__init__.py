"""Measured inference: `lowres generate` and `lowres chat` as functions.

    gen = Generator.load(model="SmolLM2-135M-Instruct")          # or Generator.load(run_dir="runs/latest")
    out = gen.generate("What is the capital of France?", max_new_tokens=64)
    out.text, out.ttft_s, out.tokens_per_s, out.peak_rss_bytes, out.predicted_peak_bytes
"""

from lowres.infer.generate import Generation, Generator

__all__ = ["Generation", "Generator"]
