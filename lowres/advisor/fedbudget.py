"""A federated client's LoRA rank and codec, chosen together from a bytes-per-round budget
(``lowres tune --fed-round-budget``).

What a round costs is measured, not modelled: for each (rank, codec) the adapter's tensors, at the model's
real shapes and peft's names, are encoded by the codec and serialised into the Flower messages the server
counts (``wire.content_bytes``) — the global adapter down (with the train config a round carries) and the
update up (with a reply's metrics). Codecs' payloads depend on shapes only (top-k keeps a fixed share), so
these are the bytes a round will move.

The rule: keep the rank the data warrants (``advice.rank_for_data``), with the least compressed uplink that
fits — ``UPLINKS`` runs from none to top-k 10 %, each smaller than the one before, and every one of them stayed
within 2 % of uncompressed eval loss in ``bench/fed_compression.py``; when not even the smallest fits, halve the
rank and try again. int4 comes with ``compression.qat: true`` (its clients train through the rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# uplink codec → downlink codec; ordered from least to most compressed (bytes per value 4, 2, 1, 0.5, 0.375,
# 0.275, 0.225: a top-k share in int8 plus a 1-bit position mask)
UPLINKS = {"none": "none", "fp16": "fp16", "int8": "int8", "int4": "int8", "topk25+int8": "int8",
           "topk15+int8": "int8", "topk10+int8": "int8"}


@dataclass
class FedChoice:
    rank: int
    up: str
    down: str
    qat: bool
    bytes_down: int
    bytes_up: int

    @property
    def bytes_round(self) -> int:
        return self.bytes_down + self.bytes_up

    def overrides(self) -> list[str]:
        """What to put in the federation config (``lowres fed run --set …``)."""
        out = [f"compression.up={self.up}", f"compression.down={self.down}"]
        if self.qat:
            out.append("compression.qat=true")
        if self.up.startswith("topk"):
            out.append("compression.error_feedback=true")
        return out


def lora_tensors_for(spec: Any, rank: int, targets: Any) -> dict[str, np.ndarray]:
    """Random LoRA tensors of ``spec``'s targeted linears at ``rank``, named as peft names them."""
    from lowres.advisor.arch import targeted
    from lowres.advisor.memory import linear_shapes, model_arch, resolve_targets

    arch = model_arch(spec)
    if arch is not None:
        layers = targeted(arch, targets)
    else:
        shapes = linear_shapes(spec)
        names = resolve_targets(targets) if isinstance(targets, str) else targets
        layers = [[(f"{t}_proj", *shapes[t]) for t in names] for _ in range(spec.num_layers)]
    rng = np.random.default_rng(0)
    out = {}
    for i, layer in enumerate(layers):
        for name, d_in, d_out in layer:
            stem = f"base_model.model.model.layers.{i}.{name}"
            out[f"{stem}.lora_A.weight"] = rng.standard_normal((rank, d_in), dtype=np.float32)
            out[f"{stem}.lora_B.weight"] = rng.standard_normal((d_out, rank), dtype=np.float32)
    return out


def message_bytes(spec: Any, rank: int, targets: Any, up: str, down: str, run_config_json: str = "") -> tuple[int, int]:
    """(down, up): serialised bytes of a round's train message and its reply at ``rank`` with these codecs."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from lowres.federated.compression import encode
    from lowres.federated.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, content_bytes, to_arrayrecord

    tensors = lora_tensors_for(spec, rank, targets)
    config = {"round": 1, "local_steps": 5, "federation": "fed", "run_config": run_config_json,
              "client_overrides": "{}", "fed_dir": "runs/fed/fed", "tokenizer_dir": "", "codec_up": up,
              "error_feedback": False, "qat": False, "fedprox_mu": 0.0}
    down_msg = RecordDict({ARRAYS_KEY: to_arrayrecord(encode(tensors, down)), CONFIG_KEY: ConfigRecord(config)})
    metrics = {k: 1.0 for k in ("num_examples", "rank", "qat", "steps", "train_seconds", "peak_rss_bytes",
                                "cpu_utilization_ratio", "free_memory_bytes", "train_loss", "tokens_per_second",
                                "eval_loss_before", "eval_accuracy_before", "eval_examples_before", "partition_id")}
    up_msg = RecordDict({ARRAYS_KEY: to_arrayrecord(encode(tensors, up)), METRICS_KEY: MetricRecord(metrics)})
    return content_bytes(down_msg), content_bytes(up_msg)


def choose(spec: Any, budget_bytes: float, targets: Any, want_rank: int,
           run_config_json: str = "") -> tuple[FedChoice | None, list[str]]:
    """The (rank, codec) for ``budget_bytes`` per round (see the module docstring); None when even rank 1
    with the smallest codec does not fit. Returns the reasons with the measured bytes."""
    rank = max(1, want_rank)
    tried = []
    while True:
        for up, down in UPLINKS.items():
            d, u = message_bytes(spec, rank, targets, up, down, run_config_json)
            if d + u <= budget_bytes:
                c = FedChoice(rank, up, down, up == "int4", d, u)
                why = [f"federated rank {rank} and uplink {up} (downlink {down}{', with QAT' if c.qat else ''}): "
                       f"a round measures {d / 1e6:.3f} MB down + {u / 1e6:.3f} MB up = {c.bytes_round / 1e6:.3f} MB "
                       f"≤ the {budget_bytes / 1e6:.3f} MB budget (serialised messages at the model's LoRA shapes)"]
                if rank < want_rank or up != "none":
                    why.append("the data warrants rank " + str(want_rank) + "; kept the largest rank with the least "
                               "compressed codec that fits" + (f" (tried: {'; '.join(tried[-3:])})" if tried else ""))
                why.append("federation config: " + " ".join(c.overrides()))
                return c, why
        smallest = list(UPLINKS)[-1]
        tried.append(f"rank {rank} with {smallest}: {(d + u) / 1e6:.3f} MB")
        if rank == 1:
            return None, [f"even rank 1 with {smallest} moves {(d + u) / 1e6:.3f} MB per round; the budget is "
                          f"{budget_bytes / 1e6:.3f} MB — target fewer modules (lora.targets=attention) or raise "
                          "--fed-round-budget"]
        rank = max(1, rank // 2)


def advise(spec: Any, cfg: Any, budget_bytes: float) -> tuple[FedChoice | None, list[str]]:
    """``choose`` for a RunConfig: the rank its data warrants, its LoRA targets, its run config in the message."""
    from lowres.advisor import advice

    targets = cfg.lora.targets if isinstance(cfg.lora.targets, str) else "attention_mlp"
    want, why = advice.rank_for_data(spec, advice.data_bytes(cfg.data), targets)
    choice, why_fed = choose(spec, budget_bytes, cfg.lora.targets, want, cfg.model_dump_json())
    return choice, why + why_fed
