"""Shared pieces of the train tests: a repetitive corpus, a tiny fast config, a temp MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

CORPUS_LINE = "the quick brown fox jumps over the lazy dog and the cat sat on the mat. "


def write_corpus(folder: Path, lines: int = 120) -> Path:
    path = folder / "corpus.txt"
    path.write_text("\n".join(CORPUS_LINE * 2 for _ in range(lines)) + "\n")
    return path


def tiny_overrides(tmp: Path, data: Path, steps: int = 10, **extra: object) -> list[str]:
    """A tiny run that takes seconds: 32-token blocks, batch 4, no profiler process, a temp MLflow store."""
    base = {
        "model.name": "tiny",  # the default model is the real 135M one; these runs must take seconds
        "output_dir": str(tmp / "out"),
        "data.path": str(data),
        "data.max_length": 32,
        "data.tokenizer_vocab": 512,
        "train.max_steps": steps,
        "train.batch_size": 4,
        "train.lr": 3e-3,
        "train.warmup_steps": 2,
        "train.eval_batches": 2,
        "lora.rank": 4,
        "tracking.mlflow_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "tracking.profiler_mode": '"off"',
        "tracking.jsonl": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items() if v is not None]  # None: leave the field to a flag


def subprocess_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LOWRES_CACHE_DIR"] = str(cache_dir)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env
