"""`lowres fed …`: federated LoRA fine-tuning on Flower — parse, call lowres.federated, print. No logic here.

    lowres fed run --config configs/fed/tiny-sim.yaml [--set rounds=5]           simulation (Ray, one machine)
    lowres fed run --config configs/fed/tiny-deploy.yaml --superlink HOST:PORT   deployment (`flwr run`)
    lowres fed superlink [--port 8000] [--certs DIR | --insecure] [--supernode-auth]
    lowres fed supernode --superlink HOST:PORT --partition-id 0 --num-partitions 2 [--data-path FILE]
    lowres fed certs DIR                                                       a self-signed CA + server cert
    lowres fed status [--json]                       running federations: running, stalled or crashed (ends crashed)
    lowres fed join NAME --data-path FILE                                      join a federation of the index
    lowres fed report NAME --category bug|connection|malicious --text "…"     report a failure
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

fed_app = typer.Typer(name="fed", help="Federated LoRA fine-tuning on Flower: simulation and deployment.",
                      no_args_is_help=True)

SetOpt = Annotated[list[str] | None, typer.Option("--set", metavar="A.B=C", help="Override a federation field.")]


@fed_app.command("run")
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Federation YAML (configs/fed/*.yaml).")],
    overrides: SetOpt = None,
    superlink: Annotated[str | None, typer.Option("--superlink", help="HOST:PORT of a SuperLink: deploy there "
                                                  "with `flwr run` instead of simulating.")] = None,
    root_cert: Annotated[str | None, typer.Option("--root-cert", help="CA certificate of a TLS SuperLink.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain HTTP to the SuperLink (loopback tests).")] = False,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Deployment: wait for the run to finish.")] = True,
    announce: Annotated[bool, typer.Option("--announce", help="Deployment: list the federation in the index on "
                                           "the MLflow server (address --superlink, CA --root-cert) so nodes can "
                                           "`lowres fed join` it.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    output_dir: Annotated[str | None, typer.Option("--output", "-o", help="Folder of the federation's files "
                                                   "(output_dir).")] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", metavar="URI", help="MLflow tracking URI "
                                                     "(tracking.mlflow_uri).")] = None,
) -> None:
    """Run a federation: simulated on this machine, or submitted to a SuperLink.

    Strategy: --set strategy.name=fedavg | fedprox | fedadam | fedyogi | fedadagrad
    (the last three: Flower's server optimisers, with strategy.eta, eta_l, beta_1, beta_2, tau),
    or FILE.py:Class with select, aggregate_train, aggregate_evaluate (configs/fed/tiny-custom-strategy.yaml).

    Clients per round: --set strategy.selection.by=random | memory | speed | examples
    (floors: strategy.selection.min_free_memory_bytes, min_tokens_per_second, min_records).

    Each round logs centralised and federated eval loss and token accuracy; --json prints them."""
    from lowres.federated.config import load_fed_config

    overrides = list(overrides or []) + [f"{k}={json.dumps(v)}" for k, v in (
        ("output_dir", output_dir), ("tracking.mlflow_uri", tracking_uri)) if v is not None]
    if announce:
        from lowres.errors import UsageError

        if superlink is None:
            raise UsageError("--announce needs --superlink HOST:PORT: only a deployed federation can be joined")
        overrides += ["index.announce=true", f"index.superlink={superlink}"]
        if root_cert:
            overrides.append(f"index.root_cert={Path(root_cert).resolve()}")
    console = Console(stderr=True)
    fed = load_fed_config(config, overrides)
    from lowres.locks import check_output_dir

    check_output_dir(fed.output_dir)  # a file in the way: refused before any client starts
    if fed.tracking.mlflow:  # a crashed federation of this experiment is ended FAILED, not left RUNNING
        from lowres.federated.health import scan

        scan(fed.tracking.mlflow_uri, fed.tracking.experiment, noticed_by="lowres fed run", console=console)
    if superlink is None:
        from lowres.federated.simulation import simulate

        result = simulate(fed, console=console)
        out = {"federation": fed.federation, "mlflow_run_id": result.run_id, "initial_eval": result.initial_eval,
               "rounds": result.rounds, "final_eval": result.final_eval, "global_adapter": result.global_path}
    else:
        from lowres.errors import UsageError
        from lowres.federated.deploy import submit, wait_finished

        if not (root_cert or insecure):
            raise UsageError("a SuperLink connection needs --root-cert CA.crt (TLS) or --insecure (plain HTTP)")
        home = Path(fed.output_dir) / ".flwr"
        run_id = submit(config, superlink, home, root_cert, list(overrides or []))
        console.print(f"submitted Flower run {run_id} to {superlink}", highlight=False)
        out = {"federation": fed.federation, "flower_run_id": run_id}
        if wait:
            out["flower"] = wait_finished(run_id, home, timeout_s=fed.rounds * fed.robustness.round_timeout_s * 3 + 300)
    if json_output:
        print(json.dumps(out, default=str))
    else:
        console.print_json(json.dumps(out, default=str))


@fed_app.command("status")
def status_cmd(
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", metavar="URI", help="MLflow tracking URI "
                                                     "(default $MLFLOW_TRACKING_URI, else ./mlflow.db).")] = None,
    experiment: Annotated[str, typer.Option("--experiment", help="The federations' MLflow experiment "
                                            "(tracking.experiment).")] = "lowres-fed",
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object per federation.")] = False,
) -> None:
    """List the experiment's RUNNING federations as running, stalled or crashed (by the server's heartbeat,
    round progress and, on its own machine, its process); crashed ones are ended FAILED and tagged crashed."""
    from lowres.federated.health import scan

    console = Console(stderr=True)
    found = scan(tracking_uri, experiment, noticed_by="lowres fed status", console=console)
    rows = [{"federation": r.data.tags.get("lowres.federation") or r.info.run_name, "run_id": r.info.run_id,
             "state": h.state, "reason": h.reason, "heartbeat_age_s": h.heartbeat_age_s,
             "progress_age_s": h.progress_age_s} for r, h in found]
    if json_output:
        for row in rows:
            print(json.dumps(row))
        return
    if not rows:
        console.print(f"no RUNNING federations in experiment {experiment!r}", highlight=False)
    for row in rows:
        print(f"{row['federation']:<24} {row['state']:<8} {row['run_id']}  {row['reason']}")


@fed_app.command("superlink")
def superlink_cmd(
    port: Annotated[int, typer.Option("--port", help="The SuperLink's one HTTP(S) port.")] = 8000,
    certs: Annotated[Path | None, typer.Option("--certs", help="Folder with ca.crt, server.pem, server.key (TLS).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain HTTP (loopback tests only).")] = False,
    supernode_auth: Annotated[bool, typer.Option("--supernode-auth", help="Only registered SuperNodes may connect.")] = False,
    database: Annotated[str | None, typer.Option("--database", help="State file (default: in memory).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the flower-superlink command only.")] = False,
) -> None:
    """Start a Flower SuperLink (runs in the foreground; Ctrl-C stops it)."""
    from lowres.federated.deploy import flower_env, superlink_command

    _tls_choice(certs, insecure)
    _check_port(port, "--port")
    if certs is not None:
        _check_files(certs, ["ca.crt", "server.pem", "server.key"], "--certs", "write them with `lowres fed certs DIR`")
    cmd = superlink_command(port, certs, supernode_auth, database)
    _exec(cmd, flower_env(Path.home() / ".cache" / "lowres" / "flower-bin"), dry_run)


@fed_app.command("supernode")
def supernode_cmd(
    superlink: Annotated[str, typer.Option("--superlink", help="HOST:PORT of the SuperLink.")],
    partition_id: Annotated[int | None, typer.Option("--partition-id", help="Simulated partition to train on.")] = None,
    num_partitions: Annotated[int | None, typer.Option("--num-partitions")] = None,
    data_path: Annotated[str | None, typer.Option("--data-path", help="This node's own data file or folder.")] = None,
    overrides: Annotated[str | None, typer.Option("--overrides", help='This node\'s recipe, e.g. "lora.rank=4 precision.quant=nf4".')] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads for this node's client.")] = None,
    output_dir: Annotated[str | None, typer.Option("--output", "-o", help="This node's run files (default: beside "
                                                   "the server's federation folder).")] = None,
    output_dir_old: Annotated[str | None, typer.Option("--output-dir", hidden=True)] = None,  # before --output
    port: Annotated[int, typer.Option("--port", help="This node's own runtime API port (one per node per host).")] = 9094,
    root_cert: Annotated[str | None, typer.Option("--root-cert", help="CA certificate of a TLS SuperLink.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plain HTTP (loopback tests only).")] = False,
    auth_key: Annotated[str | None, typer.Option("--auth-key", help="Private key (KEY and KEY.pub) for SuperNode auth.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the flower-supernode command only.")] = False,
) -> None:
    """Start a Flower SuperNode that runs lowres' client on its own data."""
    from lowres.federated.deploy import flower_env, supernode_command

    _tls_choice(root_cert, insecure)
    _check_supernode(superlink, port, root_cert, data_path, auth_key, overrides)
    output_dir = output_dir or output_dir_old
    node_config: dict[str, object] = {}
    for key, value in (("partition-id", partition_id), ("num-partitions", num_partitions), ("data-path", data_path),
                       ("lowres-overrides", overrides), ("lowres-threads", threads), ("lowres-output-dir", output_dir)):
        if value is not None:
            node_config[key] = value
    cmd = supernode_command(superlink, port, node_config, root_cert, auth_key)
    _exec(cmd, flower_env(Path.home() / ".cache" / "lowres" / "flower-bin"), dry_run)


