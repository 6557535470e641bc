"""Watch any Flower app: wrap its strategy, and its rounds show up where lowres' own federations do.

    from lowres.federated.watch import watch

    strategy = watch(FedAvg(fraction_evaluate=0.5), context)           # settings from the run config
    strategy = watch(FedAvg(), federation="cifar", prometheus_port=9101)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3, evaluate_fn=global_evaluate)

The wrapper is a Flower ``Strategy`` holding the app's own one (as Flower's differential-privacy wrappers
do): ``configure_*`` and ``aggregate_*`` go to the wrapped strategy unchanged, and on the way the wrapper
reads the messages it hands to the Grid and the replies the Grid hands back. Nothing in the app's messages,
its clients or its aggregation changes. Why a strategy wrapper rather than Flower mods: a ClientApp mod
sees one client and runs on that client's machine, a ServerApp has no mods in flwr 1.42, and only the
strategy sees a whole round — who was sampled, who replied, who failed, and the aggregate.

Per round it reports, through ``FedMonitor`` (the same MLflow runs and ``lowres_fed_*`` series as ``lowres fed``):
participants (``fed/clients_sampled``, ``fed/clients_replied``, ``fed/clients_failed``, ``fed/evaluate_*``),
the exact serialised bytes of each message's content each way per client (``wire.content_bytes``;
``lowres_fed_bytes_{sent,received}_total{client}``, ``fed/bytes_down``/``fed/bytes_up`` per round),
failures (error replies and sampled nodes that never replied, per client), the round's wall time
(``fed/round_seconds``), the part of it the wrapper itself took counting bytes and reporting
(``fed/watch_seconds``: the cost of watching), and the strategy's own aggregated metrics: train as
``fed/train_<key>``, federated evaluation as ``fed/federated_eval_<key>``, ``evaluate_fn``'s centralised one
as ``fed/central_eval_<key>`` (a leading ``train_``/``eval_`` of the key is not repeated), and all three as
``lowres_fed_strategy_metric{phase, metric}``. A client is named ``node-<node id>``.

Settings come from the keyword arguments, else from the Flower run config when ``context`` is given and
the app declares the keys (Flower only accepts ``--run-config`` overrides of keys in the app's
pyproject.toml), else from the environment: the federation's name (``lowres-federation``,
``$LOWRES_FEDERATION``, else ``flower-run-<run id>``), the Prometheus port (``lowres-prometheus-port``,
``$LOWRES_FED_PROMETHEUS_PORT``; 0: a free port; unset: no exporter), the MLflow store
(``lowres-tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``), ``lowres-experiment``
(``lowres-fed``) and ``lowres-mlflow`` (false: Prometheus only).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

from flwr.serverapp.strategy import Strategy

from lowres.federated.replies import short_reason
from lowres.federated.wire import content_bytes

DEFAULT_EXPERIMENT = "lowres-fed"


def watch(strategy: Strategy, context: Any = None, *, federation: str | None = None, mlflow: bool | None = None,
          tracking_uri: str | None = None, experiment: str | None = None, prometheus_port: int | None = None,
          offline_after_s: float = 120.0, console: Any = None) -> "WatchedStrategy":
    """``strategy`` wrapped so that every round it runs is reported (see the module docstring).

    The MLflow parent run and the Prometheus exporter start here; ``start()`` ends them (FINISHED, or FAILED
    when the strategy raised). A caller that drives ``configure_*``/``aggregate_*`` itself calls ``close()``."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"watch() takes a Flower strategy (flwr.serverapp.strategy.Strategy), "
                        f"got {type(strategy).__name__}")
    if type(strategy).start is not Strategy.start:
        raise TypeError(f"{type(strategy).__name__} overrides start(), whose own loop would bypass the wrapper; "
                        "drive its configure_*/aggregate_* through the watched strategy instead")
    run_config = dict(getattr(context, "run_config", None) or {})
    if federation is None:
        run_id = getattr(context, "run_id", None)
        federation = str(run_config.get("lowres-federation") or os.environ.get("LOWRES_FEDERATION")
                         or (f"flower-run-{run_id}" if run_id else "flower"))
    if mlflow is None:
        mlflow = bool(run_config.get("lowres-mlflow", True))
    tracking_uri = tracking_uri or (str(run_config["lowres-tracking-uri"]) if run_config.get("lowres-tracking-uri")
                                    else None)
    experiment = experiment or str(run_config.get("lowres-experiment") or DEFAULT_EXPERIMENT)
    if prometheus_port is None:
        raw = run_config.get("lowres-prometheus-port", os.environ.get("LOWRES_FED_PROMETHEUS_PORT"))
        try:
            prometheus_port = None if raw in (None, "") else int(raw)
        except ValueError:
            raise ValueError(f"LOWRES_FED_PROMETHEUS_PORT={raw!r} is not a port number; use 0 for a free one, "
                             "or leave it unset for no exporter") from None
    if prometheus_port is not None and not 0 <= prometheus_port <= 65535:
        raise ValueError(f"prometheus_port {prometheus_port} is not a port number; use 0 for a free one, "
                         "or leave it out for no exporter")
    from lowres.federated.monitor import FedMonitor

    monitor = FedMonitor(federation, mlflow=mlflow, tracking_uri=tracking_uri, experiment=experiment,
                         prometheus_port=prometheus_port, offline_after_s=offline_after_s,
                         params=strategy_params(strategy), console=console)
    return WatchedStrategy(strategy, monitor)


