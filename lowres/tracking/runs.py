"""MLflow runs for lowres: start or resume one with the standard tags, log params, text and metric batches.

Everything goes through ``MlflowClient`` with an explicit run id rather than MLflow's fluent API, whose
"active run" is process-global state; a run id and a tracking URI are all a caller (or the sampler process)
needs. The tracking URI follows one rule, shared with the profiler's MLflow sink: the argument, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory (no server needed).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from profiler.sinks.mlflow import redact_uri, resolve_tracking_uri, strip_credentials

# Tag names other parts of lowres filter on (compare, regress): change them only together with those.
TAG_FINGERPRINT = "lowres.hardware.fingerprint"
TAG_TIER = "lowres.hardware.tier"
TAG_GIT_SHA = "lowres.git_sha"
TAG_CONFIG_HASH = "lowres.config_hash"
TAG_VERSION_PREFIX = "lowres.version."
VERSIONED_PACKAGES = ("lowres", "torch", "transformers", "peft", "mlflow")

# MLflow's limits per log_batch call and per param value (mlflow/utils/validation.py)
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_VALUE = 6000


@dataclass(frozen=True)
class RunHandle:
    """A started or resumed run: what every later call needs."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    resumed: bool


@functools.lru_cache(maxsize=8)
def client(tracking_uri: str | None = None):
    """An ``MlflowClient`` for the resolved URI, cached: a SQLite store checks its schema on first use.

    MLflow's "View run at …" line is off unless the environment asks for it: on a server, printing it makes
    every ended run fetch the whole run (params, metrics, tags) — the largest single cost of a federation's
    tracking traffic (bench/monitor_traffic.py); lowres prints its own links (``run_page``)."""
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    return MlflowClient(resolve_tracking_uri(tracking_uri))


def config_hash(config: Any) -> str:
    """A short, stable hash of a config: SHA-256 of its canonical JSON (sorted keys), first 16 hex digits.

    A RunConfig hashes itself (``RunConfig.config_hash``): only what determines results, not where the run
    writes or logs, so reruns of one config into other folders compare as the same config.
    """
    if hasattr(config, "config_hash"):
        return config.config_hash()
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    """Versions of the packages that change what a run measures, from installed metadata (nothing imported)."""
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def git_sha(path: str | Path | None = None) -> str | None:
    """The commit checked out at ``path`` (default: the working directory), or None outside a git checkout."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or Path.cwd(), capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def standard_tags(*, fingerprint: str | None, tier: str | None, config: Any = None,
                  git_path: str | Path | None = None) -> dict[str, str]:
    """The tags every lowres run carries so runs from different machines and versions can be compared.

    ``fingerprint`` and ``tier`` come from ``lowres.hardware.detect()``; absent values are left out rather
    than guessed.
    """
    tags = {TAG_VERSION_PREFIX + k: v for k, v in package_versions().items()}
    if fingerprint:
        tags[TAG_FINGERPRINT] = fingerprint
    if tier:
        tags[TAG_TIER] = tier
    if config is not None:
        tags[TAG_CONFIG_HASH] = config_hash(config)
    sha = git_sha(git_path)
    if sha:
        tags[TAG_GIT_SHA] = sha
        tags["mlflow.source.git.commit"] = sha  # MLflow's UI shows this one on the run page
    return tags


def descriptive_run_name(*parts: Any) -> str:
    """A run name that says what ran — ``tiny-fp32-r8-myhost-3f9a`` — from ``parts`` (model, precision, rank,
    machine; empty ones left out), plus a random suffix so two runs of one config still differ.

    The suffix comes from ``os.urandom``, not ``random``: recipes seed ``random`` before a run starts, which made
    MLflow's own generated names repeat from run to run.
    """
    import os

    words = [re.sub(r"[^A-Za-z0-9_.]+", "-", str(p).rsplit("/", 1)[-1]).strip("-") for p in parts if p not in (None, "")]
    return "-".join([w for w in words if w] + [os.urandom(2).hex()])


# MLflow 3 opens an experiment without this tag in its GenAI view; lowres runs are model development
# (MLflow's ExperimentKind.CUSTOM_MODEL_DEVELOPMENT), with metrics, params and artifacts.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    # MLflow puts a SQLite store's artifacts in ./mlruns of whatever directory the process runs in; keep them
    # beside the database instead, so a store and its artifacts move together.
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):])
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment) or "default"
    return (db.resolve().parent / "mlartifacts" / slug).as_uri()


def start_run(experiment: str = "lowres", *, run_name: str | None = None, run_id: str | None = None,
              tracking_uri: str | None = None, fingerprint: str | None = None, tier: str | None = None,
              config: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> RunHandle:
    """Start a run in ``experiment`` (created if missing), or resume ``run_id``, with the standard tags.

    Resuming sets the run back to RUNNING and refreshes its tags; its metrics continue from
    ``max_logged_step`` + 1.
    """
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    all_tags = {**standard_tags(fingerprint=fingerprint, tier=tier, config=config), **(tags or {})}
    if run_id:
        run = c.get_run(run_id)
        if run.info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
        _set_tags(c, run_id, all_tags)
        return RunHandle(run_id, run.info.experiment_id, uri, resumed=True)
    exp = c.get_experiment_by_name(experiment)
    if exp is not None:
        exp_id = exp.experiment_id
        if EXPERIMENT_KIND_TAG[0] not in (exp.tags or {}):  # made by an older lowres, or by hand
            c.set_experiment_tag(exp_id, *EXPERIMENT_KIND_TAG)
    else:
        try:
            exp_id = c.create_experiment(experiment, artifact_location=_artifact_location(uri, experiment),
                                         tags=dict([EXPERIMENT_KIND_TAG]))
        except Exception:
            # Another process created it between our look-up and create; use theirs.
            exp = c.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    return RunHandle(run.info.run_id, exp_id, uri, resumed=False)


def run_page(run_id: str, tracking_uri: str | None = None) -> str:
    """Where to see a run in MLflow's UI, in its model-training view (MLflow 3 opens the GenAI view unless the
    link asks, whatever the experiment's kind): the URL on a server, the `mlflow ui` command for a local store."""
    uri = resolve_tracking_uri(tracking_uri)
    exp = client(uri).get_run(run_id).info.experiment_id
    page = f"#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{strip_credentials(uri).rstrip('/')}/{page}"  # a link to show: never with a password in it
    return f"mlflow ui --backend-store-uri {redact_uri(uri)}, then http://127.0.0.1:5000/{page}"


