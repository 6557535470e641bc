"""`lowres tune --auto`: detect the machine, predict, verify by short capped trials, choose, write the
chosen RunConfig (reasons as comments) and train with it (`lowres tune` without --auto stops after writing).
With no arguments: the real pretrained SmolLM2-135M-Instruct on the shipped instruction sample, tune and
training together within --time-budget (5 minutes by default), so a new user sees a real model learn at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

GIB = 1024**3
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> float:
    """``8GB`` → 8e9, ``8GiB`` → 8·2³⁰, ``512MB``, ``1.5G``; plain numbers are bytes."""
    from lowres.errors import UsageError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"memory size {text!r} not understood", hint="write it like 8GB, 8GiB or 512MB")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_duration(text: str) -> float:
    """``5m`` → 300, ``300s``/``300`` → 300, ``1h`` → 3600, ``1.5m`` → 90; ``0`` → 0 (no limit)."""
    from lowres.errors import UsageError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h)?\s*", text.lower())
    if not m:
        raise UsageError(f"duration {text!r} not understood", hint="write it like 5m, 300s or 1h (0: no limit)")
    return float(m.group(1)) * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[m.group(2) or "s"]


def tune(
    auto: Annotated[bool, typer.Option("--auto", help="Then train with the chosen setup. Without it tune only "
                                       "chooses and writes the config (as --dry-run).")] = False,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model preset, hub id, folder or .gguf "
                                       "(default: SmolLM2-135M-Instruct, real pretrained weights).")] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Data file/folder (default: the shipped sample).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Start from a run config YAML.")] = None,
    objective: Annotated[str, typer.Option("--objective", help="fastest, smallest or time:SECONDS.")] = "fastest",
    memory_budget: Annotated[str | None, typer.Option("--memory-budget", help="e.g. 8GB; default: available RAM.")] = None,
    effective_batch: Annotated[int | None, typer.Option("--effective-batch", help="Sequences per optimizer step "
                                                        "(kept through grad accumulation).")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="LoRA rank (default: advised from the data).")] = None,
    round_budget: Annotated[str | None, typer.Option("--fed-round-budget", help="Federated client: bytes per "
                                                     "round (down + up), e.g. 5MB; chooses the LoRA rank and the "
                                                     "codec together from measured message sizes (the rank the data "
                                                     "warrants with the least compressed codec that fits) and prints "
                                                     "the federation config lines.")] = None,
    headroom: Annotated[float, typer.Option("--headroom", help="Fraction of the budget kept free.")] = 0.10,
    time_budget: Annotated[str, typer.Option("--time-budget", metavar="DURATION", help="Tune and train together "
                                             "within this (e.g. 5m, 300s, 1h; 0 = no limit): optional probes stop "
                                             "after 40 % of it, and training steps are cut to what the measured "
                                             "step time allows; tune says so.")] = "5m",
    probe_steps: Annotated[int, typer.Option("--probe-steps", help="Optimizer steps per probe (the first "
                                             "two are warm-up).")] = 5,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Choose and write the config, do not train (what "
                                          "tune does without --auto).")] = False,
    out: Annotated[Path, typer.Option("--write-config", metavar="FILE.yaml", help="Where to write the chosen "
                                      "config.")] = Path("chosen.yaml"),
    out_old: Annotated[Path | None, typer.Option("--out", hidden=True)] = None,
    output_dir: Annotated[str | None, typer.Option("--output", "-o", help="Folder the chosen run trains into "
                                                   "(output_dir).")] = None,
    mlflow: Annotated[bool, typer.Option("--mlflow/--no-mlflow", help="Log the search to MLflow.")] = True,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", metavar="URI", help="MLflow tracking URI "
                                                     "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).")] = None,
    experiment: Annotated[str | None, typer.Option("--experiment", "-e", help="MLflow experiment of the "
                                                   "chosen run.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Config override a.b=c (repeatable).")] = None,
) -> None:
    """Find the fastest (or smallest) fine-tuning setup that fits this machine, by prediction verified with
    short memory-capped trials; write it as a commented YAML config; with --auto, then train with it."""
    from lowres.advisor.tune import tune as run_tune
    from lowres.config import load_config

    out = out_old or out  # --out: the name before --write-config
    sets = list(overrides or [])
    if output_dir:
        sets.append(f"output_dir={output_dir}")
    if tracking_uri:
        sets.append(f"tracking.mlflow_uri={tracking_uri}")
    if experiment:
        sets.append(f"tracking.experiment={experiment}")
    if model:
        sets.append(f"model.name={model}")
    if data:
        sets.append(f"data.path={data}")
    if seq_len:
        sets.append(f"data.max_length={seq_len}")
    if effective_batch:
        sets += [f"train.batch_size={effective_batch}", "train.grad_accum=1"]
    if not mlflow:
        sets.append("tracking.mlflow=false")
    budget_s = parse_duration(time_budget)  # a malformed duration is refused before any work
    cfg = load_config(config, sets)
    budget = parse_size(memory_budget) if memory_budget else None
    _check_inputs(cfg, out, probe_steps, headroom)
    console = Console(stderr=True)
    with ProbeDisplay(console) as display:
        result = run_tune(cfg, objective=objective, budget_bytes=budget, headroom=headroom, rank=rank, out=out,
                          dry_run=True, on_trial=display.update, probe_steps=probe_steps, console=console,
                          round_bytes=parse_size(round_budget) if round_budget else None,
                          time_budget_s=(budget_s or None) if auto and not dry_run else None)
    console.print(display.table())
    for reason in result.reasons:
        console.print(f"• {reason}", highlight=False)
    console.print(f"[bold]wrote {out}[/] — train with it: lowres train {out}", highlight=False)
    if not auto and not dry_run:
        console.print("not training: add --auto to train with the chosen setup at once", highlight=False)
    if auto and not dry_run:
        from lowres.cli.train import print_result
        from lowres.train import run

        print_result(Console(), run(result.config, console=console))


def _check_inputs(cfg: Any, out: Path, probe_steps: int, headroom: float) -> None:
    """Everything a user can get wrong, refused (exit 2) before the machine is measured or a probe starts:
    the data, where the config goes, the tracking URI, the output folder, the numbers."""
    from lowres.data import read_records
    from lowres.errors import UsageError
    from lowres.locks import check_output_dir

    if probe_steps < 1:
        raise UsageError(f"--probe-steps must be at least 1, got {probe_steps}", hint="the default is 5")
    if not 0.0 <= headroom < 1.0:
        raise UsageError(f"--headroom must be in [0, 1), got {headroom}", hint="0.10 keeps 10 % free")
    if out.is_dir():
        raise UsageError(f"--write-config {str(out)!r} is a folder", hint="give a file name, e.g. chosen.yaml")
    check_output_dir(out.parent if str(out.parent) else Path("."), "folder of --write-config")
    check_output_dir(cfg.output_dir, "output folder")
    if cfg.tracking.mlflow:
        from lowres.tracking.uri import check_tracking_uri

        check_tracking_uri(cfg.tracking.mlflow_uri, "tracking URI")
    read_records(cfg.data)  # DataError: missing, malformed, empty


class ProbeDisplay:
    """A live status line per probe (rich), and the final table of predicted vs measured figures."""

    def __init__(self, console: Console):
        self.console, self.rows, self.status = console, [], None

    def __enter__(self) -> "ProbeDisplay":
        self.status = self.console.status("detecting the machine, measuring its roofline …")
        self.status.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.status.__exit__(*exc)

    def _say(self, text: str) -> None:
        # piped (nohup, a log file) a status line is invisible: the same words as a plain line. The inputs
        # are checked by then, so a bad one still ends in one error line.
        if self.console.is_terminal:
            self.status.update(text)
        else:
            self.console.print(text, highlight=False, soft_wrap=True)

    def update(self, event: str, trial: Any) -> None:
        c = trial.candidate
        name = f"{c.compute}/{c.quant} r{c.lora_rank} batch {c.batch_size}×{trial.grad_accum}"
        if event == "start":
            self._say(f"probe {len(self.rows) + 1}: {name} — predicted "
                      f"{trial.estimate.peak_bytes / GIB:.2f} GiB, running a few capped steps …")
        elif event == "rerun-start":
            self._say(f"probing {name} again: too close to another candidate to call from one probe …")
        elif event == "rerun-done":
            p = trial.probe
            self.console.print(f"  again: {name}: {p.tokens_per_s or 0:,.0f} tokens/s over both probes "
                               f"({p.wall_s:.0f} s in all)", highlight=False)
        else:
            self.rows.append((name, trial))
            p = trial.probe
            verdict = "fits" if p.fits else ("does not fit" if p.fits is False else "failed")
            self.console.print(f"probe {len(self.rows)}: {name}: {verdict} ({p.wall_s:.0f} s)", highlight=False)

    def table(self) -> Table:
        t = Table(title="probes: predicted vs measured", title_justify="left")
        for col in ("candidate", "pred. peak", "meas. peak", "pred. step", "meas. step", "tokens/s", "result"):
            t.add_column(col, justify="left" if col in ("candidate", "result") else "right")
        for name, trial in self.rows:
            p, e = trial.probe, trial.estimate
            t.add_row(name, f"{e.peak_bytes / GIB:.2f} GiB",
                      "—" if p.peak_rss_bytes is None else f"{p.peak_rss_bytes / GIB:.2f} GiB",
                      "—" if trial.predicted_step_s is None else f"{trial.predicted_step_s:.3f} s",
                      "—" if p.step_s is None else f"{p.step_s:.3f} s",
                      "—" if not p.tokens_per_s else f"{p.tokens_per_s:,.0f}",
                      "fits" if p.fits else p.reason[:60])
        return t
