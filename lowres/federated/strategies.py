"""Strategies of ``lowres fed`` by name or by class: which clients train a round, how their updates and their
eval figures are aggregated.

    strategy = make_strategy(fed.strategy)          # built in (fedavg, fedprox, fedadam, fedyogi, fedadagrad)
                                                    # or strategy.name: "FILE.py:Class" / "package.module:Class"
    chosen = strategy.select(rnd, clients, count)                       # configure the round
    new_global = strategy.aggregate_train(rnd, global_tensors, updates, weights)
    figures = strategy.aggregate_evaluate(rnd, evals)                   # {"loss": …, "accuracy": …}

The interface a user class implements (all three methods; the built-in steps are plain functions below, so a
class that changes one step calls them for the others):

- ``select(server_round, clients, count) -> list[ClientInfo | str]``: the clients (or their names) to train
  this round, from ``clients`` (every connected, identified node, each with the figures it reported: free
  memory, records, and after its first round speed and examples); ``count`` is what
  ``robustness.fraction`` / ``min_available`` ask for — a hint, any non-empty subset is accepted.
- ``aggregate_train(server_round, global_tensors, updates, weights) -> {name: array}``: the new global adapter
  from the screened updates (``strategy.Update``: client, delta, num_examples, rank) and their capped weights.
- ``aggregate_evaluate(server_round, evals) -> {"loss": float, "accuracy": float, …}``: one figure per key
  from the clients' eval replies (``EvalReply``: client, examples, loss, accuracy), or {} for none.

Screening (NaN/Inf, shapes, norm) and the caps on self-reported counts run before a strategy sees updates:
a strategy chooses and combines, it never has to defend the server.

The server optimisers (FedAdam, FedYogi, FedAdagrad; Reddi et al. 2021, "Adaptive Federated Optimization")
are Flower's own classes from ``flwr.serverapp.strategy``, driven by ``ServerOptimizer``: lowres' round loop
averages the updates (per rank slot, screened, capped), and the Flower strategy turns that average into the
server step ``x ← x + η·m_t / (√v_t + τ)`` with its own moment state, exactly as its ``aggregate_train`` does
for its own FedAvg average.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lowres.errors import ConfigError, LowresError
from lowres.federated.strategy import Update, aggregate

BUILTIN = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")
SERVER_OPTIMIZERS = {"fedadam": "FedAdam", "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad"}
METHODS = {"select": ("server_round", "clients", "count"),
           "aggregate_train": ("server_round", "global_tensors", "updates", "weights"),
           "aggregate_evaluate": ("server_round", "evals")}
# selection.by → the figure it ranks by (ClientInfo.figures)
SELECT_BY = {"memory": "free_memory_bytes", "speed": "tokens_per_second", "examples": "num_records"}


class StrategyError(LowresError):
    """A user strategy that returned something the round cannot use (exit 2: fix the class)."""

    exit_code = 2


@dataclass
class ClientInfo:
    """A connected client as a strategy sees it. ``figures``: what it last reported — ``free_memory_bytes``
    (RAM it can still use, cgroup-aware), ``num_records`` (its training records), and once it has trained
    ``tokens_per_second``, ``num_examples`` (train blocks), ``peak_rss_bytes``, ``train_seconds``."""

    name: str
    node: int
    partition_id: int
    rank: int
    figures: dict[str, float] = field(default_factory=dict)
    rounds_trained: int = 0


@dataclass
class EvalReply:
    """One client's evaluation of a global adapter on its own eval data."""

    client: str
    examples: float  # eval blocks it read (the weight), capped like num_examples
    loss: float
    accuracy: float | None = None


@runtime_checkable
class Strategy(Protocol):
    """See the module docstring."""

    def select(self, server_round: int, clients: list[ClientInfo], count: int) -> list[ClientInfo | str]: ...

    def aggregate_train(self, server_round: int, global_tensors: dict[str, np.ndarray], updates: list[Update],
                        weights: list[float]) -> dict[str, np.ndarray]: ...

    def aggregate_evaluate(self, server_round: int, evals: list[EvalReply]) -> dict[str, float]: ...


