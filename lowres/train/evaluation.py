"""Evaluation and reloading of a trained adapter: the loss the recipe reports, `lowres eval`, `lowres export`.

A run's output folder holds what is needed to rebuild its model: ``config.yaml`` (the resolved RunConfig),
``tokenizer/`` and ``adapter/`` (peft safetensors). The base is loaded the way the run loaded it (a
random-init base is rebuilt from the same seed, so it is the same base), then the adapter weights go in.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowres.errors import CheckpointError
from lowres.train.loss import causal_lm_loss, causal_lm_loss_and_correct


def autocast_context(precision: Any, device: str):
    """``torch.autocast`` to the compute dtype where the weights are stored wider; otherwise nothing."""
    if getattr(precision, "autocast", False):
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                              dtype=precision.compute_torch_dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: Any, blocks: Any, batch_size: int, chunk_tokens: int, max_batches: int | None,
             precision: Any = None, device: str = "cpu", accuracy: bool = False) -> dict | None:
    """Mean next-token loss per label token and its perplexity over ``blocks`` in order (the first
    ``max_batches`` batches); None when there are no blocks. Dropout is off while it runs. ``accuracy``
    adds ``accuracy``: top-1 next-token accuracy over the same label tokens, and ``examples``: blocks read."""
    n = len(blocks)
    if n == 0:
        return None
    was_training = model.training
    model.eval()
    _keep_4bit_layout(model)
    total, tokens, batches, correct, examples = 0.0, 0, 0, 0, 0
    try:
        for start in range(0, n, batch_size):
            if max_batches is not None and batches >= max_batches:
                break
            part = blocks.select(torch.arange(start, min(n, start + batch_size)))
            batch = {"input_ids": part.input_ids.to(device), "labels": part.labels.to(device)}
            if part.attention_mask is not None:
                batch["attention_mask"] = part.attention_mask.to(device)
            with autocast_context(precision, device):
                if accuracy:
                    loss, count, right = causal_lm_loss_and_correct(model, batch, chunk_tokens)
                    correct += right
                else:
                    loss, count = causal_lm_loss(model, batch, chunk_tokens)
            total += float(loss)
            tokens += count
            batches += 1
            examples += len(part)
    finally:
        model.train(was_training)
    if tokens == 0:
        return None
    mean = total / tokens
    out = {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": tokens, "batches": batches}
    if accuracy:
        out |= {"accuracy": correct / tokens, "examples": examples}
    return out


def _keep_4bit_layout(model: Any) -> None:
    """Leave bitsandbytes 4-bit linears in training mode during eval.

    In eval mode on an AVX512-BF16 CPU, bitsandbytes 0.50 repacks each 4-bit weight for its inference kernel
    the first time it runs, which asserts for out_features that are not a multiple of 32 (the tiny preset's
    688) and leaves training afterwards with the repacked layout. The flag changes nothing else for these
    modules (they hold no dropout): LoRA dropout lives in its own modules, which stay in eval mode.
    """
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
            module.train(True)


@dataclass
class TrainedRun:
    """A run's output folder, found from the folder itself or its ``adapter/`` subfolder."""

    root: Path
    config_path: Path
    adapter_dir: Path
    tokenizer_dir: Path


def find_run(path: str | Path) -> TrainedRun:
    """The run folder ``path`` points at (the output dir, or its adapter folder); CheckpointError if incomplete."""
    p = Path(path).expanduser()
    root = p.parent if (p / "adapter_config.json").is_file() and not (p / "config.yaml").is_file() else p
    run = TrainedRun(root, root / "config.yaml", root / "adapter", root / "tokenizer")
    missing = [str(x) for x in (run.config_path, run.adapter_dir / "adapter_model.safetensors",
                                run.tokenizer_dir) if not x.exists()]
    if missing:
        raise CheckpointError(f"{str(p)!r} is not a finished lowres run: missing {', '.join(missing)}",
                              hint="give the --output-dir of a `lowres train` run that reached its last step")
    from lowres.train.checkpoint import check_safetensors

    check_safetensors(run.adapter_dir / "adapter_model.safetensors", "adapter file",  # before any model loads
                      hint="the run's adapter is damaged: export it again from a checkpoint, or retrain")
    return run


def load_trained(run: TrainedRun, cfg: Any, device: str, quantized: bool = True) -> tuple[Any, Any, Any]:
    """(peft model with the run's adapter, tokenizer, resolved precision). ``quantized=False`` loads the base
    unquantized in the compute dtype (merging LoRA into 4-bit weights would round it away)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from lowres.models import load_model, locate_weights, resolve_precision

    precision_cfg = cfg.precision if quantized else cfg.precision.model_copy(update={"quant": "none"})
    rp = resolve_precision(precision_cfg, device=device)
    loc = locate_weights(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(str(run.tokenizer_dir))
    model, _ = load_model(loc, rp, cfg.lora, False, device=device, seed=cfg.train.seed)
    result = set_peft_model_state_dict(model, load_file(str(run.adapter_dir / "adapter_model.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"the adapter in {str(run.adapter_dir)!r} does not fit the model of its config: "
                              f"unexpected {result.unexpected_keys[:3]}")
    return model, tokenizer, rp