def strategy_params(strategy: Strategy) -> dict[str, Any]:
    """The strategy's class and its plain settings (numbers, strings, booleans), for the parent run's params."""
    out: dict[str, Any] = {"strategy": type(strategy).__name__}
    for key, value in vars(strategy).items():
        if not key.startswith("_") and isinstance(value, (bool, int, float, str)):
            out[f"strategy_{key}"] = value
    return out


def client_name(node_id: int) -> str:
    """A Flower client's name in MLflow and Prometheus (lowres' own clients go by partition instead)."""
    return f"node-{node_id}"


def numeric_metrics(content: Any) -> dict[str, float]:
    """The plain numbers of every MetricRecord in ``content`` (lists of numbers are left out)."""
    out: dict[str, float] = {}
    for record in getattr(content, "metric_records", {}).values():
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[str(key)] = float(value)
    return out


def prefixed(prefix: str, metrics: Any) -> dict[str, float]:
    """``{"eval_loss": x}`` → ``{"federated_eval_loss": x}`` for prefix ``federated_eval_`` (no ``eval_eval_``)."""
    base = prefix.rstrip("_").rsplit("_", 1)[-1] + "_"  # "train_" or "eval_"
    out: dict[str, float] = {}
    for key, value in dict(metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + str(key).removeprefix(base)] = float(value)
    return out


