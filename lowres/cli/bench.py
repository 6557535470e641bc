"""`lowres bench`, `lowres compare`, `lowres regress`: parse, call lowres.bench, print. No logic here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

GIB = 1024**3
UriOpt = Annotated[str | None, typer.Option("--tracking-uri", metavar="URI",
                                            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                                 "sqlite:///mlflow.db here).")]
ExperimentOpt = Annotated[str, typer.Option("--experiment", "-e", help="MLflow experiment of the benchmark runs.")]


def _fmt(x, spec: str, unit: str = "") -> str:
    return "—" if x is None else format(x, spec) + unit


def bench(
    suite: Annotated[str, typer.Option("--suite", help="quick (tiny model, minutes) or full (+ SmolLM2-135M).")] = "quick",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed repeats per workload.")] = 3,
    workload: Annotated[list[str] | None, typer.Option("--workload", "-w", help="Only workloads whose name "
                                                       "contains this (repeatable).")] = None,
    tracking_uri: UriOpt = None,
    experiment: ExperimentOpt = "lowres-bench",
    in_process: Annotated[bool, typer.Option("--in-process", help="Run every workload in this process (faster "
                                             "start; peak memory then carries over between workloads).")] = False,
    repeats_old: Annotated[int | None, typer.Option("-n", min=1, hidden=True)] = None,  # -n: --max-new-tokens now
) -> None:
    """Run the standard benchmark suite: tokens/s, MFU, peak memory, step times, profiler overhead.

    Each workload becomes one MLflow run tagged with the suite, the workload, the hardware fingerprint and tier,
    the git sha, package versions and the config hash; `lowres compare` and `lowres regress` read them.
    """
    from lowres.bench.suite import run_suite
    from lowres.bench.workloads import suite_workloads

    repeats = repeats if repeats_old is None else repeats_old

    from lowres.tracking.uri import check_tracking_uri

    check_tracking_uri(tracking_uri, "--tracking-uri")  # before the first workload starts
    console, err = Console(), Console(stderr=True)
    todo = suite_workloads(suite, workload)
    err.print(f"lowres bench: suite {suite}, {len(todo)} workloads × {repeats} repeats "
              f"({'in this process' if in_process else 'one process each'})", highlight=False)

    def progress(r):
        err.print(f"  {r.workload}: {r.status}"
                  + (f" · {r.summary['tokens_per_second_median']:,.0f} tokens/s" if r.status == "ok" else "")
                  + (f" ({r.reason.splitlines()[-1][:200]})" if r.reason else ""), highlight=False)

    results = run_suite(suite, repeats=repeats, only=workload, tracking_uri=tracking_uri, experiment=experiment,
                        isolate=not in_process, on_result=progress)
    table = Table(title=f"lowres bench · {suite} · medians over {repeats} repeats (min–max), warm-up dropped")
    for col, justify in (("workload", "left"), ("tokens/s", "right"), ("MFU", "right"), ("peak mem", "right"),
                         ("step p50 / p90", "right"), ("profiler", "right"), ("run", "left")):
        table.add_column(col, justify=justify)
    for r in results:
        s = r.summary
        if r.status != "ok":
            table.add_row(r.workload, r.status, "", "", "", "", "")
            continue
        table.add_row(r.workload,
                      f"{s['tokens_per_second_median']:,.0f} ({s['tokens_per_second_min']:,.0f}–"
                      f"{s['tokens_per_second_max']:,.0f})",
                      _fmt(s.get("mfu_ratio_median"), ".1%"), f"{s['peak_memory_bytes_max'] / GIB:.2f} GiB",
                      f"{s['step_seconds_median'] * 1e3:,.0f} / {s['step_seconds_p90'] * 1e3:,.0f} ms",
                      _fmt(s.get("profiler_overhead_ratio"), ".1%"), (r.run_id or "")[:12])
    console.print(table)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise typer.Exit(1)


def compare(
    experiment: Annotated[list[str] | None, typer.Option("--experiment", "-e", help="Only runs of this MLflow "
                                                         "experiment (repeatable; default: every experiment).")] = None,
    kind: Annotated[list[str] | None, typer.Option("--kind", help="Only train, bench, tune, fed, anomaly, profile "
                                                   "or other runs (repeatable).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only this model (preset or hub id).")] = None,
    tier: Annotated[str | None, typer.Option("--tier", help="Only machines of this tier.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="Only fp32, bf16, fp16 or nf4.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="The newest this many runs.")] = 20,
    nested: Annotated[bool, typer.Option("--nested", help="Also child runs (tune probes, federation clients).")] = False,
    group: Annotated[bool, typer.Option("--group", help="Benchmark runs grouped by workload × machine × version "
                                        "(medians), as across a lab's machines.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on stdout.")] = False,
    csv_output: Annotated[bool, typer.Option("--csv", help="Print the rows as CSV on stdout.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="FILE.png", help="Also write a bar chart "
                                              "(with --group).")] = None,
    tracking_uri: UriOpt = None,
    preset: Annotated[str | None, typer.Option("--preset", hidden=True)] = None,  # the name before --model
) -> None:
    """Runs side by side — train, bench, tune, fed, any — newest first, from MLflow: throughput, MFU, peak
    memory, loss; --group for benchmark medians across machines and versions."""
    from lowres.bench.compare import KINDS, run_rows
    from lowres.errors import UsageError
    from lowres.tracking.runs import client as make_client

    from lowres.tracking.uri import check_tracking_uri
    from profiler.sinks.mlflow import redact_uri

    check_tracking_uri(tracking_uri, "--tracking-uri")
    if plot is not None:
        from lowres.locks import check_output_dir

        check_output_dir(plot.parent, "folder of --plot")
    model = model or preset
    if json_output and csv_output:
        raise UsageError("--json and --csv both given", hint="pick one output format")
    bad = [k for k in kind or [] if k not in KINDS]
    if bad:
        raise UsageError(f"--kind {bad[0]!r} is not a kind of run", hint=f"choose from {', '.join(KINDS)}")
    if plot is not None and not group:
        group = True  # the chart is of benchmark medians
    if group:
        _compare_groups(tracking_uri, experiment or ["lowres-bench"], tier, model, precision, plot,
                        json_output, csv_output)
        return
    client = make_client(tracking_uri)
    ids = None
    if experiment:
        ids = [_experiment(tracking_uri, name)[1][0] for name in experiment]
    table_rows = run_rows(client, ids, kinds=kind, tier=tier, model=model, precision=precision, limit=limit,
                          nested=nested)
    if json_output or csv_output:
        _dump([r.__dict__ for r in table_rows], csv_output)
        return
    console = Console()
    if not table_rows:
        where = f"experiment {', '.join(map(repr, experiment))}" if experiment else "this MLflow store"
        console.print(f"no runs match in {where} ({redact_uri(client.tracking_uri)}); `lowres train` logs one", highlight=False,
                      soft_wrap=True)
        return
    from rich import box

    # Identifying columns fold onto more lines instead of being cut, figures never wrap; on a narrow terminal
    # the machine is its tier only (--json and --csv carry everything).
    wide = console.width >= 110
    table = Table(title=f"lowres compare · newest {len(table_rows)} runs · {redact_uri(client.tracking_uri)}",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  caption="loss: last train loss over eval loss · tok/s and MFU leave out warm-up steps · peak memory in GiB")
    for col, justify, width in (("run", "left", 20), ("kind", "left", 5), ("model", "left", 8),
                                ("machine", "left", 10), ("loss\neval", "right", None),
                                ("tok/s", "right", None), ("MFU", "right", None), ("peak", "right", None)):
        table.add_column(col, justify=justify, overflow="fold", no_wrap=justify == "right", min_width=width,
                         max_width=None if wide or not width else width)
    for r in table_rows:
        status = "" if r.status == "FINISHED" else f" [yellow]{r.status.lower()}[/]"
        table.add_row(f"{r.run}\n[dim]{r.run_id[:12]}[/]{status}", r.kind,
                      " ".join(x for x in (r.model, r.precision, r.rank and f"r{r.rank}") if x) or "—",
                      "\n".join(x for x in (r.tier, r.fingerprint if wide else None) if x) or "—",
                      f"{_fmt(r.loss, '.3f')}\n{_fmt(r.eval_loss, '.3f')}", _fmt(r.tokens_per_s, ",.0f"),
                      _fmt(r.mfu, ".1%"), _fmt(r.peak_memory_gib, ".2f"))
    console.print(table)


def _dump(rows: list[dict], as_csv: bool) -> None:
    import csv
    import json
    import sys

    if not as_csv:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    if rows:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _compare_groups(tracking_uri, experiments, tier, preset, precision, plot, json_output, csv_output) -> None:
    from lowres.bench.compare import plot as write_plot
    from lowres.bench.compare import rows

    client, exp_ids = None, []
    for name in experiments:
        client, ids = _experiment(tracking_uri, name)
        exp_ids += ids
    table_rows = rows(client, exp_ids, tier=tier, preset=preset, precision=precision)
    if json_output or csv_output:
        _dump([r.__dict__ for r in table_rows], csv_output)
        return
    console = Console()
    if not table_rows:
        console.print(f"no finished benchmark runs in experiment {', '.join(map(repr, experiments))} match",
                      highlight=False)
        raise typer.Exit(0)
    table = Table(title=f"lowres compare · {', '.join(experiments)}")
    for col, justify in (("workload", "left"), ("machine", "left"), ("tier", "left"), ("version", "left"),
                         ("runs", "right"), ("tokens/s", "right"), ("MFU", "right"), ("peak mem", "right"),
                         ("step p50", "right")):
        table.add_column(col, justify=justify, overflow="fold", no_wrap=justify == "right")
    for r in table_rows:
        table.add_row(r.workload, r.fingerprint, r.tier, r.version, str(r.runs), _fmt(r.tokens_per_s, ",.0f"),
                      _fmt(r.mfu, ".1%"), _fmt(r.peak_memory_bytes and r.peak_memory_bytes / GIB, ".2f", " GiB"),
                      _fmt(r.step_seconds and r.step_seconds * 1e3, ",.0f", " ms"))
    console.print(table)
    if plot is not None:
        console.print(f"plot written to {write_plot(table_rows, plot)}", highlight=False, soft_wrap=True)


def regress(
    baseline: Annotated[str | None, typer.Option("--baseline", help="Run id, git sha, tag filter, latest or "
                                                 "previous. [required]")] = None,
    candidate: Annotated[str | None, typer.Option("--candidate", help="Run id, git sha, tag filter, latest or "
                                                  "previous. [required]")] = None,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, help="Relative change that counts (0.05 = 5 %).")] = 0.05,
    metric: Annotated[list[str] | None, typer.Option("--metric", help="step_time and/or peak_memory "
                                                     "(repeatable; default both).")] = None,
    confidence: Annotated[float, typer.Option("--confidence", min=0.5, max=0.999, help="Of the ratio's interval.")] = 0.95,
    experiment: ExperimentOpt = "lowres-bench",
    tracking_uri: UriOpt = None,
    # the short names these had before -b, -c and -m meant batch size, config and model everywhere else
    baseline_old: Annotated[str | None, typer.Option("-b", hidden=True)] = None,
    candidate_old: Annotated[str | None, typer.Option("-c", hidden=True)] = None,
    metric_old: Annotated[list[str] | None, typer.Option("-m", hidden=True)] = None,
) -> None:
    """Is the candidate slower or hungrier than the baseline? Exit 1 on a regression, 0 otherwise, 2 on a bad
    selection.

    Compares per-step distributions, only between runs of the same config hash and hardware fingerprint: the
    Hodges–Lehmann ratio (the median of candidate/baseline over all pairs of steps) with its distribution-free
    confidence interval, and the one-sided Mann–Whitney U test. A regression is a ratio above 1 + threshold
    whose whole interval lies above 1.
    """
    from lowres.bench.regress import regress as run_regress
    from lowres.bench.selection import select

    from lowres.errors import UsageError

    baseline, candidate = baseline or baseline_old, candidate or candidate_old
    metric = list(metric or []) + list(metric_old or [])
    for name, value in (("--baseline", baseline), ("--candidate", candidate)):
        if not value:
            raise UsageError(f"missing option {name}", hint="e.g. lowres regress --baseline previous --candidate latest")
    unknown = [m for m in metric if m not in ("step_time", "peak_memory")]
    if unknown:
        raise UsageError(f"unknown metric {unknown[0]!r} for --metric (regress compares step_time, peak_memory)",
                         hint="use step_time and/or peak_memory")
    from lowres.tracking.uri import check_tracking_uri

    check_tracking_uri(tracking_uri, "--tracking-uri")
    client, exp_ids = _experiment(tracking_uri, experiment)
    if candidate.strip() == "previous" and baseline.strip() != "previous":
        base_runs = select(client, exp_ids, baseline)
        cand_runs = select(client, exp_ids, candidate, other=base_runs)
    else:
        cand_runs = select(client, exp_ids, candidate)
        base_runs = select(client, exp_ids, baseline, other=cand_runs)
    report = run_regress(client, base_runs, cand_runs, metrics=list(metric or ["step_time", "peak_memory"]),
                         threshold=threshold, confidence=confidence)
    _print_report(Console(), report)
    if report.regressions:
        raise typer.Exit(1)


def _print_report(console: Console, report) -> None:
    conf = next(iter(report.comparisons[0].tests.values())).confidence
    table = Table(title=f"lowres regress · candidate / baseline: Hodges–Lehmann ratio, {conf:.0%} interval",
                  caption="config hash · hardware fingerprint under each workload")
    for col, justify in (("workload", "left"), ("metric", "left"), ("n", "right"), ("ratio", "right"),
                         ("interval", "right"), ("MW p", "right"), ("verdict", "left")):
        table.add_column(col, justify=justify, no_wrap=col in ("ratio", "interval", "verdict"))
    lines = []
    for c in report.comparisons:
        for m, t in c.tests.items():
            regressed = t.regressed(report.threshold)
            verdict = ("[bold red]REGRESSION[/]" if regressed else
                       "[green]improved[/]" if t.improved(report.threshold) else "no change")
            table.add_row(f"{c.workload}\n{c.config_hash} · {c.fingerprint}", m, f"{t.n_baseline}/{t.n_candidate}",
                          f"{t.ratio:.3f}", f"{t.low:.3f}–{t.high:.3f}", _fmt(t.p_value, ".2g"), verdict)
            if regressed:
                lines.append(f"REGRESSION {c.workload} {m}: ×{t.ratio:.3f} ({t.low:.3f}–{t.high:.3f}), "
                             f"runs {','.join(r[:8] for r in c.baseline_runs)} → "
                             f"{','.join(r[:8] for r in c.candidate_runs)}")
    console.print(table)
    if report.changes:
        changes = Table(title="what changed (baseline → candidate)")
        for col in ("what", "baseline", "candidate"):
            changes.add_column(col, overflow="fold")
        for what, b, c in report.changes:
            changes.add_row(what, b, c)
        console.print(changes)
    else:
        console.print("nothing changed in versions, git sha or params between the two sides", highlight=False)
    if report.unmatched:
        console.print(f"not compared (no run of the same config and machine on the other side): "
                      f"{', '.join(r[:12] for r in report.unmatched)}", highlight=False)
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    n = len(report.regressions)
    console.print(f"{'[bold red]' if n else '[green]'}{n} regression{'s' if n != 1 else ''}[/] "
                  f"(threshold {report.threshold:.0%}: a ratio above {1 + report.threshold:.2f} whose interval "
                  "lies above 1)", highlight=False)


def _experiment(tracking_uri: str | None, name: str):
    from lowres.bench.selection import SelectionError
    from lowres.tracking.runs import client as make_client

    client = make_client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise SelectionError(f"MLflow has no experiment {name!r}", hint="run `lowres bench` first, or pass "
                                                                        "--experiment / --tracking-uri")
    return client, [exp.experiment_id]
