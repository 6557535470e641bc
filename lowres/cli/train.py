"""`lowres train`, `lowres eval`, `lowres export`: parse, call the recipe, print. No logic here.

Every RunConfig field is reachable: the common ones have flags, ``--set section.field=value`` reaches all
(``lowres train --help`` lists the sections). Precedence: flags and --set, then LOWRES_<SECTION>__<FIELD>
environment variables, then the YAML file, then defaults.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

GIB = 1024**3

SetOpt = Annotated[list[str] | None, typer.Option("--set", metavar="A.B=C",
                                                  help="Override any config field (repeatable); fields below.")]


def _flags_to_overrides(**flags) -> list[str]:
    """Common flags → ``section.field=value`` overrides, in the same syntax --set takes."""
    fields = {"model": "model.name", "data": "data.path", "steps": "train.max_steps",
              "batch_size": "train.batch_size", "rank": "lora.rank", "quant": "precision.quant",
              "precision": "precision.compute", "output_dir": "output_dir", "seq_len": "data.max_length",
              "lr": "train.lr", "grad_accum": "train.grad_accum", "checkpoint_every": "checkpoint.every",
              "tracking_uri": "tracking.mlflow_uri", "experiment": "tracking.experiment",
              "run_name": "tracking.run_name", "profile_steps": "train.profile_steps"}
    out = []
    for name, value in flags.items():
        if value is not None:
            # JSON-quote strings so YAML parsing keeps them strings ("off", "no", "1e-4" stay as given)
            out.append(f"{fields[name]}={json.dumps(value) if isinstance(value, str) else value}")
    return out


def train(
    config: Annotated[Path | None, typer.Argument(metavar="[CONFIG.yaml]", help="Run config (configs/runs/*.yaml).")] = None,
    config_opt: Annotated[Path | None, typer.Option("--config", "-c", help="The run config, as an option "
                                                    "(as tune, advise and fed take it).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Preset, hub id or local path.")] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Data file or folder (.jsonl/.json/.csv/.txt) or hf:<name>.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (train.max_steps).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Sequences per micro-batch.")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence (data.max_length).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="LoRA rank.")] = None,
    quant: Annotated[str | None, typer.Option("--quant", help="none, int8, nf4 or fp4.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="Compute dtype: auto, fp32, bf16, fp16.")] = None,
    output_dir: Annotated[str | None, typer.Option("--output", "-o", help="Folder for checkpoints, "
                                                   "adapter, profile (output_dir).")] = None,
    output_dir_old: Annotated[str | None, typer.Option("--output-dir", hidden=True)] = None,
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every", help="Steps between checkpoints.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the output dir.")] = False,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", metavar="URI", help="MLflow tracking URI "
                                                     "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).")] = None,
    experiment: Annotated[str | None, typer.Option("--experiment", "-e", help="MLflow experiment (default: lowres).")] = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="MLflow run name (default: model · precision · "
                                                 "rank · machine, plus a random suffix).")] = None,
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or progress lines.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    profile_steps: Annotated[int | None, typer.Option("--profile-steps", metavar="N", min=0, help="Trace N steps "
                                                      "after the warm-up with torch.profiler: time by op family "
                                                      "(matmul, attention, norm/element-wise, optimizer, other) "
                                                      "printed and in --json, and after the run each traced "
                                                      "GEMM call replayed alone: the GEMM floor and the MFU it "
                                                      "allows; torch_trace.json.gz and op_profile.json in the "
                                                      "output folder.")] = None,
) -> None:
    """Fine-tune a model with LoRA/QLoRA: profiled, tracked in MLflow, checkpointed, resumable.

    Fields for --set (e.g. --set train.lr=1e-4 --set lora.targets=all_linear):

    output_dir · model: name revision weights trust_remote_code ·
    precision: compute weights quant double_quant gradient_checkpointing ·
    lora: rank alpha dropout targets rslora ·
    data: path sample format text_field prompt_field response_field max_length packing eval_fraction
    max_examples tokenizer_vocab ·
    train: max_steps batch_size grad_accum lr warmup_steps min_lr_ratio weight_decay max_grad_norm optimizer
    loss_chunk_tokens threads seed eval_every eval_batches warmup_ignore_steps max_bad_steps compile attention
    optimizer_impl fused_lora lora_groups fused_norm gemm malloc_tuning profile_steps ·
    checkpoint: every keep ·
    tracking: mlflow mlflow_uri experiment run_name prometheus_port pushgateway jsonl profiler_interval
    profiler_mode
    """
    from lowres.config import load_config
    from lowres.train.recipe import run

    output_dir = output_dir or output_dir_old  # --output-dir: the name before --output
    flags = _flags_to_overrides(model=model, data=data, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                                seq_len=seq_len, lr=lr, rank=rank, quant=quant, precision=precision,
                                output_dir=output_dir, checkpoint_every=checkpoint_every,
                                tracking_uri=tracking_uri, experiment=experiment, run_name=run_name,
                                profile_steps=profile_steps)
    if config is not None and config_opt is not None and config != config_opt:
        from lowres.errors import UsageError

        raise UsageError(f"two configs given: {config} and --config {config_opt}", hint="pass one of them")
    cfg = load_config(config or config_opt, flags + list(overrides or []))
    console = Console(stderr=True)
    result = run(cfg, resume=resume, console=console, progress=not quiet)
    if json_output:
        d = {k: v for k, v in result.__dict__.items() if k != "history"}  # profile: the profiler's summary
        sys.stdout.write(json.dumps(d, default=str, indent=2) + "\n")
    else:
        print_result(Console(), result)
        if result.profile:
            from profiler.summary import Summary

            # the profiler's view of the run (process tree, system, phases); also profile_summary.json
            Console().print(Summary.from_dict(result.profile).table())
        if result.op_profile:
            from lowres.train.opprofile import table

            Console().print(table(result.op_profile))
        from lowres.tracking.spool import is_local_run_id

        if result.run_id and not is_local_run_id(result.run_id):  # a spooled run has no page until `lowres sync`
            try:
                from lowres.tracking.runs import run_page

                Console().print(f"MLflow: {run_page(result.run_id, cfg.tracking.mlflow_uri)}", highlight=False,
                                soft_wrap=True)
            except Exception:  # the server went away at the end: the run id above is enough
                pass
    if result.stopped_by in ("SIGTERM", "SIGINT"):
        raise typer.Exit(143 if result.stopped_by == "SIGTERM" else 130)


def print_result(console: Console, r) -> None:
    """The end of a run as `lowres train` (and `lowres tune --auto`) print it."""
    fmt = lambda x, f: "unknown" if x is None else format(x, f)  # noqa: E731
    console.print(f"[bold]step {r.step}[/] ({r.stopped_by}) · loss {fmt(r.loss, '.4f')}"
                  + (f" · eval loss {r.eval['loss']:.4f}, perplexity {r.eval['perplexity']:.2f}" if r.eval else ""),
                  highlight=False)
    if r.eval and r.eval_base:
        b, a = r.eval_base, r.eval
        change = (a["loss"] - b["loss"]) / b["loss"] if b["loss"] else 0.0
        console.print(f"held-out eval loss: base {b['loss']:.4f} → adapter {a['loss']:.4f} ({change:+.1%}); "
                      f"perplexity {b['perplexity']:.2f} → {a['perplexity']:.2f} — same {a['tokens']} label "
                      "tokens, not trained on", highlight=False)
    console.print(f"throughput {fmt(r.tokens_per_s, ',.0f')} tokens/s · step {fmt(r.step_seconds, '.3f')} s · "
                  f"peak RSS {r.peak_rss_bytes / GIB:.2f} GiB (means leave out the first warm-up steps)",
                  highlight=False)
    console.print(f"MFU {fmt(r.mfu, '.1%')} = {fmt(r.tokens_per_s, ',.0f')} tokens/s × "
                  f"{r.flops_per_token / 1e6:,.1f} MFLOP/token ÷ {fmt((r.peak_flops_per_s or 0) / 1e9, ',.0f')} GFLOP/s "
                  f"(roofline of this model's GEMMs in {r.info.get('dtype')} on this machine, "
                  f"{r.info.get('threads')} threads, {r.info.get('roofline_source')})", highlight=False)
    if r.info.get("compile") and r.info["compile"] != "eager":
        console.print(f"train.compile={r.info.get('compile_setting', '')}: {r.info['compile']}", highlight=False)
    where = f"adapter in {r.output_dir}/adapter" if r.stopped_by == "max_steps" else f"checkpoint {r.checkpoint}"
    console.print(f"{where}" + (f" · MLflow run {r.run_id}" if r.run_id else ""), highlight=False)


train.context_settings = {"help_option_names": ["-h", "--help"]}


def eval_cmd(
    run_dir: Annotated[Path | None, typer.Argument(metavar="[RUN_DIR]", help="Output dir of a finished `lowres "
                                                   "train` run (its adapter); or give --model for a base model.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Evaluate this base model instead (preset, "
                                              "hub id, local folder or .gguf); needs --data.")] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Evaluate on all of this data instead of the run's eval split.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence with --model (default 256).")] = None,
    batches: Annotated[int | None, typer.Option("--batches", help="At most this many batches (default: all).")] = None,
    overrides: SetOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Loss and perplexity of a trained adapter (RUN_DIR) or of a base model (--model) on a dataset.

    The same data gives the same sequences either way, so `lowres eval --model M --data F` and
    `lowres eval RUN_DIR --data F` compare the base with its fine-tune.
    """
    from lowres.cli.working import working
    from lowres.errors import UsageError
    from lowres.train.tools import evaluate_base, evaluate_run

    if (run_dir is None) == (model is None):
        raise UsageError("give either RUN_DIR (a trained adapter) or --model M (a base model), not "
                         + ("both" if run_dir is not None else "neither"),
                         hint="e.g. lowres eval runs/latest --json, or lowres eval --model SmolLM2-135M-Instruct "
                         "--data my.jsonl --json")
    if model is not None:
        if not data:
            raise UsageError("--model needs --data (a base model has no run with a held-out split)",
                             hint="add --data FILE")
        with working(f"evaluating {model} on {data} (loading the model first) …"):
            result = evaluate_base(model, data, batches, seq_len, list(overrides or []))
    else:
        from lowres.train.evaluation import find_run

        with working(f"evaluating the adapter in {run_dir} (loading the model first) …"):
            result = evaluate_run(find_run(run_dir), data, batches, list(overrides or []))
    if json_output:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        Console().print(f"eval loss {result['loss']:.4f} · perplexity {result['perplexity']:.2f} · "
                        f"{result['tokens']} tokens in {result['batches']} batches ({result['data']})", highlight=False)


def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Output dir of a finished `lowres train` run.")],
    out: Annotated[Path | None, typer.Option("--output", "-o", help="Folder to write (default: export).")] = None,
    out_old: Annotated[Path | None, typer.Option("--out", hidden=True)] = None,
    merge: Annotated[bool, typer.Option("--merge/--no-merge", help="Merge LoRA into the base weights (a plain model).")] = False,
) -> None:
    """Write the adapter (or, with --merge, a merged model in safetensors) plus the tokenizer to a folder."""
    from lowres.train.evaluation import find_run
    from lowres.train.tools import check_export, export_run

    out = out or out_old or Path("export")  # --out: the name before --output
    from lowres.cli.working import working

    run = find_run(run_dir)
    check_export(run, out)  # before the first line of output: a bad --output is one error line
    from lowres.models.loading import quiet_hf_progress

    # transformers' own "Loading weights" / "Writing model shards" bars would sit under lowres's line
    with working(f"writing the {'merged model' if merge else 'adapter'} to {out} …"), quiet_hf_progress():
        files = export_run(run, out, merge)
    Console().print(f"wrote {'merged model' if merge else 'adapter'} to {out}: {', '.join(files)}", highlight=False)
