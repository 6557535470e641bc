"""`lowres advise`: predicted peak memory (broken down) and step time of a fine-tuning config, instantly.

Nothing is loaded: the model is a preset's architecture numbers, the machine a detected or saved profile.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lowres.config import DEFAULT_MODEL  # the same default as `lowres train` and `lowres tune`

GIB = 1024**3
MIB = 1024**2

TERM_LABELS = {
    "weights.linear": "weights: block linears",
    "weights.embeddings": "weights: embeddings + lm_head",
    "weights.norms": "weights: norms, biases",
    "quantize_load": "left by quantizing at load",
    "dequant_scratch": "dequantised weight (scratch)",
    "lora.params": "LoRA parameters (fp32)",
    "lora.grads": "LoRA gradients (fp32)",
    "lora.optimizer": "optimizer states",
    "activations": "activations",
    "logits": "logits + loss",
    "allocator": "allocator overhead",
    "runtime": "runtime baseline",
    "calibration": "calibration",
}


def advise(
    model: Annotated[str, typer.Option("--model", "-m", help="Model preset (configs/models/*.yaml), a local folder "
                                       "with a config.json, or a hub id (in the cache, or online); default: train's.")] = DEFAULT_MODEL,
    hardware: Annotated[
        str | None,
        typer.Option("--hardware", "-H", metavar="PROFILE",
                     help="Saved hardware profile (name under configs/hardware or a path); default: this machine."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Start from a run config YAML; flags override it.")
    ] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence (data.max_length).")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="LoRA rank.")] = None,
    targets: Annotated[
        str | None, typer.Option("--targets", help="LoRA targets: attention, attention_mlp or all_linear.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Sequences per micro-batch.")] = None,
    quant: Annotated[str | None, typer.Option("--quant", help="none, int8, nf4 or fp4.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="auto, fp32, bf16 or fp16.")] = None,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")
    ] = None,
    loss_chunk_tokens: Annotated[
        int | None, typer.Option("--loss-chunk-tokens", help="Tokens per LM-head/loss chunk; 0 = no chunks.")
    ] = None,
    headroom: Annotated[float, typer.Option("--headroom", help="Fraction of the memory budget kept free.")] = 0.10,
    mode: Annotated[str, typer.Option("--mode", help="train: a LoRA fine-tune (the default); infer: generation "
                                      "(weights + KV cache), as `lowres generate` runs it.")] = "train",
    context: Annotated[int, typer.Option("--context", help="With --mode infer: tokens of prompt + answer.")] = 2048,
    json_output: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Predict peak memory and step time of a LoRA fine-tune on this machine or a saved profile, and list a
    grid of precision/quantization × rank × batch candidates with whether each fits."""
    from pydantic import ValidationError

    from lowres.advisor.estimate import Candidate, estimate
    from lowres.advisor.grid import candidate_grid
    from lowres.config import load_config
    from lowres.errors import UsageError
    from lowres.hardware import detect, load_profile
    from lowres.models.spec import resolve_spec

    if not 0.0 <= headroom < 1.0:
        raise UsageError(f"--headroom must be in [0, 1), got {headroom}")
    if mode not in ("train", "infer"):
        raise UsageError(f"--mode must be train or infer, got {mode!r}")
    if mode == "infer":
        return _advise_infer(model, hardware, precision, quant, context, batch_size, headroom, json_output)
    overrides = {"seq_len": seq_len, "lora_rank": rank, "lora_targets": targets, "batch_size": batch_size,
                 "quant": quant, "compute": precision, "gradient_checkpointing": gradient_checkpointing,
                 "loss_chunk_tokens": loss_chunk_tokens}
    base = Candidate.from_run_config(load_config(config, use_env=False)) if config else Candidate()
    try:
        candidate = Candidate.model_validate(
            {**base.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})"
                             for e in exc.errors())
        raise UsageError(f"invalid advise options: {problems}") from None

    spec = resolve_spec(model)
    hw = load_profile(hardware) if hardware else detect()
    # On this machine, what earlier probes (`lowres tune`) measured corrects the estimate; a saved profile of
    # another machine has no probes.
    # and the roofline they measured (read from the cache: advise measures nothing) gives the step time.
    from lowres.advisor.calibrate import cached_roofline, load_calibration

    cal = None if hardware else load_calibration(hw.fingerprint, spec.name)
    rl = None if hardware or getattr(hw, "roofline", None) else cached_roofline(spec, hw.fingerprint,
                                                                                  seq_len=candidate.seq_len)
    est = estimate(spec, hw, candidate, headroom=headroom, calibration=cal, roofline=rl)
    grid = candidate_grid(spec, hw, candidate, headroom=headroom, calibration=cal, roofline=rl)

    if json_output:
        doc = {"model": spec.name, "parameters": spec.param_count(),
               "hardware": {"tier": hw.tier, "fingerprint": hw.fingerprint, "source": hw.source,
                            "estimate_only": hw.is_estimate_only},
               "estimate": est.to_dict(), "grid": [row.to_dict() for row in grid]}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    console = Console()
    console.print(_header(spec, hw), highlight=False)
    console.print(describe(est.candidate), highlight=False)
    console.print(breakdown_table(est))
    console.print(_summary(est), highlight=False)
    for warning in est.warnings:
        console.print(f"[yellow]![/] {warning}", highlight=False)
    console.print(grid_table(grid, est))


