"""Typed errors whose messages say what was wrong, with which value, and what to do.

A port that is taken raises ``profiler.sinks.PortInUse`` (the profiler never imports lowres); the CLI maps it to
exit 2 like the errors here.

The CLI turns each into a one-line message and an exit code (LOWRES_DEBUG=1 shows the traceback).
"""

from __future__ import annotations


class LowresError(Exception):
    """Base of every error lowres raises on purpose. ``exit_code`` follows shell conventions."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} — {hint}")


class UsageError(LowresError):
    """Bad flags or values on the command line (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or override that does not validate; ``problems`` lists every one found."""

    def __init__(self, message: str, problems: list[str] | None = None, *, hint: str | None = None):
        self.problems = problems or []
        # one line, as every error: the problems follow the message, separated by semicolons
        full = message if not self.problems else f"{message}: " + "; ".join(self.problems)
        super().__init__(full, hint=hint)


class DataError(UsageError):
    """Missing, malformed or empty data (exit 2, before any heavy work)."""


class ModelError(UsageError):
    """A model that cannot be found or loaded as asked (exit 2)."""


class UnsupportedError(UsageError):
    """A combination this machine cannot run (e.g. bf16 on a CPU without it); says the alternative."""


class CheckpointError(UsageError):
    """A checkpoint that is missing, damaged or from another config."""


class NonFiniteError(UsageError):
    """Training diverged: a NaN/Inf loss, gradient or weight (exit 2); says which setting to change."""


class Interrupted(LowresError):
    """Work stopped by SIGTERM or SIGINT after it saved what it could (exit 143 or 130, the shell's codes)."""

    def __init__(self, signame: str, message: str, *, hint: str | None = None):
        self.exit_code = 143 if signame == "SIGTERM" else 130
        super().__init__(message, hint=hint)


class CommandNotFound(LowresError):
    """The command given to ``lowres profile`` does not exist (exit 127)."""

    exit_code = 127