# ---------------------------------------------------------------------------------------------- the steps
def select_clients(clients: list[ClientInfo], count: int, by: str = "random", seed: int = 0, server_round: int = 1,
                   minimum: dict[str, float] | None = None) -> list[ClientInfo]:
    """``count`` clients: those meeting every ``minimum`` (figure → least value; a client that has not reported
    a figure yet is not filtered by it), then ranked by ``by`` (``memory``, ``speed``, ``examples``: the highest
    figure first; a client not measured yet goes first, so every client is measured once) or a seeded random
    sample (``random``, the default). Ties fall in a seeded random order. Fewer than ``count`` may qualify."""
    eligible = [c for c in clients if all(c.figures.get(k, math.inf) >= v for k, v in (minimum or {}).items())]
    rng = np.random.default_rng([seed, server_round])
    order = [eligible[i] for i in rng.permutation(len(eligible))]  # the tie-break (and the random sample)
    if by != "random":
        if by not in SELECT_BY:
            raise ValueError(f"unknown selection.by {by!r}; use random, {', '.join(SELECT_BY)}")
        key = SELECT_BY[by]
        order.sort(key=lambda c: -c.figures.get(key, math.inf))  # stable: ties keep the random order
    return sorted(order[:count], key=lambda c: c.node)


def weighted_eval(evals: list[EvalReply]) -> dict[str, float]:
    """Loss and token accuracy of the replies, weighted by their examples (the mean Flower's
    ``aggregate_evaluate`` takes, weighted by ``num-examples``); {} when none has a positive weight."""
    w = np.array([e.examples for e in evals], np.float64)
    if not len(evals) or w.sum() <= 0:
        return {}
    out = {"loss": float(np.average([e.loss for e in evals], weights=w))}
    acc = [(e.accuracy, x) for e, x in zip(evals, w) if e.accuracy is not None]
    if acc and sum(x for _, x in acc) > 0:
        out["accuracy"] = float(np.average([a for a, _ in acc], weights=[x for _, x in acc]))
    return out


@contextlib.contextmanager
def _quiet_flower():
    """Flower logs an INFO line per aggregate_train call; the server step is not a round of its own."""
    log = logging.getLogger("flwr")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


class ServerOptimizer:
    """Flower's FedAdam / FedYogi / FedAdagrad applied to lowres' averaged update (see the module docstring).
    ``step(rnd, current, averaged)`` returns the new global adapter; the moments persist across rounds."""

    def __init__(self, name: str, **params: float):
        from flwr.serverapp import strategy as flower

        self.name = name
        self.flower = getattr(flower, SERVER_OPTIMIZERS[name])(**{k: v for k, v in params.items() if v is not None})

    def step(self, server_round: int, current: dict[str, np.ndarray], averaged: dict[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
        from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

        # what Flower's configure_train records (the arrays sent this round), and one reply carrying the
        # average: Flower's own FedAvg over one reply is that average, and its aggregate_train does the rest
        self.flower.current_arrays = {k: np.asarray(v) for k, v in current.items()}
        meta = Metadata(run_id=0, message_id="", src_node_id=0, dst_node_id=0, reply_to_message_id="lowres-average",
                        group_id=str(server_round), created_at=time.time(), ttl=0.0, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in averaged.items()}),
                              "metrics": MetricRecord({self.flower.weighted_by_key: 1})})
        with _quiet_flower():
            arrays, _ = self.flower.aggregate_train(server_round, [Message(content, metadata=meta)])
        return {k: arrays[k].numpy().astype(np.float32) for k in current}