def _advise_infer(model: str, hardware: str | None, precision: str | None, quant: str | None, context: int,
                  batch_size: int | None, headroom: float, json_output: bool) -> None:
    """`advise --mode infer`: peak memory of generation by part, and whether it fits this machine."""
    from lowres.advisor.estimate import memory_budget_bytes
    from lowres.advisor.inference import estimate_inference
    from lowres.errors import UsageError
    from lowres.hardware import detect, load_profile
    from lowres.models.spec import resolve_spec

    if context < 1 or (batch_size is not None and batch_size < 1):
        raise UsageError(f"--context and --batch-size must be at least 1, got {context} and {batch_size}")
    spec = resolve_spec(model)
    hw = load_profile(hardware) if hardware else detect(probe_bnb=False)
    device = "cuda" if getattr(hw, "gpus", None) else "cpu"
    # generation on a CPU runs fp32 by default (lowres.infer: bf16 decode is slower there)
    compute = precision if precision not in (None, "auto") else ("fp32" if device == "cpu" else "bf16")
    if compute not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    est = estimate_inference(spec, compute=compute, quant=quant or "none", context=context,
                             batch=batch_size or 1, device=device)
    budget = memory_budget_bytes(hw)
    usable = None if budget is None else budget * (1 - headroom)
    fits = None if usable is None else est.peak_bytes <= usable
    if json_output:
        doc = {"model": spec.name, "mode": "infer", "parameters": spec.param_count(),
               "hardware": {"tier": hw.tier, "fingerprint": hw.fingerprint, "estimate_only": hw.is_estimate_only},
               "estimate": {**est.to_dict(), "budget_bytes": usable, "fits": fits}}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    console = Console()
    console.print(_header(spec, hw), highlight=False)
    console.print(f"generation: {compute} weights, quant {est.quant}, context {context} tokens "
                  f"(prompt {est.prompt_tokens}), batch {est.batch}", highlight=False)
    t = Table(title="predicted peak memory while generating", title_justify="left")
    t.add_column("part")
    t.add_column("bytes", justify="right")
    for part, value in est.breakdown.items():
        t.add_row(part.replace("_", " "), _size(value))
    t.add_row("[bold]peak[/]", f"[bold]{_size(est.peak_bytes)}[/]")
    console.print(t)
    verdict = "unknown" if fits is None else ("fits" if fits else "does NOT fit")
    console.print(f"{verdict} in {_size(usable)} (memory budget less {headroom:.0%} headroom); check it with "
                  f"`lowres generate --model {model} --prompt … --json` (measured peak beside this prediction)",
                  highlight=False)
    for line in est.unmodelled:
        console.print(f"unmodelled: {line}", highlight=False)