@fed_app.command("join")
def join_cmd(
    name: Annotated[str, typer.Argument(help="The federation's name in the index (see the Federations page).")],
    data_path: Annotated[str | None, typer.Option("--data-path", help="This node's own data file or folder.")] = None,
    partition_id: Annotated[int | None, typer.Option("--partition-id", help="Or: a partition the server wrote "
                                                     "(one machine / shared folder).")] = None,
    num_partitions: Annotated[int | None, typer.Option("--num-partitions")] = None,
    overrides: Annotated[str | None, typer.Option("--overrides", help='This node\'s recipe, e.g. "lora.rank=4".')] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads for this node's client.")] = None,
    output_dir: Annotated[str | None, typer.Option("--output", "-o", help="This node's run files.")] = None,
    port: Annotated[int, typer.Option("--port", help="This node's own runtime API port (one per node per host).")] = 9094,
    insecure: Annotated[bool, typer.Option("--insecure", help="Accept a federation announced without TLS.")] = False,
    auth_key: Annotated[str | None, typer.Option("--auth-key", help="Private key (KEY and KEY.pub) for SuperNode auth.")] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", metavar="URI", help="The lab's MLflow server "
                                                     "holding the index (default $MLFLOW_TRACKING_URI).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the flower-supernode command only (no join counted).")] = False,
) -> None:
    """Join an announced federation: look it up in the index and start a SuperNode for it (Flower ships the
    app; the CA certificate comes with the announcement)."""
    from lowres.errors import UsageError
    from lowres.federated.deploy import flower_env, supernode_command
    from lowres.federated.index import joinable_entry, record_join

    if data_path is None and partition_id is None:
        raise UsageError("a joining node needs its data: --data-path FILE (or --partition-id with --num-partitions "
                         "on the server's machine)")
    entry = joinable_entry(tracking_uri, name)
    host, _, sport = entry.superlink.rpartition(":")
    if not host or not sport.isdigit():
        raise UsageError(f"the index entry of {name!r} names no SuperLink HOST:PORT (got {entry.superlink!r})",
                         hint="its server must announce with --superlink HOST:PORT; report it with `lowres fed report`")
    root_cert = None
    if entry.root_cert:
        folder = Path.home() / ".cache" / "lowres" / "index"
        folder.mkdir(parents=True, exist_ok=True)
        root_cert = str(folder / f"{entry.run_id}-ca.crt")
        Path(root_cert).write_text(entry.root_cert)
    elif not insecure:
        raise UsageError(f"federation {name!r} is announced without TLS (plain HTTP to {entry.superlink})",
                         hint="pass --insecure to join it anyway (loopback and lab tests only)")
    _check_supernode(entry.superlink, port, root_cert, data_path, auth_key, overrides)
    node_config: dict[str, object] = {}
    for key, value in (("partition-id", partition_id), ("num-partitions", num_partitions), ("data-path", data_path),
                       ("lowres-overrides", overrides), ("lowres-threads", threads), ("lowres-output-dir", output_dir)):
        if value is not None:
            node_config[key] = value
    cmd = supernode_command(entry.superlink, port, node_config, root_cert, auth_key)
    if not dry_run:
        record_join(tracking_uri, entry)
        Console(stderr=True).print(f"joining {name!r} at {entry.superlink} ({entry.codec} codecs, {entry.rounds} "
                                   f"rounds, model {entry.model})", highlight=False)
    _exec(cmd, flower_env(Path.home() / ".cache" / "lowres" / "flower-bin"), dry_run)


