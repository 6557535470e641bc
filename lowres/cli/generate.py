"""`lowres generate` and `lowres chat`: answers with their costs measured, profiled and logged to MLflow."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

GIB = 1024**3

RunDirArg = Annotated[Path | None, typer.Argument(metavar="[RUN_DIR]", help="A finished `lowres train` run: "
                                                  "its adapter on its base. Or give --model.")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="A base model instead: preset, hub id, local "
                                              "folder or .gguf file (e.g. SmolLM2-135M-Instruct).")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="Compute dtype with --model: auto, fp32, bf16.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Stop after this many new tokens.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy (the default); > 0 samples.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature > 0).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Sampling seed.")]
TrackingOpt = Annotated[str | None, typer.Option("--tracking-uri", metavar="URI", help="MLflow tracking URI "
                                                 "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).")]
ExperimentOpt = Annotated[str, typer.Option("--experiment", "-e", help="MLflow experiment.")]
MlflowOpt = Annotated[bool, typer.Option("--mlflow/--no-mlflow", help="Log the figures to MLflow.")]


class _Session:
    """Loading, the profiler and the MLflow run around one generate or chat session."""

    def __init__(self, command: str, run_dir: Path | None, model: str | None, precision: str, mlflow: bool,
                 tracking_uri: str | None, experiment: str, console: Console):
        self.command, self.console = command, console
        self.run_dir, self.model, self.precision = run_dir, model, precision
        self.mlflow, self.tracking_uri, self.experiment = mlflow, tracking_uri, experiment
        self.tracker = self.prof = self.gen = None
        self.turn = 0

    def __enter__(self) -> "_Session":
        from profiler import Profiler

        from lowres.infer import Generator

        self.prof = Profiler(interval=0.5, mode="process", labels={"host": platform.node()}).start()
        try:
            with self.console.status("loading the model …"):
                self.gen = Generator.load(model=self.model, run_dir=self.run_dir, precision=self.precision,
                                          console=self.console)
        except BaseException:
            self.prof.stop()
            raise
        self.console.print(f"loaded in {self.gen.load_s:.1f} s: {self.gen.describe}", highlight=False)
        if self.mlflow:
            self._start_tracking()
        return self

    def _start_tracking(self) -> None:
        from lowres.hardware import detect
        from lowres.tracking.logger import SpoolingLogger
        from lowres.tracking.runs import descriptive_run_name

        hw = detect(probe_bnb=False)
        g = self.gen
        name = descriptive_run_name(self.command, g.spec.name, g.precision.weights_dtype, platform.node())
        self.tracker = SpoolingLogger.start(self.experiment, run_name=name, tracking_uri=self.tracking_uri,
                                            fingerprint=hw.fingerprint, tier=hw.tier,
                                            tags={**g.tags, "lowres.command": self.command})
        self.tracker.log_params({"model": g.source.get("model"), "run_dir": g.source.get("run_dir"),
                                 "dtype": g.precision.weights_dtype, "quant": g.precision.quant,
                                 "device": g.device, "load_seconds": round(g.load_s, 3)})

    def log(self, out: Any) -> None:
        """One answer's figures as MLflow metrics at step = turn."""
        self.turn += 1
        if self.tracker is None:
            return
        figures = {"infer/ttft_seconds": out.ttft_s, "infer/tokens_per_second": out.tokens_per_s,
                   "infer/new_tokens": out.new_tokens, "infer/prompt_tokens": out.prompt_tokens,
                   "infer/total_seconds": out.total_s, "infer/peak_memory_megabytes": out.peak_rss_bytes / 1e6,
                   "infer/predicted_peak_memory_megabytes": out.predicted_peak_bytes / 1e6,
                   "infer/load_seconds": self.gen.load_s}
        self.tracker.log_metrics({k: float(v) for k, v in figures.items() if v is not None}, self.turn)

    def __exit__(self, exc_type, *_: Any) -> None:
        if self.prof is not None:
            self.prof.stop()
        if self.tracker is not None:
            self.tracker.end("FINISHED" if exc_type is None else "FAILED")

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id if self.tracker is not None else None