class BuiltinStrategy:
    """fedavg / fedprox (the client's proximal term; the server averages) / fedadam / fedyogi / fedadagrad, with
    ``strategy.aggregator`` for the average and ``strategy.selection`` for the round's clients."""

    def __init__(self, st: Any, seed: int = 0):
        self.st, self.seed = st, seed
        sel = st.selection
        self.minimum = {k: float(v) for k, v in (("free_memory_bytes", sel.min_free_memory_bytes),
                                                  ("tokens_per_second", sel.min_tokens_per_second),
                                                  ("num_records", sel.min_records)) if v is not None}
        # a parameter left null takes the Flower class's own default (FedAdam η = 0.1, FedYogi η = 0.01, …)
        self.optimizer = (ServerOptimizer(st.name, eta=st.eta, eta_l=st.eta_l, beta_1=st.beta_1, beta_2=st.beta_2,
                                          tau=st.tau) if st.name in SERVER_OPTIMIZERS else None)

    def select(self, server_round, clients, count):
        return select_clients(clients, count, self.st.selection.by, self.seed, server_round, self.minimum)

    def aggregate_train(self, server_round, global_tensors, updates, weights):
        averaged = aggregate(global_tensors, updates, weights, self.st.aggregator, self.st.trim_fraction)
        if self.optimizer is None:
            return averaged
        return self.optimizer.step(server_round, global_tensors, averaged)

    def aggregate_evaluate(self, server_round, evals):
        return weighted_eval(evals)


# ---------------------------------------------------------------------------------------------- loading
def is_class_spec(name: str) -> bool:
    return name not in BUILTIN and ":" in name


def resolve_spec(name: str, beside: str | Path | None = None) -> str:
    """``FILE.py:Class`` with FILE made absolute (as given, beside the YAML, or a shipped ``configs/…`` file);
    ``package.module:Class`` unchanged."""
    module, _, cls = name.rpartition(":")
    if module.endswith(".py"):
        from lowres.paths import find_config_file

        return f"{Path(find_config_file(module, beside=beside)).resolve()}:{cls}"
    return name


def load_class(spec: str) -> type:
    """The class ``FILE.py:Class`` or ``package.module:Class`` names; ConfigError (exit 2) naming what is
    missing or wrong: the module, the class, or a method of the interface."""
    module_name, _, cls_name = spec.rpartition(":")
    where = f"strategy.name {spec!r}"
    if not module_name or not cls_name.isidentifier():
        raise ConfigError(f"{where} is not MODULE:Class or FILE.py:Class",
                          hint="e.g. configs/fed/strategies/example_strategy.py:FastestClientsTrimmed")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"{where}: no file {path}", hint="give a path relative to the working directory or "
                              "to the federation YAML")
        key = f"lowres_user_strategy_{abs(hash(str(path.resolve())))}"
        try:
            mod_spec = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[key] = module  # dataclasses and pickling look the module up by name
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(key, None)
            raise ConfigError(f"{where}: {path} failed to import ({type(exc).__name__}: {exc})") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ConfigError(f"{where}: module {module_name!r} cannot be imported ({type(exc).__name__}: {exc})",
                              hint="is it on PYTHONPATH? Or name a file: path/to/file.py:Class") from None
    cls = getattr(module, cls_name, None)
    if not inspect.isclass(cls):
        found = sorted(n for n, v in vars(module).items() if inspect.isclass(v) and v.__module__ == module.__name__)
        raise ConfigError(f"{where}: {module_name} has no class {cls_name!r}",
                          hint=f"classes there: {', '.join(found) or 'none'}")
    problems = []
    for method, params in METHODS.items():
        fn = getattr(cls, method, None)
        if not callable(fn):
            problems.append(f"{method}({', '.join(params)}) is missing")
            continue
        try:
            inspect.signature(fn).bind(None, *params)  # self + the arguments the round passes
        except (TypeError, ValueError):
            problems.append(f"{method}{inspect.signature(fn)} cannot take ({', '.join(params)})")
    if problems:
        raise ConfigError(f"{where}: {cls_name} does not implement the strategy interface", problems,
                          hint="see lowres/federated/strategies.py or the README (Strategies)")
    return cls


