"""Where samples go: the ``Sink`` protocol and ``build(spec)``, which turns a plain-JSON spec into a sink.

Specs are plain JSON because sinks are built inside the sampler process, which gets its configuration as
text. Each kind's module is imported only when a spec asks for it, so ``import profiler`` never pulls in
mlflow (and an absent package means an absent sink, not an ``if`` in the loop).

Spec kinds (fields in brackets are optional):

- ``{"kind": "jsonl", "path": str, [flush_interval_s: float = 1.0]}``
- ``{"kind": "prometheus", "port": int (0 = a free port), ["addr": "127.0.0.1"], ["labels": {...}]}``
- ``{"kind": "pushgateway", "url": "host:port", ["job": "lowres"], ["grouping": {...}],
  ["push_interval_s": 10.0], ["labels": {...}], ["timeout_s": 5.0]}``
- ``{"kind": "mlflow", "run_id": str, ["tracking_uri": str | None], ["interval_s": 10.0],
  ["spool_path": str], ["close_timeout_s": 10.0], ["first_step": 0], ["origin_ts": epoch s]}``
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from profiler.reading import Sample

# Labels a series may carry: few and bounded, so the number of series cannot grow with time. A step number
# or a timestamp as a label would create a new series per sample.
ALLOWED_LABELS = frozenset({"run", "host", "fingerprint", "phase", "federation", "client", "gpu", "cpu", "device",
                            "status", "metric"})  # status: a federation server's running | finished | failed
# metric: a watched Flower strategy's metric keys (lowres.federated.watch), as many as the app defines


@runtime_checkable
class Sink(Protocol):
    """Takes every batch the sampler produces. ``write`` must be cheap: slow I/O belongs on a thread."""

    def write(self, batch: Sequence[Sample]) -> None: ...

    def close(self) -> None: ...


class PortInUse(OSError):
    """A port asked for is taken. Defined here, not in lowres.errors, because profiler never imports lowres;
    the CLI turns it into a one-line message (exit 2)."""

    def __init__(self, port: int, addr: str):
        self.port = port
        self.addr = addr
        super().__init__(f"port {port} on {addr} is already in use; pick another port, or 0 for a free one")


# field -> (accepted types, required). ``kind`` is checked separately.
_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "jsonl": {"path": ((str,), True), "flush_interval_s": ((int, float), False)},
    "prometheus": {"port": ((int,), True), "addr": ((str,), False), "labels": ((dict,), False)},
    "pushgateway": {"url": ((str,), True), "job": ((str,), False), "grouping": ((dict,), False),
                    "push_interval_s": ((int, float), False), "labels": ((dict,), False),
                    "timeout_s": ((int, float), False)},
    "mlflow": {"run_id": ((str,), True), "tracking_uri": ((str, type(None)), False),
               "interval_s": ((int, float), False), "spool_path": ((str,), False),
               "close_timeout_s": ((int, float), False), "first_step": ((int,), False),
               "origin_ts": ((int, float), False)},
}


def validate(spec: Any) -> dict:
    """Check a spec's kind, required fields and field types; a ValueError names the first problem."""
    if not isinstance(spec, dict):
        raise ValueError(f"a sink spec must be a dict, got {type(spec).__name__}: {spec!r}")
    kind = spec.get("kind")
    if kind not in _FIELDS:
        raise ValueError(f"unknown sink kind {kind!r}; expected one of {sorted(_FIELDS)}")
    fields = _FIELDS[kind]
    for key in spec:
        if key != "kind" and key not in fields:
            raise ValueError(f"{kind} sink: unknown field {key!r}; accepted fields are {sorted(fields)}")
    for key, (types, required) in fields.items():
        if key not in spec:
            if required:
                raise ValueError(f"{kind} sink: missing field {key!r}")
            continue
        value = spec[key]
        # bool is an int to Python, but never a sensible port or interval
        if isinstance(value, bool) or not isinstance(value, types):
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"{kind} sink: field {key!r} must be {names}, got {value!r}")
        if key.endswith("_s") and value <= 0:
            raise ValueError(f"{kind} sink: field {key!r} must be > 0 seconds, got {value!r}")
    if kind == "prometheus" and not 0 <= spec["port"] <= 65535:
        raise ValueError(f"prometheus sink: field 'port' must be 0..65535 (0 = a free port), got {spec['port']!r}")
    if kind == "mlflow" and spec.get("first_step", 0) < 0:
        raise ValueError(f"mlflow sink: field 'first_step' must be >= 0, got {spec['first_step']!r}")
    if "labels" in spec:
        check_labels(spec["labels"], f"{kind} sink: field 'labels'")
    if "grouping" in spec:
        # "instance" is the Pushgateway's conventional grouping label; it never multiplies series over time
        check_labels(spec["grouping"], f"{kind} sink: field 'grouping'", ALLOWED_LABELS | {"instance"})
    return spec


def check_labels(labels: dict, where: str, allowed: frozenset = ALLOWED_LABELS) -> None:
    """Constant labels must be bounded ones with string values; a ValueError names the offender."""
    for k, v in labels.items():
        if k not in allowed:
            raise ValueError(f"{where}: label {k!r} is not allowed; use one of {sorted(allowed)}")
        if not isinstance(v, str):
            raise ValueError(f"{where}: label {k!r} must be a string, got {v!r}")


def build(spec: dict) -> Sink:
    """A sink from a plain-JSON spec (see the module docstring). Unknown kind or bad field → ValueError."""
    validate(spec)
    args = {k: v for k, v in spec.items() if k != "kind"}
    return _factories()[spec["kind"]](**args)


def _factories() -> dict[str, Callable[..., Sink]]:
    # Imported here, not at module top: each sink's dependencies load only when that sink is asked for.
    def jsonl(**kw):
        from profiler.sinks.jsonl import JsonlSink
        return JsonlSink(**kw)

    def prometheus(**kw):
        from profiler.sinks.prometheus import PrometheusExporter
        return PrometheusExporter(**kw)

    def pushgateway(**kw):
        from profiler.sinks.prometheus import PushgatewaySink
        return PushgatewaySink(**kw)

    def mlflow(**kw):
        from profiler.sinks.mlflow import MlflowSink
        return MlflowSink(**kw)

    return {"jsonl": jsonl, "prometheus": prometheus, "pushgateway": pushgateway, "mlflow": mlflow}