def _size(n: float | None) -> str:
    if n is None:
        return "unknown"
    if 0 < n < MIB / 2:
        return "<1 MiB"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.0f} MiB"


def _seconds(s: float | None) -> str:
    if s is None:
        return "unknown"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _header(spec: Any, hw: Any) -> str:
    where = (f"[bold yellow]estimate only[/]: profile {hw.tier} ({hw.fingerprint}) is not this machine"
             if hw.is_estimate_only else f"this machine: {hw.tier} ({hw.fingerprint})")
    return f"[bold]{spec.name}[/] ({spec.param_count() / 1e6:.0f}M parameters) — {where}"


def describe(c: Any) -> str:
    """One line naming the candidate's knobs."""
    return (f"{c.compute}, quant {c.quant}, LoRA r={c.lora_rank} ({c.lora_targets}), batch {c.batch_size} × "
            f"{c.seq_len} tokens, checkpointing {'on' if c.gradient_checkpointing else 'off'}, "
            f"loss chunk {c.loss_chunk_tokens or 'off'}")


def breakdown_table(est: Any) -> Table:
    """Peak memory term by term, with each term's share; terms that are zero are left out."""
    table = Table()
    table.add_column("term")
    table.add_column("memory", justify="right")
    table.add_column("share", justify="right")
    for key, value in est.memory.items():
        if value:
            label = TERM_LABELS.get(key, key)
            if key == "runtime":
                label += " (CUDA context)" if est.device == "cuda" else " (python + torch RSS)"
            table.add_row(label, _size(value), f"{value / est.peak_bytes:.0%}")
    table.add_row("[bold]predicted peak (what the OS sees)[/]", f"[bold]{_size(est.peak_bytes)}[/]", "100%")
    return table


def _summary(est: Any) -> str:
    if est.fits is None:
        fit = "budget unknown"
    else:
        verdict = "[green]fits[/]" if est.fits else "[red]does not fit[/]"
        fit = f"{verdict} in {_size(est.budget_bytes)} usable with {est.headroom:.0%} headroom"
    if est.step_time_s is None:
        step = "step time: unknown"
    else:
        step = (f"step time: {_seconds(est.step_time_s)} ({est.tokens_per_s:,.0f} tokens/s, roofline: "
                f"{est.roofline_source})")
        if est.step_time_band_s:
            lo, hi = est.step_time_band_s
            step += (f" — uncalibrated guess from the machine model, likely {_seconds(lo)}-{_seconds(hi)}; "
                     "probes (`lowres tune --auto`) calibrate it")
    return f"{fit} · {est.flops_per_step / 1e12:.2f} TFLOP per step · {step}"


def grid_table(rows: list[Any], est: Any) -> Table:
    """Each precision/quant × rank: peak at each grid batch (✓ fits, ✗ does not), largest batch that fits."""
    batches = list(rows[0].by_batch) if rows else []
    table = Table(title=f"Candidates ({est.candidate.seq_len} tokens per sequence; ✓ fits with "
                        f"{est.headroom:.0%} headroom)", title_justify="left")
    for name in ("precision", "quant", "rank"):
        table.add_column(name)
    for b in batches:
        table.add_column(f"batch {b}", justify="right")
    table.add_column("largest batch", justify="right")
    table.add_column("step time there", justify="right")
    for row in rows:
        cells = []
        for b in batches:
            e = row.by_batch[b]
            mark = "" if e.fits is None else (" [green]✓[/]" if e.fits else " [red]✗[/]")
            cells.append(_size(e.peak_bytes) + mark)
        precision = row.compute + (" [yellow](slow here)[/]" if row.by_batch[batches[0]].slow_precision else "")
        step = _seconds(row.at_max.step_time_s) if row.at_max else "—"
        table.add_row(precision, row.quant, str(row.rank), *cells, str(row.max_batch or "none"), step)
    return table
