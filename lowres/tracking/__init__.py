"""Tracking: MLflow runs (start or resume, standard tags, params, artifacts, metric batches).

Importing this package does not import mlflow; each function imports it when first called.
"""

from lowres.tracking.runs import (
    RunHandle,
    config_hash,
    end_run,
    log_metrics,
    log_params,
    log_text,
    max_logged_step,
    resolve_tracking_uri,
    standard_tags,
    start_run,
)

__all__ = [
    "RunHandle",
    "config_hash",
    "end_run",
    "log_metrics",
    "log_params",
    "log_text",
    "max_logged_step",
    "resolve_tracking_uri",
    "standard_tags",
    "start_run",
]