def make_strategy(st: Any, seed: int = 0) -> Any:
    """The strategy ``st`` (a StrategyConfig) names: built in, or the user's class built with ``st.options``
    (wrapped in ``CheckedStrategy``)."""
    if not is_class_spec(st.name):
        return BuiltinStrategy(st, seed)
    cls = load_class(st.name)
    try:
        return CheckedStrategy(cls(**st.options), st.name)
    except Exception as exc:
        raise ConfigError(f"strategy.name {st.name!r}: {cls.__name__}(**strategy.options) failed "
                          f"({type(exc).__name__}: {exc})", hint="check strategy.options") from None


class CheckedStrategy:
    """A user's strategy as the round loop calls it: it gets copies (it cannot change the server's state behind
    its back), its answers are checked, and whatever it raises becomes one StrategyError line naming the method."""

    def __init__(self, inner: Any, spec: str):
        self.inner, self.spec = inner, spec

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.inner, method)(*args)
        except StrategyError:
            raise
        except Exception as exc:
            raise StrategyError(f"{self.spec}.{method} raised {type(exc).__name__}: {exc}") from exc

    def select(self, server_round, clients, count):
        offered = [ClientInfo(c.name, c.node, c.partition_id, c.rank, dict(c.figures), c.rounds_trained)
                   for c in clients]
        return chosen_clients(self._call("select", server_round, offered, count), clients, self.spec)

    def aggregate_train(self, server_round, global_tensors, updates, weights):
        new = self._call("aggregate_train", server_round, {k: v.copy() for k, v in global_tensors.items()},
                         list(updates), list(weights))
        return checked_global(new, global_tensors, self.spec)

    def aggregate_evaluate(self, server_round, evals):
        return checked_figures(self._call("aggregate_evaluate", server_round, list(evals)), self.spec)


def chosen_clients(picked: Any, offered: list[ClientInfo], spec: str) -> list[ClientInfo]:
    """A strategy's ``select`` result as ClientInfo (names or objects); StrategyError for anything else."""
    by_name = {c.name: c for c in offered}
    out = []
    for item in picked if isinstance(picked, (list, tuple)) else [picked]:
        name = item.name if isinstance(item, ClientInfo) else item
        if not isinstance(name, str) or name not in by_name:
            raise StrategyError(f"{spec}.select returned {item!r}, not one of the clients offered "
                                f"({', '.join(sorted(by_name))})")
        if by_name[name] not in out:
            out.append(by_name[name])
    if not out and offered:
        raise StrategyError(f"{spec}.select chose no client out of {len(offered)}: return at least one")
    return sorted(out, key=lambda c: c.node)


def checked_global(new: Any, old: dict[str, np.ndarray], spec: str) -> dict[str, np.ndarray]:
    """A strategy's ``aggregate_train`` result, checked: the same names and shapes, finite float32."""
    if not isinstance(new, dict) or set(new) != set(old):
        got = sorted(new)[:2] if isinstance(new, dict) else type(new).__name__
        raise StrategyError(f"{spec}.aggregate_train must return the global adapter's tensors by name "
                            f"({len(old)} of them), got {got}")
    out = {}
    for k, x in new.items():
        a = np.asarray(x, dtype=np.float32)
        if a.shape != old[k].shape:
            raise StrategyError(f"{spec}.aggregate_train: {k} has shape {a.shape}, expected {old[k].shape}")
        if not np.all(np.isfinite(a)):
            raise StrategyError(f"{spec}.aggregate_train: {k} holds NaN or Inf")
        out[k] = a
    return out


def checked_figures(figures: Any, spec: str) -> dict[str, float]:
    """A strategy's ``aggregate_evaluate`` result: a dict of finite numbers."""
    if not isinstance(figures, dict):
        raise StrategyError(f"{spec}.aggregate_evaluate must return a dict of numbers, got {type(figures).__name__}")
    out = {}
    for k, v in figures.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise StrategyError(f"{spec}.aggregate_evaluate: {k!r} = {v!r} is not a finite number")
        out[str(k)] = float(v)
    return out
