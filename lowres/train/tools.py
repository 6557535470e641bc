"""What `lowres eval` and `lowres export` do with a finished run's folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lowres.errors import DataError, UsageError
from lowres.train.evaluation import TrainedRun, evaluate, load_trained


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_run(run: TrainedRun, data: str | None, max_batches: int | None, overrides: list[str]) -> dict:
    """Loss and perplexity of the run's adapter: on all of ``data`` when given, else on the run's eval split
    (the same seeded split the run held out)."""
    from lowres.config import load_config
    from lowres.data import build_data, read_records

    if max_batches is not None and max_batches < 1:
        raise UsageError(f"--batches must be at least 1, got {max_batches}", hint="leave it out to use every batch")
    cfg = load_config(run.config_path, overrides, use_env=False)
    data_cfg = cfg.data.model_copy(update={"path": data, "eval_fraction": 0.0}) if data else cfg.data
    records = read_records(data_cfg)  # DataError (missing, malformed, empty) before the model loads
    device = _device()
    model, tokenizer, rp = load_trained(run, cfg, device)
    if data:
        bundle = build_data(data_cfg, tokenizer, cfg.train.seed, records=records)
        blocks, where = bundle.train, data
    else:
        blocks, where = build_data(cfg.data, tokenizer, cfg.train.seed, records=records).eval, "the run's eval split"
    result = evaluate(model, blocks, cfg.train.batch_size, cfg.train.loss_chunk_tokens, max_batches, rp, device)
    if result is None:
        raise DataError(f"{where} has no tokens to evaluate on",
                        hint="pass --data FILE, or train with data.eval_fraction > 0")
    return dict(result, data=where)


def evaluate_base(model_name: str, data: str, max_batches: int | None, seq_len: int | None,
                  overrides: list[str]) -> dict:
    """Loss and perplexity of a base model (no adapter) on all of ``data``, cut into sequences as
    `lowres train` cuts them — so it compares with `lowres eval RUN_DIR --data` on the same file when both use
    the same sequence length and packing."""
    from lowres.config import load_config
    from lowres.data import build_data, read_records, render_texts
    from lowres.models import load_model, load_tokenizer, locate_weights, resolve_precision

    sets = [f"model.name={model_name}", f"data.path={data}", "data.eval_fraction=0.0"]
    if seq_len:
        sets.append(f"data.max_length={seq_len}")
    cfg = load_config(None, sets + list(overrides), use_env=False)
    device = _device()
    loc = locate_weights(cfg.model)
    rp = resolve_precision(cfg.precision, device=device)
    records = read_records(cfg.data)
    texts = None if loc.pretrained else render_texts(records, cfg.data, None)
    tokenizer, _ = load_tokenizer(loc, texts, cfg.data.tokenizer_vocab)
    blocks = build_data(cfg.data, tokenizer, cfg.train.seed, records=records).train
    # a fresh LoRA adapter has B = 0: the wrapped model computes exactly the base model
    model, _ = load_model(loc, rp, cfg.lora, False, device=device, seed=cfg.train.seed)
    result = evaluate(model, blocks, cfg.train.batch_size, cfg.train.loss_chunk_tokens, max_batches, rp, device)
    if result is None:
        raise DataError(f"{data!r} has no tokens to evaluate on", hint="give a file with at least one record")
    return dict(result, data=data, model=model_name, weights=loc.kind)


def check_export(run: TrainedRun, out: str | Path) -> Path:
    """UsageError (exit 2) for an export folder that is a file, not writable, or inside the run folder (the
    export would overwrite or nest into the run's own files); the folder as a Path."""
    from lowres.locks import check_output_dir

    out = check_output_dir(out, "export folder --output")
    root = run.root.resolve()
    if out.resolve() == root or root in out.resolve().parents:
        raise UsageError(f"export folder --output {str(out)!r} is inside the run folder {str(run.root)!r}",
                         hint="export next to the run, e.g. --output export/ (the run's own files stay as they are)")
    return out


def export_run(run: TrainedRun, out: str | Path, merge: bool) -> list[str]:
    """Copy the adapter and tokenizer to ``out``; with ``merge``, write base + LoRA merged as one model in
    safetensors instead (the base loaded unquantized: LoRA merged into 4-bit weights would be rounded away)."""
    from lowres.config import load_config

    out = check_export(run, out)
    cfg = load_config(run.config_path, use_env=False) if merge else None  # a bad config.yaml: before any write
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        model, tokenizer, _ = load_trained(run, cfg, "cpu", quantized=False)
        merged = model.merge_and_unload()
        merged.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    else:
        for f in run.adapter_dir.iterdir():
            shutil.copy2(f, out / f.name)
        shutil.copytree(run.tokenizer_dir, out, dirs_exist_ok=True)
    return sorted(p.name for p in out.iterdir())