def _stats_line(out: Any) -> str:
    ttft = "—" if out.ttft_s is None else f"{out.ttft_s:.2f} s"
    rate = "—" if out.tokens_per_s is None else f"{out.tokens_per_s:.1f} tokens/s"
    err = abs(out.predicted_peak_bytes - out.peak_rss_bytes) / out.peak_rss_bytes if out.peak_rss_bytes else 0.0
    return (f"time to first token {ttft} · decode {rate} · {out.new_tokens} new tokens ({out.stop}) in "
            f"{out.total_s:.2f} s · peak RSS {out.peak_rss_bytes / GIB:.2f} GiB (predicted "
            f"{out.predicted_peak_bytes / GIB:.2f} GiB, {err:.0%} off)")


def generate(
    run_dir: RunDirArg = None,
    model: ModelOpt = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The user message (default: read stdin).")] = None,
    max_new_tokens: MaxNewOpt = 128,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    precision: PrecisionOpt = "auto",
    mlflow: MlflowOpt = True,
    tracking_uri: TrackingOpt = None,
    experiment: ExperimentOpt = "lowres",
    json_output: Annotated[bool, typer.Option("--json", help="Print the answer and its figures as JSON.")] = False,
) -> None:
    """Answer one prompt and measure it: load time, time to first token, decode tokens/s, peak memory
    (beside the advisor's prediction), logged to MLflow.

    lowres generate --model SmolLM2-135M-Instruct --prompt "What is the capital of France?"
    lowres generate runs/latest --prompt "Convert 3 meters to centimeters." --json
    """
    from lowres.errors import UsageError

    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no prompt: give --prompt TEXT or pipe it on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty", hint="give --prompt TEXT")
    err = Console(stderr=True)
    with _Session("generate", run_dir, model, precision, mlflow, tracking_uri, experiment, err) as session:
        stream = None if json_output else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        out = session.gen.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=seed, on_text=stream)
        session.log(out)
    if json_output:
        d = out.to_dict()
        d.update(load_s=session.gen.load_s, model=session.gen.spec.name, weights=session.gen.source.get("weights"),
                 dtype=session.gen.precision.weights_dtype, run_id=session.run_id,
                 infer_mem_err=abs(out.predicted_peak_bytes - out.peak_rss_bytes) / max(1, out.peak_rss_bytes))
        sys.stdout.write(json.dumps(d, indent=2, default=str) + "\n")
    else:
        sys.stdout.write("\n")
        err.print(f"[dim]{_stats_line(out)}[/]", highlight=False)


def chat(
    run_dir: RunDirArg = None,
    model: ModelOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    system: Annotated[str | None, typer.Option("--system", help="A system message to start with.")] = None,
    precision: PrecisionOpt = "auto",
    mlflow: MlflowOpt = True,
    tracking_uri: TrackingOpt = None,
    experiment: ExperimentOpt = "lowres",
) -> None:
    """Talk to a model turn by turn; each answer streams and is followed by its figures (time to first
    token, tokens/s, peak memory). /reset forgets the conversation, /exit (or Ctrl-D) ends. One MLflow run
    per session, one step per answer. Reads lines from stdin when it is not a terminal."""
    err = Console(stderr=True)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    with _Session("chat", run_dir, model, precision, mlflow, tracking_uri, experiment, err) as session:
        history = [{"role": "system", "content": system}] if system else []
        if interactive:
            err.print("[dim]type a message; /reset forgets, /exit ends[/]")
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = history[:1] if system else []
                err.print("[dim]conversation forgotten[/]")
                continue
            history.append({"role": "user", "content": text})
            sys.stdout.write("model> " if interactive else "")
            out = session.gen.generate(history, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                       seed=seed, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
            sys.stdout.write("\n")
            sys.stdout.flush()
            history.append({"role": "assistant", "content": out.text})
            session.log(out)
            err.print(f"[dim]{_stats_line(out)}[/]", highlight=False)


generate.context_settings = {"help_option_names": ["-h", "--help"]}
chat.context_settings = {"help_option_names": ["-h", "--help"]}
