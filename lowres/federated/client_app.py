"""The Flower ClientApp: thin handlers over ``lowres.federated.client``.

Which data a client trains on comes from its node config: ``data-path`` (a deployment: the node's own files),
else ``partition-id`` (simulation, or a loopback deployment sharing the server's folder: the partition file
the server wrote). ``lowres-overrides`` (``"lora.rank=4 precision.quant=nf4"``) sets this node's own
precision, quantization and rank; in simulation the federation config's ``client_overrides`` do.
``model.trust_remote_code`` is always false unless the node's own ``lowres-overrides`` set it: the server's
config never decides what code runs on a client.
``lowres-output-dir`` (default: beside the server's federation folder) and ``lowres-threads`` complete it.

    flower-supernode --insecure --superlink 127.0.0.1:9092 \\
        --node-config 'partition-id=0 num-partitions=2 lowres-overrides="lora.rank=4"'
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lowres.federated.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, from_arrayrecord, to_arrayrecord

app = ClientApp()


def _partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", -1))


def _client_config(context: Context, config: ConfigRecord | None):
    """This client's RunConfig: the federation's recipe + its own overrides + its own data."""
    from lowres.config import RunConfig, _set_path, parse_override

    pid = _partition_id(context)
    base = RunConfig.model_validate_json(str(config["run_config"]))
    from_server = json.loads(str(config.get("client_overrides", "{}"))).get(str(pid), [])
    own = str(context.node_config.get("lowres-overrides", "")).split()
    data_path = context.node_config.get("data-path")
    if not data_path and pid >= 0:
        data_path = str(Path(str(config["fed_dir"])) / "partitions" / f"client-{pid:02d}.jsonl")
    name = f"client-{pid:02d}" if pid >= 0 else f"node-{context.node_id}"
    # where the client's run files go: the node's own folder in a deployment, else beside the server's
    out = context.node_config.get("lowres-output-dir") or Path(str(config["fed_dir"])) / "clients" / name
    extra = [f"output_dir={out}", "data.max_examples=null"]
    if data_path:
        extra.append(f"data.path={data_path}")
    # threads: simulation runs several clients per machine; the recipe's default would take every core each
    threads = context.node_config.get("lowres-threads")
    if threads:
        extra.append(f"train.threads={int(threads)}")
    cfg_dict = base.model_dump(mode="json")
    for item in from_server:
        key, value = parse_override(item)
        _set_path(cfg_dict, key, value)
    # remote code would run on this machine: only the node's own overrides may allow it, never the server
    cfg_dict.setdefault("model", {})["trust_remote_code"] = False
    for item in own + extra:
        key, value = parse_override(item)
        _set_path(cfg_dict, key, value)
    return RunConfig.model_validate(cfg_dict), name


def _state(msg: Message, context: Context):
    from lowres.federated.client import client_state

    config = msg.content[CONFIG_KEY]
    cfg, name = _client_config(context, config)
    return client_state(cfg, name, str(config.get("tokenizer_dir", "")) or None), config


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Who this node is (partition id, LoRA rank), before the server sends it weights of that rank, and what
    the selection may judge it by (free memory, training records)."""
    from lowres.federated.client import identity_figures

    cfg, _ = _client_config(context, msg.content[CONFIG_KEY])
    metrics = {"partition_id": _partition_id(context), "rank": cfg.lora.rank, **identity_figures(cfg)}
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: load the global adapter, train local steps, reply with the encoded update and figures."""
    from lowres.federated.client import train_round

    state, config = _state(msg, context)
    parts, metrics = train_round(state, from_arrayrecord(msg.content[ARRAYS_KEY]), int(config["local_steps"]),
                                 str(config["codec_up"]), bool(config.get("error_feedback", False)),
                                 float(config.get("fedprox_mu", 0.0)), qat=bool(config.get("qat", False)))
    metrics["partition_id"] = float(_partition_id(context))
    return Message(RecordDict({ARRAYS_KEY: to_arrayrecord(parts), METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated eval: the global adapter on this client's own eval data."""
    from lowres.federated.client import evaluate_global

    state, _ = _state(msg, context)
    metrics = evaluate_global(state, from_arrayrecord(msg.content[ARRAYS_KEY]))
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)
