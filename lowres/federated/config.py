"""FedConfig: one typed description of a federation — the clients' recipe, rounds, codecs, robustness, tracking.

    fed = load_fed_config("configs/fed/tiny-sim.yaml", ["rounds=3", "compression.up=topk10+int8"])

The clients' recipe is a RunConfig (``run:``, optionally on top of ``base:``, a run YAML). Per-client
differences (rank, quantization, precision — e.g. what the advisor chose for each machine) go in
``clients:`` keyed by partition id in simulation; in a deployment each SuperNode passes its own as node
config (``lowres-overrides``), since only it knows its hardware.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lowres.config import RunConfig, _format_errors, _set_path, load_config, parse_override, read_yaml_mapping
from lowres.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PartitionConfig(_Section):
    scheme: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration: small = each client sees few labels")
    label: str = Field("auto", description="field to partition by; auto: label/category/domain, else the "
                       "instruction category (first word) or log component; hash:N for N hash buckets")
    holdout: float = Field(0.1, ge=0, lt=1, description="fraction kept by the server for centralised eval")
    seed: int = 0


class CompressionConfig(_Section):
    up: str = Field("none", description="codec of client→server updates: none, fp16, int8, int8t, topk<P>[+int8], prune<P>")
    down: str = Field("none", description="codec of server→client weights (dense codecs only: none, fp16, int8, int8t)")
    error_feedback: bool = Field(False, description="carry what a lossy uplink codec dropped into the next round")
    qat: bool = Field(False, description="quantization-aware training: a client whose uplink is int8/int8t/int4 "
                      "trains through that rounding (straight-through estimator), so its update loses less; "
                      "clients with other codecs train as without it")
    per_client: dict[str, str] = Field(default_factory=dict, description="client name → its own uplink codec, "
                                       "e.g. {client-02: topk15+int8} (a client on a slow link)")
    slow_up: str | None = Field(None, description="uplink codec of the clients measured slower than "
                                "slow_below_tokens_per_second in their last round (per_client names win)")
    slow_below_tokens_per_second: float | None = Field(None, gt=0, description="the speed rule's threshold "
                                                       "(tokens/s each client reports after a round)")

    @field_validator("up", "down", "slow_up")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        from lowres.federated.compression import parse_codec

        if v is not None:
            parse_codec(v)
        return v

    @field_validator("per_client")
    @classmethod
    def _known_each(cls, v: dict[str, str]) -> dict[str, str]:
        from lowres.federated.compression import parse_codec

        for name, codec in v.items():
            try:
                parse_codec(codec)
            except ValueError as exc:
                raise ValueError(f"per_client[{name}]: {exc}") from None
        return v

    @model_validator(mode="after")
    def _rule_and_qat(self) -> "CompressionConfig":
        from lowres.federated.compression import QAT_KINDS, parse_codec

        if (self.slow_up is None) != (self.slow_below_tokens_per_second is None):
            raise ValueError("compression.slow_up and compression.slow_below_tokens_per_second go together "
                             "(the codec and the speed below which a client uses it)")
        used = [self.up, self.slow_up, *self.per_client.values()]
        if self.qat and not any(c is not None and parse_codec(c).kind in QAT_KINDS for c in used):
            raise ValueError(f"compression.qat trains through int8/int8t/int4 rounding, but no uplink codec is one "
                             f"(up is {self.up!r}); set compression.up=int8 or int4, or qat: false")
        return self

    def uplink(self, client: str, figures: dict | None = None) -> str:
        """The uplink codec of ``client``: its per_client entry, else slow_up when its last reported
        tokens_per_second is below the threshold, else ``up``."""
        if client in self.per_client:
            return self.per_client[client]
        speed = (figures or {}).get("tokens_per_second")
        if self.slow_up is not None and speed is not None and speed < self.slow_below_tokens_per_second:
            return self.slow_up
        return self.up

    @field_validator("down")
    @classmethod
    def _dense(cls, v: str) -> str:
        from lowres.federated.compression import parse_codec

        if parse_codec(v).kind in ("topk", "prune"):
            raise ValueError("the downlink carries whole weights, which sparsification would destroy; "
                             "use none, fp16, int8 or int8t")
        return v


class SelectionConfig(_Section):
    """Which connected clients train a round, by what they report (lowres.federated.strategies.select_clients)."""

    by: Literal["random", "memory", "speed", "examples"] = Field(
        "random", description="random: a seeded sample; memory / speed / examples: the clients with the most free "
        "memory, the highest measured tokens/s, the most training records first (an unmeasured client goes first)")
    min_free_memory_bytes: int | None = Field(None, ge=0, description="only clients reporting at least this much "
                                              "free memory")
    min_tokens_per_second: float | None = Field(None, ge=0, description="only clients that trained at least this "
                                                "fast in their last round (not yet measured: not filtered)")
    min_records: int | None = Field(None, ge=0, description="only clients holding at least this many training records")


_FEDOPT_PARAMS = ("eta", "eta_l", "beta_1", "beta_2", "tau")


class StrategyConfig(_Section):
    name: str = Field("fedavg", description="fedavg | fedprox (fedprox_mu > 0) | fedadam | fedyogi | fedadagrad "
                      "(Flower's server optimisers over the averaged update) | FILE.py:Class or package.module:Class "
                      "(a class with select, aggregate_train, aggregate_evaluate; lowres/federated/strategies.py)")
    eta: float | None = Field(None, gt=0, description="fedadam/fedyogi/fedadagrad: server learning rate η "
                              "(null: the Flower class's default: 0.1 fedadam/fedadagrad, 0.01 fedyogi)")
    eta_l: float | None = Field(None, gt=0, description="the clients' learning rate η_l (sets train.lr of every "
                                "client); null = the recipe's train.lr")
    beta_1: float | None = Field(None, ge=0, lt=1, description="fedadam/fedyogi: first-moment decay (null: Flower's 0.9)")
    beta_2: float | None = Field(None, ge=0, lt=1, description="fedadam/fedyogi: second-moment decay (null: Flower's 0.99)")
    tau: float | None = Field(None, gt=0, description="fedadam/fedyogi/fedadagrad: adaptivity τ added to √v "
                              "(null: Flower's 1e-3)")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of a user strategy class")
    selection: SelectionConfig = SelectionConfig()
    fedprox_mu: float = Field(0.0, ge=0, description="FedProx proximal weight μ; 0 = plain FedAvg")
    norm_factor: float | None = Field(10.0, gt=1, description="reject updates whose norm exceeds this × the "
                                      "median norm of the round (with 1-2 updates: × the previous global "
                                      "update's norm); null = no norm check")
    aggregator: Literal["fedavg", "median", "trimmed_mean"] = Field(
        "fedavg", description="fedavg: weighted mean; median / trimmed_mean: coordinate-wise, unweighted, robust "
        "to a minority of arbitrary updates")
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="trimmed_mean: fraction of values dropped at "
                                 "each end per coordinate (at least one each end from 3 updates)")
    weighting: Literal["samples", "equal"] = Field(
        "samples", description="fedavg weights: the num_examples each client reports (capped below), or equal")
    max_examples: int | None = Field(None, ge=1, description="the most num_examples one reply may weigh (a "
                                     "client reports its own count); null = no absolute cap")
    max_weight_ratio: float | None = Field(2.0, ge=1, description="a reply weighs at most this × the round's "
                                           "lower-median num_examples; null = no relative cap")

    @model_validator(mode="after")
    def _name_and_its_parameters(self) -> "StrategyConfig":
        from lowres.federated.strategies import BUILTIN, SERVER_OPTIMIZERS, is_class_spec

        if self.name not in BUILTIN and not is_class_spec(self.name):
            raise ValueError(f"strategy.name {self.name!r} is not one of {', '.join(BUILTIN)}, nor FILE.py:Class / "
                             "package.module:Class")
        if self.name == "fedprox" and self.fedprox_mu <= 0:
            raise ValueError("strategy.name fedprox needs strategy.fedprox_mu > 0 (the proximal weight μ, e.g. 0.01)")
        server = [k for k in _FEDOPT_PARAMS if k != "eta_l" and getattr(self, k) is not None]
        if server and self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"strategy.{', strategy.'.join(server)} {'applies' if len(server) == 1 else 'apply'} "
                             f"only to {', '.join(SERVER_OPTIMIZERS)} "
                             f"(strategy.name is {self.name!r})")
        betas = [k for k in ("beta_1", "beta_2") if getattr(self, k) is not None]
        if betas and self.name == "fedadagrad":
            raise ValueError(f"strategy.{betas[0]}: fedadagrad keeps no decaying moments (Flower fixes its betas at 0)")
        if self.options and not is_class_spec(self.name):
            raise ValueError("strategy.options are keyword arguments of a user strategy class (strategy.name: "
                             "FILE.py:Class); the built-in strategies take their own fields")
        return self


class RobustnessConfig(_Section):
    min_clients: int = Field(2, ge=1, description="accepted updates a round needs to change the global adapter")
    min_available: int = Field(2, ge=1, description="connected nodes to wait for before the first round (later "
                               "rounds wait for min_clients)")
    wait_nodes_s: float = Field(120.0, gt=0, description="longest wait for min_available nodes (Flower's own "
                                "sampling waits forever)")
    round_timeout_s: float = Field(600.0, gt=0, description="longest wait for replies in a round; late or "
                                   "dead clients are recorded as failures and the round goes on without them")
    fraction: float = Field(1.0, gt=0, le=1, description="fraction of connected nodes sampled per round")


class FedTrackingConfig(_Section):
    mlflow: bool = True
    mlflow_uri: str | None = None
    experiment: str = "lowres-fed"
    prometheus_port: int | None = Field(None, ge=0, le=65535, description="serve lowres_fed_* on /metrics; 0 = free port")
    offline_after_s: float = Field(120.0, gt=0, description="a client silent this long is shown offline")
    heartbeat_s: float = Field(30.0, gt=0, description="seconds between the server's MLflow heartbeats (two tags "
                               "each; Prometheus' heartbeat gauge is set every second)")
    crashed_after_s: float = Field(120.0, gt=0, description="a RUNNING federation whose server has not beaten for "
                                   "this long is crashed (lowres.federated.health)")
    stalled_after_s: float = Field(900.0, gt=0, description="a beating server with no round progress for this long "
                                   "is stalled; must be above robustness.round_timeout_s (left at its default, it "
                                   "becomes 1.5 x a longer timeout)")

    @model_validator(mode="after")
    def _beats(self) -> "FedTrackingConfig":
        if self.crashed_after_s < 2 * self.heartbeat_s:
            raise ValueError(f"tracking.crashed_after_s ({self.crashed_after_s:g}) must be at least twice "
                             f"tracking.heartbeat_s ({self.heartbeat_s:g}): one late beat is not a crash")
        return self


class IndexConfig(_Section):
    """Announcing the federation in the index on the lab's MLflow server (lowres/federated/index.py)."""

    announce: bool = Field(False, description="announce this federation so nodes can `lowres fed join` it")
    superlink: str | None = Field(None, description="HOST:PORT of the SuperLink as joining nodes reach it")
    root_cert: str | None = Field(None, description="the SuperLink's CA certificate (public) published with the "
                                  "entry; a path on the server's machine; empty = plain HTTP")
    heartbeat_s: float = Field(30.0, gt=0, description="seconds between the entry's heartbeats (one tag write each)")
    experiment: str = "lowres-fed-index"
    mlflow_uri: str | None = Field(None, description="the MLflow server holding the index; default "
                                   "tracking.mlflow_uri")

    @model_validator(mode="after")
    def _address(self) -> "IndexConfig":
        if self.announce and not self.superlink:
            raise ValueError("index.announce needs index.superlink (HOST:PORT nodes dial)")
        return self


