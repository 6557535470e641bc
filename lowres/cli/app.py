"""Entry point of the `lowres` command.

Each command lives in its own module and is registered here. Typed errors (lowres.errors) become one-line
messages with their exit code; LOWRES_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from rich.console import Console

from lowres.errors import LowresError
from profiler.sinks import PortInUse

app = typer.Typer(
    name="lowres",
    help="Fine-tune small language models on modest hardware — measured and predictable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # -h as well as --help on every command and group: click hands these down to every subcommand
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            version = metadata.version("lowres")
        except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
            version = "unknown (not installed)"
        typer.echo(f"lowres {version}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="Print the lowres version and exit.")) -> None:
    """Fine-tune small language models on modest hardware — measured and predictable."""

# (module under lowres.cli, command name, function name). Imports inside each command are lazy, so
# `lowres --help` and `lowres hw` never pay for torch or mlflow.
COMMANDS = [
    ("hw", "hw", "hw"),
    ("advise", "advise", "advise"),
    ("tune", "tune", "tune"),
    ("profile", "profile", "profile"),
    ("train", "train", "train"),
    ("train", "eval", "eval_cmd"),
    ("train", "export", "export"),
    ("generate", "generate", "generate"),
    ("generate", "chat", "chat"),
    ("models", "models", "models"),
    ("sync", "sync", "sync"),
    ("dash", "dash", "dash"),
    ("bench", "bench", "bench"),
    ("bench", "compare", "compare"),
    ("bench", "regress", "regress"),
]

for _module, _name, _func in COMMANDS:
    _mod = importlib.import_module(f"lowres.cli.{_module}")
    _fn = getattr(_mod, _func)
    app.command(_name, context_settings=getattr(_fn, "context_settings", None),
                options_metavar=getattr(_fn, "options_metavar", "[OPTIONS]"))(_fn)

# `lowres fed run|superlink|supernode|certs`: a command group of its own
from lowres.cli.fed import fed_app  # noqa: E402

app.add_typer(fed_app, name="fed")

# `lowres anomaly run|detect`: federated log anomaly detection
from lowres.cli.anomaly import anomaly_app  # noqa: E402

app.add_typer(anomaly_app, name="anomaly")

# `lowres cache show|clear`: the advisor's per-machine caches
from lowres.cli.cache import cache_app  # noqa: E402

app.add_typer(cache_app, name="cache")

err_console = Console(stderr=True)


# optional packages → the extra that brings them (pyproject.toml); the base install runs hw, profile, --help
_EXTRAS = {"mlflow": "mlflow", "torch": "train", "transformers": "train", "peft": "train", "accelerate": "train",
           "tokenizers": "train", "safetensors": "train", "bitsandbytes": "train", "datasets": "train",
           "numpy": "train", "flwr": "fed", "ray": "fed", "streamlit": "dash", "pandas": "dash", "altair": "dash"}


def _quiet_third_party_noise() -> None:
    """Silence two messages that say nothing actionable to a lowres user.

    bitsandbytes (imported by peft) warns on every AVX512-BF16 CPU that it could not fetch an optional 4-bit
    kernel from the Hugging Face hub (and the ``kernels`` package, which it asks, that it skipped a publisher
    check offline); lowres never fetches code at run time and its 4-bit figures are measured with the fallback
    that is used. peft's k-bit preparation calls a transformers method deprecated in v5.
    """
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)  # the same attempt's "Skipping publisher trust check" (offline)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated")


def _say_error(message: str) -> None:
    """The one line every failure a user can cause ends in (markup in the message is printed as is)."""
    from rich.markup import escape

    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return (and exit with) the command's exit code."""
    _quiet_third_party_noise()
    try:
        # In non-standalone mode click returns the code of `typer.Exit(code)` instead of raising it.
        result = app(args=argv, standalone_mode=False)
        code = result if isinstance(result, int) else 0
        if code:
            sys.exit(code)
        return 0
    except (LowresError, PortInUse) as exc:
        if os.environ.get("LOWRES_DEBUG") == "1":
            raise
        _say_error(str(exc))
        sys.exit(getattr(exc, "exit_code", 2))
    except SystemExit:
        raise
    except ModuleNotFoundError as exc:  # a command whose extra this install lacks (`pip install lowres` is small)
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None or os.environ.get("LOWRES_DEBUG") == "1":
            raise
        err_console.print(f"[bold red]error:[/] this command needs {exc.name.split('.')[0]}, which is not installed — "
                          f"pip install 'lowres\\[{extra}]' (see the README's install guide)", highlight=False,
                          soft_wrap=True)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except OSError as exc:
        # A file the user named that cannot be read or written (permissions, a file where a folder should be,
        # a full or read-only disk): one line naming it. Without a file name it is ours: show the traceback.
        if exc.filename is None or os.environ.get("LOWRES_DEBUG") == "1":
            raise
        what = f"{exc.filename!s}" + (f" → {exc.filename2!s}" if exc.filename2 else "")
        _say_error(f"{exc.strerror or type(exc).__name__}: {what!r} — check the path and its permissions")
        sys.exit(2)
    except Exception as exc:  # click usage errors and aborts carry their own exit codes
        import click

        if isinstance(exc, click.exceptions.ClickException):
            if os.environ.get("LOWRES_DEBUG") == "1":
                raise
            ctx = getattr(exc, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            _say_error(exc.format_message() + where)
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            err_console.print("aborted")
            sys.exit(130)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