def end_run(run_id: str, status: str = "FINISHED", tracking_uri: str | None = None) -> None:
    """Mark a run FINISHED (or FAILED / KILLED)."""
    client(tracking_uri).set_terminated(run_id, status=status)


def _set_tags(c, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def set_tags(run_id: str, tags: Mapping[str, str], tracking_uri: str | None = None) -> None:
    """Set (overwrite) ``tags`` on a run in one ``log_batch`` call."""
    _set_tags(client(tracking_uri), run_id, tags)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys (``optim.lr``); values as strings, cut to MLflow's 6000-character limit."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:_MAX_PARAM_VALUE]
    return out


def log_params(run_id: str, params: Mapping[str, Any], tracking_uri: str | None = None) -> None:
    """Log a (nested) dict of params in batches of 100. Re-logging equal values is fine; changing one raises."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flatten(params).items()]
    c = client(tracking_uri)
    for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        c.log_batch(run_id, params=items[i:i + _MAX_PARAMS_PER_BATCH])


def log_text(run_id: str, text: str, artifact_file: str, tracking_uri: str | None = None) -> None:
    """Store ``text`` as the run artifact ``artifact_file`` (e.g. ``config.yaml``)."""
    client(tracking_uri).log_text(run_id, text, artifact_file)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int, *, timestamp_ms: int | None = None,
                tracking_uri: str | None = None) -> None:
    """Log ``{key: value}`` at ``step`` with one ``log_batch`` per 1000 values, never one call per value."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    c = client(tracking_uri)
    for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
        c.log_batch(run_id, metrics=items[i:i + _MAX_METRICS_PER_BATCH])


def max_logged_step(run_id: str, key: str, tracking_uri: str | None = None) -> int | None:
    """The largest step logged for ``key`` in the run, or None if it has none (a resumed run starts after it).

    The run's latest-metrics record already holds, per key, the value at the largest step, so this reads one
    row per key instead of the whole history (which MLflow warns is expensive for long runs).
    """
    c = client(tracking_uri)
    objs = getattr(c.get_run(run_id).data, "_metric_objs", None)
    if objs is not None:
        steps = [m.step for m in objs if m.key == key]
        return max(steps) if steps else None
    history = c.get_metric_history(run_id, key)  # fallback if MLflow drops the private field
    return max((m.step for m in history), default=None)
