"""Tracking URIs checked before any work: a scheme MLflow has a store for, a host where one is needed.

    uri = check_tracking_uri(flag_value)   # the resolved URI; UsageError (exit 2) naming a bad one

Shown URIs go through ``profiler.sinks.mlflow.redact_uri`` (a password becomes ``***``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from lowres.errors import UsageError
from profiler.sinks.mlflow import redact_uri, resolve_tracking_uri

# MLflow's tracking stores: file, SQLAlchemy databases, REST servers, Databricks
SCHEMES = {"file", "sqlite", "postgresql", "postgres", "mysql", "mssql", "http", "https", "databricks",
           "databricks-uc", "uc"}
HINT = "use http(s)://HOST:PORT, sqlite:///PATH/mlflow.db, postgresql://HOST/DB, file:///PATH or a folder"


def check_tracking_uri(uri: str | None = None, where: str = "tracking URI") -> str:
    """The URI lowres would use for ``uri`` (the flag or config value; None: the environment, then the default);
    UsageError when MLflow could not use it."""
    resolved = resolve_tracking_uri(uri)
    try:
        parts = urlsplit(resolved)
        parts.port  # noqa: B018 — a non-numeric port raises here
    except ValueError as exc:
        raise UsageError(f"{where} {redact_uri(resolved)!r} cannot be parsed ({exc})", hint=HINT) from None
    scheme = parts.scheme.lower().split("+", 1)[0]
    if not scheme or len(scheme) == 1:  # a plain folder (or a Windows drive letter): MLflow's file store
        return resolved
    if scheme not in SCHEMES:
        raise UsageError(f"{where} {redact_uri(resolved)!r} has scheme {parts.scheme!r}, for which MLflow has "
                         "no tracking store", hint=HINT)
    if scheme in ("http", "https") and not parts.hostname:
        raise UsageError(f"{where} {redact_uri(resolved)!r} names no host", hint=HINT)
    return resolved
