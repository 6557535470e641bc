"""`lowres sync`: upload what was spooled while the tracking server was unreachable (once, never twice)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


def sync(
    spool_dir: Annotated[
        Path | None,
        typer.Option("--spool-dir", metavar="DIR", help="Spool to upload (default: .lowres/spool here)."),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option("--tracking-uri", metavar="URI",
                     help="Send everything here instead of to the server each record was meant for."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be uploaded; change nothing.")] = False,
) -> None:
    """Upload spooled metrics, params, tags and artifacts; a second run uploads nothing.

    Credentials come from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN).
    Exits 1 if something could not be uploaded (it stays in the spool for the next sync).
    """
    # This process only syncs, so bounding MLflow's HTTP retries here slows nothing else; the defaults
    # (7 retries, 120 s) would make a server that dies mid-sync look like a hang. The user's values win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    from lowres.errors import UsageError
    from lowres.tracking.sync import sync as run_sync
    from lowres.tracking.uri import check_tracking_uri

    if spool_dir is not None and not spool_dir.is_dir():
        raise UsageError(f"--spool-dir {str(spool_dir)!r} is {'a file' if spool_dir.exists() else 'not there'}",
                         hint="give the .lowres/spool folder of the directory the runs were started in")
    if tracking_uri is not None:
        check_tracking_uri(tracking_uri, "--tracking-uri")

    report = run_sync(spool_dir, tracking_uri, dry_run=dry_run)
    console = Console()
    table = Table(title="lowres sync" + (" (dry run: nothing written)" if dry_run else ""), show_header=True)
    table.add_column("what")
    table.add_column("would upload" if dry_run else "uploaded", justify="right")
    table.add_column("already there", justify="right")
    table.add_row("runs created", str(report.runs_created), "")
    table.add_row("metric points", str(report.metrics_uploaded), str(report.metrics_skipped))
    table.add_row("params", str(report.params_uploaded), str(report.params_skipped))
    table.add_row("tags", str(report.tags_set), "")
    table.add_row("artifacts", str(report.artifacts_uploaded), str(report.artifacts_skipped))
    table.add_row("runs ended", str(report.runs_ended), "")
    console.print(table)
    for local, server in report.run_ids.items():
        console.print(f"run {local} → {server or '(created at a real sync)'}", highlight=False)
    if report.files == 0 and not report.run_ids:
        console.print("nothing to sync", highlight=False)
    for problem in report.problems:
        Console(stderr=True).print(f"[bold red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    if report.problems:
        raise typer.Exit(1)