class WatchedStrategy(Strategy):
    """A Flower strategy that reports the rounds of the strategy it wraps; see the module docstring."""

    def __init__(self, strategy: Strategy, monitor: Any):
        self.strategy, self.monitor = strategy, monitor
        self.federation = monitor.federation
        self._round: dict[str, Any] | None = None  # the open round's figures
        self._sent: dict[tuple[int, str], dict[int, int]] = {}  # (round, phase) → node → bytes sent
        self._central = False  # start() was given an evaluate_fn: it closes each round
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        # the wrapped strategy's settings read through (strategy.fraction_train …); only called for misses
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    @property
    def run_id(self) -> str | None:
        """The federation's MLflow parent run."""
        return self.monitor.run_id

    def _size(self, content: Any) -> int:
        """``wire.content_bytes``; a content Flower itself could not serialise is counted as 0 bytes and as a
        failed tracking write rather than stopping the federation (DESIGN rule 8)."""
        try:
            return content_bytes(content)
        except Exception as exc:
            self.monitor.failures += 1
            self.monitor.last_error = f"counting a message's bytes: {type(exc).__name__}: {exc}"
            return 0

    # ------------------------------------------------------------------ the rounds
    def _open(self, rnd: int) -> dict[str, Any]:
        if self._round is not None and self._round["round"] != rnd:
            self._finish()
        if self._round is None:
            self.monitor.round_started(rnd)
            self._round = {"round": rnd, "t0": time.perf_counter(), "figures": {
                "bytes_down": 0.0, "bytes_up": 0.0, "clients_sampled": 0.0, "clients_replied": 0.0,
                "clients_failed": 0.0, "watch_seconds": 0.0}}
        return self._round

    def _configured(self, rnd: int, phase: str, messages: Iterable[Any]) -> list[Any]:
        messages = list(messages)
        t0 = time.perf_counter()
        state, sizes, sent = self._open(rnd), {}, {}
        for msg in messages:
            key = id(msg.content)  # FedAvg sends one RecordDict to every node: serialise it once
            if key not in sizes:
                sizes[key] = self._size(msg.content)
            node = msg.metadata.dst_node_id
            sent[node] = sent.get(node, 0) + sizes[key]
            self.monitor.sent(client_name(node), sizes[key])
        self._sent[(rnd, phase)] = sent
        fig = state["figures"]
        fig["bytes_down"] += sum(sent.values())
        fig["clients_sampled" if phase == "train" else "evaluate_sampled"] = float(len(sent))
        fig["watch_seconds"] += time.perf_counter() - t0
        return messages

    def _replied(self, rnd: int, phase: str, replies: Iterable[Any]) -> list[Any]:
        replies = list(replies)
        t0 = time.perf_counter()
        state, sent = self._open(rnd), self._sent.pop((rnd, phase), {})
        fig, answered, ok = state["figures"], set(), 0
        for reply in replies:
            node = reply.metadata.src_node_id
            who = client_name(node)
            answered.add(node)
            if reply.has_error():
                fig["clients_failed"] += 1
                self.monitor.failure(rnd, who, f"{phase} error: {short_reason(reply.error.reason)}")
                continue
            ok += 1
            nbytes = self._size(reply.content)
            fig["bytes_up"] += nbytes
            metrics = numeric_metrics(reply.content) | {"bytes_down": float(sent.get(node, 0))}
            self.monitor.reply(rnd, who, nbytes, metrics, prefix="fed/client/" if phase == "train"
                               else "fed/client/evaluate/")
        for node in set(sent) - answered:
            fig["clients_failed"] += 1
            self.monitor.unanswered(client_name(node), sent[node])
            self.monitor.failure(rnd, client_name(node), f"no {phase} reply (node gone, or past the timeout)")
        fig["clients_replied" if phase == "train" else "evaluate_replied"] = float(ok)
        fig["watch_seconds"] += time.perf_counter() - t0
        return replies

    def _finish(self, extra: dict[str, float] | None = None) -> None:
        state, self._round = self._round, None
        if state is None:
            return
        figures = {"round_seconds": time.perf_counter() - state["t0"], **state["figures"], **(extra or {})}
        self.monitor.round_done(state["round"], figures)

    def configure_train(self, server_round, arrays, config, grid):
        """The wrapped strategy's train messages, their bytes counted per client."""
        return self._configured(server_round, "train",
                                self.strategy.configure_train(server_round, arrays, config, grid))

    def aggregate_train(self, server_round, replies):
        """The wrapped strategy's aggregate; replies, failures and its metrics recorded first/after."""
        replies = self._replied(server_round, "train", replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        fig = self._open(server_round)["figures"]
        fig["clients_accepted"] = fig["clients_replied"] if arrays is not None else 0.0
        fig.update(prefixed("train_", metrics))
        self.monitor.strategy_metrics("train", dict(metrics or {}))
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        """The wrapped strategy's evaluate messages, their bytes counted per client."""
        return self._configured(server_round, "evaluate",
                                self.strategy.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round, replies):
        """The wrapped strategy's aggregate of the clients' evaluation; the round ends here unless start()
        was given an ``evaluate_fn``, which then ends it."""
        replies = self._replied(server_round, "evaluate", replies)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        self._open(server_round)["figures"].update(prefixed("federated_eval_", metrics))
        self.monitor.strategy_metrics("evaluate", dict(metrics or {}))
        if not self._central:
            self._finish()
        return metrics

    def summary(self) -> None:
        """The wrapped strategy's summary, and where its rounds are reported."""
        from logging import INFO

        from flwr.supercore import log

        self.strategy.summary()
        log(INFO, "\t└──> Watched by lowres: federation %r (MLflow run %s, Prometheus %s)", self.federation,
            self.monitor.run_id, self.monitor.exporter.url if self.monitor.exporter is not None else "off")

    def _central_eval(self, evaluate_fn: Callable) -> Callable:
        def central(server_round: int, arrays: Any) -> Any:
            res = evaluate_fn(server_round, arrays)
            figures = prefixed("central_eval_", res)
            self.monitor.strategy_metrics("central", dict(res or {}))
            if self._round is not None and self._round["round"] == server_round:
                self._finish(figures)
            elif figures:  # the evaluation of the initial arrays (round 0)
                self.monitor.round_done(server_round, figures)
            return res

        return central

    def start(self, grid, initial_arrays, num_rounds: int = 3, timeout: float = 3600, train_config=None,
              evaluate_config=None, evaluate_fn=None):
        """Flower's own ``Strategy.start`` loop over the wrapped strategy; the runs end with it."""
        from lowres.tracking import log_params

        if self.monitor.run_id is not None:
            try:
                log_params(self.monitor.run_id, {"num_rounds": num_rounds, "timeout": timeout},
                           self.monitor.tracking_uri)
            except Exception as exc:  # tracking never stops a federation; counted like the monitor's own writes
                self.monitor.failures += 1
                self.monitor.last_error = f"{type(exc).__name__}: {exc}"
        self._central = evaluate_fn is not None
        status = "FAILED"
        try:
            result = super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config,
                                   self._central_eval(evaluate_fn) if evaluate_fn is not None else None)
            status = "FINISHED"
            return result
        finally:
            self.close(status, step=num_rounds)

    def close(self, status: str = "FINISHED", step: int | None = None) -> None:
        """Report an open round, log the byte totals, end the MLflow runs, stop the exporter (once)."""
        if self._closed:
            return
        self._closed = True
        last = self._round["round"] if self._round is not None else 0
        self._finish()
        self.monitor.close(status, step=step if step is not None else last)