class FedConfig(_Section):
    """A whole federation; see the module docstring."""

    federation: str = Field("fed", description="name: the Prometheus label and the MLflow parent run name")
    output_dir: str = "runs/fed"
    rounds: int = Field(3, ge=1)
    local_steps: int = Field(5, ge=1, description="optimizer steps each client runs per round")
    clients: int = Field(3, ge=1, description="simulated clients (partitions); ignored in deployment")
    base: str | None = Field(None, description="a run YAML the clients' recipe starts from")
    run: dict[str, Any] = Field(default_factory=dict, description="RunConfig fields over base (dotted or nested)")
    client_overrides: dict[int, list[str]] = Field(default_factory=dict, description="partition id → "
                                                   "['lora.rank=4', 'precision.quant=nf4', …]")
    partition: PartitionConfig = PartitionConfig()
    compression: CompressionConfig = CompressionConfig()
    strategy: StrategyConfig = StrategyConfig()
    robustness: RobustnessConfig = RobustnessConfig()
    tracking: FedTrackingConfig = FedTrackingConfig()
    index: IndexConfig = IndexConfig()

    @model_validator(mode="after")
    def _stalled_after_a_round_timeout(self):
        # a round may wait round_timeout_s for replies without progress: that is waiting, not a stall
        if self.tracking.stalled_after_s <= self.robustness.round_timeout_s:
            if "stalled_after_s" not in self.tracking.model_fields_set:  # the default follows a long timeout
                self.tracking.stalled_after_s = 1.5 * self.robustness.round_timeout_s
                return self
            raise ValueError(f"tracking.stalled_after_s ({self.tracking.stalled_after_s:g}) must be above "
                             f"robustness.round_timeout_s ({self.robustness.round_timeout_s:g}): a round waiting "
                             "for replies that long is not stalled")
        return self

    def run_config(self, partition: int | None = None, extra: list[str] | None = None) -> RunConfig:
        """The clients' RunConfig (for ``partition``: with its overrides), fixed for federated use: no MLflow
        run or profiler of its own (the federation logs centrally and profiles each round), no checkpoints
        between rounds, and max_steps = rounds × local_steps so the LR schedule spans the federation."""
        overrides = [f"{k}={v}" for k, v in _flatten(self.run)]
        if self.strategy.eta_l is not None:  # FedOpt's η_l is the clients' own learning rate
            overrides.append(f"train.lr={self.strategy.eta_l}")
        if partition is not None:
            overrides += self.client_overrides.get(partition, [])
        overrides += list(extra or [])
        overrides += ["tracking.mlflow=false", "tracking.profiler_mode=off", "tracking.jsonl=false",
                      "checkpoint.every=0", f"train.max_steps={self.rounds * self.local_steps}"]
        return load_config(self.base, overrides, use_env=False)

    def max_rank(self) -> int:
        ranks = [self.run_config(p).lora.rank for p in range(self.clients)] or [self.run_config().lora.rank]
        return max(ranks)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()))
    return out


def load_fed_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FedConfig:
    """Read a federation YAML, apply ``a.b=c`` overrides, validate everything (the clients' recipe too)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        data = read_yaml_mapping(p, "federation config", "give a YAML file, e.g. configs/fed/tiny-sim.yaml")
        if data.get("base"):
            # relative to the working directory, then to the YAML itself, then a shipped configs/… file
            from lowres.paths import find_config_file

            data["base"] = str(find_config_file(data["base"], beside=p))
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(data, key, value)
    try:
        fed = FedConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"the federation config{f' in {path}' if path else ''} is not valid",
                          _format_errors(exc)) from None
    from lowres.federated.strategies import load_class, is_class_spec, resolve_spec

    if is_class_spec(fed.strategy.name):  # a user class: found and checked now, not in round 1
        fed.strategy.name = resolve_spec(fed.strategy.name, beside=path)
        load_class(fed.strategy.name)
    fed.run_config()  # the clients' recipe must validate too, before anything starts
    for pid in fed.client_overrides:
        fed.run_config(pid)
    return fed