@fed_app.command("report")
def report_cmd(
    name: Annotated[str, typer.Argument(help="The federation's name in the index.")],
    category: Annotated[str, typer.Option("--category", help="bug, connection or malicious.")],
    text: Annotated[str, typer.Option("--text", help="What went wrong (at most 2000 characters).")],
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", metavar="URI", help="The lab's MLflow server "
                                                     "holding the index (default $MLFLOW_TRACKING_URI).")] = None,
) -> None:
    """Report a failure of a federation (stored with its index entry, shown on the Federations page)."""
    from lowres.federated.index import report

    entry = report(tracking_uri, name, category, text)
    print(json.dumps({"federation": name, "category": category, "index_run_id": entry.run_id}))


@fed_app.command("certs")
def certs_cmd(folder: Annotated[Path, typer.Argument(help="Where to write ca.crt, server.pem, server.key.")],
              host: Annotated[str, typer.Option("--host", help="The SuperLink's address in the certificate.")] = "127.0.0.1") -> None:
    """Write a self-signed CA and SuperLink certificate (for loopback/lab tests; use a real CA otherwise)."""
    from lowres.errors import UsageError
    from lowres.federated.deploy import make_certs
    from lowres.locks import check_output_dir

    check_output_dir(folder, "certificate folder")
    existing = [n for n in ("ca.crt", "server.pem", "server.key") if (folder / n).exists()]
    if existing:  # a lab's CA replaced by accident would lock every SuperNode out
        raise UsageError(f"{str(folder)!r} already holds {', '.join(existing)}; nothing was overwritten",
                         hint="remove them first, or give a new folder")
    print(make_certs(folder, host))


def _check_port(port: int, flag: str) -> None:
    from lowres.errors import UsageError

    if not 1 <= port <= 65535:
        raise UsageError(f"{flag} must be in 1..65535, got {port}")


def _check_files(folder: Path, names: list[str], flag: str, hint: str) -> None:
    from lowres.errors import UsageError

    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UsageError(f"{flag} {str(folder)!r} lacks {', '.join(missing)}", hint=hint)


def _check_supernode(superlink: str, port: int, root_cert: str | None, data_path: str | None,
                     auth_key: str | None, overrides: str | None) -> None:
    """Everything a SuperNode would only trip over later (after Flower has started): refused now, exit 2."""
    from lowres.config import parse_override
    from lowres.errors import DataError, UsageError

    host, sep, sport = superlink.rpartition(":")
    if not sep or not host or not sport.isdigit() or not 1 <= int(sport) <= 65535:
        raise UsageError(f"--superlink {superlink!r} is not HOST:PORT", hint="e.g. --superlink 10.0.0.5:8000")
    _check_port(port, "--port")
    if root_cert is not None and not Path(root_cert).is_file():
        raise UsageError(f"--root-cert {root_cert!r} does not exist", hint="give the SuperLink's ca.crt")
    if data_path is not None and not Path(data_path).expanduser().exists():
        raise DataError(f"--data-path {data_path!r} does not exist", hint="give this node's data file or folder")
    if auth_key is not None:
        for f in (auth_key, auth_key + ".pub"):
            if not Path(f).is_file():
                raise UsageError(f"--auth-key: {f!r} does not exist", hint="give the private key; KEY.pub beside it")
    for item in (overrides or "").split():
        parse_override(item)  # ConfigError for a word that is not section.field=value


def _tls_choice(certs: object, insecure: bool) -> None:
    from lowres.errors import UsageError

    if bool(certs) == bool(insecure):
        raise UsageError("choose exactly one of TLS (--certs/--root-cert) and --insecure")


def _exec(cmd: list[str], env: dict[str, str], dry_run: bool) -> None:
    import shlex

    if dry_run:
        print(shlex.join(cmd))
        return
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)  # the Flower process replaces this one: signals reach it directly
