"""The server's side of a federation as plain functions over a Flower ``Grid``: prepare, then rounds.

    prep = prepare(fed)                  # preparation.py: partitions, tokenizer, central eval set, initial/resumed global
    result = run_rounds(grid, fed, prep, monitor)

Why our own round loop rather than ``flwr.serverapp.strategy.FedAvg.start``: each client gets its own payload
(the global cut to its rank), replies are screened before averaging, byte counters are summed rather than
averaged, and every wait is bounded — Flower's ``sample_nodes`` waits forever for ``min_available_nodes``.
The aggregation rules themselves live in ``strategy.py`` as pure functions.

A round: wait (bounded) for nodes → ask new nodes who they are (partition, rank; a small QUERY message) →
send each sampled node the global adapter at its rank, encoded by the downlink codec → collect replies until
``round_timeout_s`` → record errors and silent nodes as failures → decode and screen updates (NaN/Inf, shapes,
norm) → the strategy (``strategies.py``: built in by name, or the user's class) chose the round's clients by
what they report and now aggregates the accepted updates (FedAvg, median or trimmed mean, then FedAdam/Yogi/
Adagrad's server step) if there are at least ``min_clients`` (else the global stays) → save the global adapter
(safetensors) → centralised eval (loss, token accuracy). Federated eval rides on the next round's train
replies (each client first evaluates the global it receives on its own eval data); after the last round one
EVALUATE message per node evaluates the final adapter.

No client can crash or capture the loop: every step of reading a reply (metrics, sizes, decoding) runs inside
one guard per reply, so a bad reply is a recorded failure of that client, never of the round; sizes are
checked against the shapes the server sent *before* anything is allocated (``wire.from_arrayrecord``,
``compression.decode(expected=…)``); the weight a client's ``num_examples`` buys is capped
(``strategy.max_examples``, ``strategy.max_weight_ratio``, or ``strategy.weighting: equal``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowres.errors import LowresError
from lowres.federated.compression import encode
from lowres.federated.config import FedConfig
from lowres.federated.global_state import save_global
from lowres.federated.preparation import Prepared, central_figures, prepare
from lowres.federated.replies import read_update, reply_metrics, short_reason
from lowres.federated.strategies import ClientInfo, EvalReply, make_strategy
from lowres.federated.strategy import (capped_weights, expected_shapes, screen, sum_metrics, truncate_to_rank,
                                       update_norm, update_weights)
from lowres.federated.wire import ARRAYS_KEY, CONFIG_KEY, content_bytes, to_arrayrecord


class FederationError(LowresError):
    """A federation that cannot go on (no nodes, every round failed)."""

    exit_code = 1


@dataclass
class FedResult:
    rounds: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    final_eval: dict = field(default_factory=dict)
    initial_eval: dict = field(default_factory=dict)  # the starting global adapter (central, then federated)
    global_path: str | None = None
    clients: dict[int, dict] = field(default_factory=dict)
    run_id: str | None = None  # the MLflow parent run
    children: dict[str, str] = field(default_factory=dict)  # client → MLflow child run


# ---------------------------------------------------------------------------------------------- messages
def wait_for_nodes(grid: Any, minimum: int, timeout_s: float) -> list[int]:
    """Connected node ids once at least ``minimum`` are there; FederationError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of the {minimum} nodes needed connected within {timeout_s:g} s",
                                  hint="start more SuperNodes, or lower robustness.min_available")
        time.sleep(0.5)


def _message(content: Any, node: int, kind: str):
    from flwr.app import Message, MessageType

    return Message(content=content, dst_node_id=node, message_type=getattr(MessageType, kind))


def identify(grid: Any, nodes: list[int], config: dict, timeout_s: float, monitor: Any,
             failures: list[dict] | None = None, max_rank: int = 1024) -> dict[int, dict]:
    """Ask nodes who they are: {node: {"partition_id", "rank", "client"}} for those that answered well. The
    query carries the federation's config, from which (and its own node config) a client knows its rank. A
    reply that cannot be read (no metrics, a rank outside 1..``max_rank``, …) leaves its node unknown (never
    sampled) and is appended to ``failures``."""
    from flwr.app import ConfigRecord, RecordDict

    content = RecordDict({CONFIG_KEY: ConfigRecord(config)})
    down = content_bytes(content)
    msgs = [_message(content, n, "QUERY") for n in nodes]
    out: dict[int, dict] = {}
    taken: set[str] = set()
    for reply in grid.send_and_receive(msgs, timeout=timeout_s):
        node = None
        try:
            node = reply.metadata.src_node_id
            if node not in nodes or node in out or reply.has_error():
                continue
            m = reply_metrics(reply.content, ("partition_id", "rank"))
            pid, rank = m["partition_id"], m["rank"]
            if pid != int(pid) or not -1 <= pid <= 1_000_000:
                raise ValueError(f"partition_id {pid:g} is not an integer in -1..1000000")
            if rank != int(rank) or not 1 <= rank <= max_rank:
                raise ValueError(f"rank {rank:g} is not an integer in 1..{max_rank}")
            name = client_name(int(pid), node)
            if name in taken:  # two nodes claiming one partition: the second goes by its node id
                name = f"node-{node}"
            taken.add(name)
            figures = {k: m[k] for k in IDENTITY_FIGURES if k in m and m[k] >= 0}
            out[node] = {"partition_id": int(pid), "rank": int(rank), "client": name, "figures": figures}
            monitor.sent(name, down)
            monitor.received(name, content_bytes(reply.content))
        except Exception as exc:  # one guard per reply: a bad answer leaves that node out, nothing more
            if failures is not None:
                failures.append({"client": f"node-{node}", "reason": f"unreadable identity reply: {short_reason(exc)}",
                                 "rejected": True})
    return out


# what a client's replies tell the selection about it (strategies.ClientInfo.figures)
IDENTITY_FIGURES = ("free_memory_bytes", "num_records")
TRAIN_FIGURES = ("free_memory_bytes", "tokens_per_second", "num_examples", "peak_rss_bytes", "train_seconds")


def client_name(partition_id: int, node_id: int) -> str:
    """The Prometheus/MLflow name of a client: its partition in simulation, its node id otherwise."""
    return f"client-{partition_id:02d}" if partition_id >= 0 else f"node-{node_id}"


def train_config(fed: FedConfig, prep: Prepared, rnd: int) -> dict:
    """What every client needs besides the weights (its own overrides it picks by partition id)."""
    return {"round": rnd, "local_steps": fed.local_steps, "federation": fed.federation,
            "run_config": fed.run_config().model_dump_json(),
            "client_overrides": json.dumps({str(k): v for k, v in fed.client_overrides.items()}),
            "fed_dir": str(prep.fed_dir.resolve()), "tokenizer_dir": prep.tokenizer_dir or "",
            "codec_up": fed.compression.up, "error_feedback": fed.compression.error_feedback,
            "qat": fed.compression.qat,
            "fedprox_mu": float(fed.strategy.fedprox_mu)}


def _payload(tensors: dict[str, np.ndarray], rank: int, codec: str, config: dict):
    from flwr.app import ConfigRecord, RecordDict

    parts = encode(truncate_to_rank(tensors, rank), codec)
    return RecordDict({ARRAYS_KEY: to_arrayrecord(parts), CONFIG_KEY: ConfigRecord(config)})


# ---------------------------------------------------------------------------------------------- rounds
def run_rounds(grid: Any, fed: FedConfig, prep: Prepared, monitor: Any, console: Any = None) -> FedResult:
    """Rounds ``prep.start_round`` … ``fed.rounds``, then the federated eval of the final adapter."""
    rb, st, result = fed.robustness, fed.strategy, FedResult()
    strategy = make_strategy(st, fed.partition.seed)
    known: dict[int, dict] = {}
    tensors = prep.global_tensors
    max_rank = max(x.shape[0] for n, x in tensors.items() if "lora_A" in n)
    prev_norm: float | None = None  # the last global update's norm: the norm screen's reference below 3 updates
    answered: set[int] = set()
    silent: set[int] = set()  # sampled in the last round and never answered
    say = console.print if console is not None else (lambda *a, **k: None)
    if prep.start_round == 1:  # the starting point of the per-round curves (step 0)
        figures0 = central_figures(prep, tensors)
        if figures0:
            monitor.round_done(0, figures0)
            result.initial_eval = figures0
    for rnd in range(prep.start_round, fed.rounds + 1):
        t0 = time.perf_counter()
        monitor.round_started(rnd)
        # min_available gates the start; later rounds go on with whoever is left, as long as that can reach
        # min_clients (Flower drops a hard-killed node from the list only ~60 s later, so it may still be
        # sampled once more: its missing reply is then a recorded failure, not a stall)
        need = rb.min_available if rnd == prep.start_round else rb.min_clients
        nodes = wait_for_nodes(grid, need, rb.wait_nodes_s)
        new = [n for n in nodes if n not in known]
        failed: list[dict] = []
        if new:
            ident_failures: list[dict] = []
            known.update(identify(grid, new, train_config(fed, prep, rnd), min(rb.round_timeout_s, 60.0),
                                  monitor, ident_failures, max_rank=1024))
            failed += [{"round": rnd, **f} for f in ident_failures]
        nodes = [n for n in nodes if n in known]
        offered = [ClientInfo(known[n]["client"], n, known[n]["partition_id"], known[n]["rank"],
                              dict(known[n]["figures"]), known[n].get("rounds_trained", 0)) for n in nodes]
        count = min(len(nodes), max(rb.min_available, int(round(rb.fraction * len(nodes)))))
        sample = [c.node for c in strategy.select(rnd, offered, count)]
        if not sample:
            say(f"round {rnd}: no client meets strategy.selection ({len(offered)} offered)", highlight=False)
        config = train_config(fed, prep, rnd)
        messages, sent, sent_rank = [], {}, {}
        for n in sample:
            sent_rank[n] = min(known[n]["rank"], max_rank)
            # this client's uplink codec: compression.per_client, the slow-client rule, else compression.up
            own = {**config, "codec_up": fed.compression.uplink(known[n]["client"], known[n]["figures"])}
            content = _payload(tensors, sent_rank[n], fed.compression.down, own)
            sent[n] = content_bytes(content)
            monitor.sent(known[n]["client"], sent[n])
            messages.append(_message(content, n, "TRAIN"))
        replies = list(grid.send_and_receive(messages, timeout=rb.round_timeout_s))

        updates, metrics, up_bytes = [], [], 0
        answered, silent = set(), set()
        shapes = {r: expected_shapes(tensors, r) for r in set(sent_rank.values())}
        for reply in replies:
            # one guard per reply: whatever is wrong with it is a recorded failure of that client
            who = "unknown"
            try:
                n = reply.metadata.src_node_id
                if n not in sent or n in answered:
                    who = known[n]["client"] if n in known else f"node-{n}"
                    raise ValueError("a reply nobody asked for (node not sampled this round, or a second reply)")
                answered.add(n)
                who = known[n]["client"]
                if reply.has_error():
                    failed.append({"round": rnd, "client": who, "reason": f"error: {short_reason(reply.error.reason)}"})
                    continue
                try:
                    nbytes = content_bytes(reply.content)
                except Exception:  # counted as 0 bytes; the reply is judged below
                    nbytes = 0
                up_bytes += nbytes
                try:
                    update, m = read_update(reply, who, sent_rank[n], shapes[sent_rank[n]])
                except Exception:
                    monitor.reply(rnd, who, nbytes, {"bytes_up": float(nbytes), "bytes_down": float(sent[n])})
                    raise
                m["bytes_up"], m["bytes_down"] = float(nbytes), float(sent[n])
                monitor.reply(rnd, who, nbytes, m)
                known[n]["figures"].update({k: m[k] for k in TRAIN_FIGURES if k in m and m[k] >= 0})
                known[n]["rounds_trained"] = known[n].get("rounds_trained", 0) + 1
                updates.append(update)
                metrics.append(m)
            except Exception as exc:
                failed.append({"round": rnd, "client": who, "reason": f"bad reply: {short_reason(exc)}",
                               "rejected": True})
        for n in sample:
            if n not in answered:
                silent.add(n)
                monitor.unanswered(known[n]["client"], sent[n])
                failed.append({"round": rnd, "client": known[n]["client"],
                               "reason": f"no reply within {rb.round_timeout_s:g} s (node gone or too slow)"})
        ok, rejected = screen(updates, tensors, st.norm_factor, reference_norm=prev_norm)
        failed += [{"round": rnd, "client": r.client, "reason": r.reason, "rejected": True} for r in rejected]
        for f in failed:
            monitor.failure(rnd, f["client"], f["reason"], rejected=f.get("rejected", False))
        weights = update_weights(ok, st.weighting, st.max_examples, st.max_weight_ratio)
        if len(ok) >= rb.min_clients:
            before, tensors = tensors, strategy.aggregate_train(rnd, tensors, ok, weights)
            prev_norm = update_norm({k: tensors[k] - before[k] for k in tensors})
            status = "aggregated"
        else:
            status = f"kept the global adapter: {len(ok)} accepted updates < min_clients={rb.min_clients}"
            say(f"round {rnd}: {status}", highlight=False)
        path = save_global(prep.fed_dir / "global", rnd, tensors, {"federation": fed.federation, "rank": max_rank})
        weight_of = {id(u): w for u, w in zip(ok, weights)}
        accepted = [(m, u) for m, u in zip(metrics, updates) if id(u) in weight_of]
        ok_pairs = [(m, weight_of[id(u)]) for m, u in accepted]
        agg = sum_metrics([m for m, _ in ok_pairs], [w for _, w in ok_pairs]) if ok_pairs else {}
        figures = {"round_seconds": time.perf_counter() - t0, "bytes_down": float(sum(sent.values())),
                   "bytes_up": float(up_bytes), "clients_sampled": float(len(sample)),
                   "clients_replied": float(len(updates)), "clients_accepted": float(len(ok)),
                   "clients_rejected": float(len(rejected)), "clients_failed": float(len(failed)),
                   **{f"train_{k}" if not k.startswith("train_") else k: v for k, v in agg.items()
                      if k in ("train_loss", "train_seconds", "peak_rss_bytes", "tokens_per_second")}}
        figures |= central_figures(prep, tensors)
        loss = figures.get("central_eval_loss")
        # federated eval: each client evaluates the global it receives (the previous round's adapter) on its
        # own eval data before training; weighted by the examples it read
        evals = [EvalReply(u.client, m.get("eval_examples_before", m["num_examples"]), m["eval_loss_before"],
                           m.get("eval_accuracy_before")) for m, u in accepted if "eval_loss_before" in m]
        fed_eval = aggregate_evals(strategy, rnd - 1, evals, st)
        if fed_eval:
            monitor.round_done(rnd - 1, fed_eval)
            if result.rounds and result.rounds[-1]["round"] == rnd - 1:
                result.rounds[-1].update(fed_eval)
            else:
                result.initial_eval.update(fed_eval)
        monitor.round_done(rnd, figures)
        result.rounds.append({"round": rnd, "status": status, **figures, "failures": failed,
                              "sampled": [known[n]["client"] for n in sample]})
        result.failures += failed
        result.global_path = str(path)
        say(f"round {rnd}/{fed.rounds}: {len(ok)}/{len(sample)} updates averaged, "
            f"{figures['bytes_down'] / 1e3:.1f} kB down, {figures['bytes_up'] / 1e3:.1f} kB up, "
            f"{figures['round_seconds']:.1f} s" + (f", central eval loss {loss:.4f}, token accuracy "
                                                   f"{figures['central_eval_accuracy']:.4f}" if loss is not None else ""),
            highlight=False)
    # the final eval goes to every known node but those silent in the last round (a dead one would only cost a
    # timeout); nodes the strategy did not select then are alive and evaluate too
    last = {n: v for n, v in known.items() if n not in silent}
    result.final_eval = federated_eval(grid, fed, prep, tensors, last, monitor, strategy)
    if result.rounds and result.rounds[-1]["round"] == fed.rounds:  # the final eval is the last round's
        result.rounds[-1].update({k: v for k, v in result.final_eval.items() if k.startswith("federated_eval_")})
    result.clients = known
    prep.global_tensors = tensors
    return result


def aggregate_evals(strategy: Any, rnd: int, evals: list[EvalReply], st: Any) -> dict[str, float]:
    """``federated_eval_<key>`` figures of round ``rnd`` from clients' eval replies, their self-reported
    example counts capped as train weights are (``strategy.weighting``, ``max_examples``, ``max_weight_ratio``)."""
    if not evals:
        return {}
    for e, w in zip(evals, capped_weights([e.examples for e in evals], st.weighting, st.max_examples,
                                          st.max_weight_ratio)):
        e.examples = w
    return {f"federated_eval_{k}": v for k, v in strategy.aggregate_evaluate(rnd, evals).items()}


def federated_eval(grid: Any, fed: FedConfig, prep: Prepared, tensors: dict[str, np.ndarray],
                   known: dict[int, dict], monitor: Any, strategy: Any = None) -> dict:
    """The final global adapter on each connected client's own eval data, aggregated by the strategy (default:
    weighted by the examples each read)."""
    nodes = [n for n in grid.get_node_ids() if n in known]
    config = train_config(fed, prep, fed.rounds)
    messages, sent = [], {}
    for n in nodes:
        content = _payload(tensors, known[n]["rank"], fed.compression.down, config)
        sent[n] = content_bytes(content)
        monitor.sent(known[n]["client"], sent[n])
        messages.append(_message(content, n, "EVALUATE"))
    evals, seen, bad = [], set(), []
    replies = list(grid.send_and_receive(messages, timeout=fed.robustness.round_timeout_s))
    for n in set(nodes) - {r.metadata.src_node_id for r in replies}:
        monitor.unanswered(known[n]["client"], sent[n])
    for reply in replies:
        try:  # one guard per reply, as in the rounds: a bad one is left out of the mean
            n = reply.metadata.src_node_id
            if n not in sent or n in seen or reply.has_error():
                continue
            seen.add(n)
            m = reply_metrics(reply.content, ("num_examples",), numeric=("eval_loss", "eval_accuracy"))
            monitor.reply(fed.rounds, known[n]["client"], content_bytes(reply.content), m, kind="evaluate")
            examples = m.get("eval_examples", m["num_examples"])
            if "eval_loss" in m and examples > 0:
                evals.append(EvalReply(known[n]["client"], examples, m["eval_loss"], m.get("eval_accuracy")))
        except Exception as exc:
            who = known.get(getattr(reply.metadata, "src_node_id", None), {}).get("client", "unknown")
            bad.append({"client": who, "reason": f"bad eval reply: {short_reason(exc)}", "rejected": True})
            monitor.failure(fed.rounds, who, bad[-1]["reason"], rejected=True)
    out: dict[str, Any] = {"clients": len(evals)}
    if bad:
        out["failures"] = bad
    figures = aggregate_evals(strategy or make_strategy(fed.strategy), fed.rounds, evals, fed.strategy)
    if figures:
        out.update(figures)
        monitor.round_done(fed.rounds, figures)
    return out


def run_federation(grid: Any, fed: FedConfig, console: Any = None, prep: Prepared | None = None) -> FedResult:
    """prepare → rounds → close the tracking, for one ServerApp run (simulation or deployment)."""
    from lowres.federated.monitor import FedMonitor

    prep = prep or prepare(fed)
    t = fed.tracking
    monitor = FedMonitor(fed.federation, mlflow=t.mlflow, tracking_uri=t.mlflow_uri, experiment=t.experiment,
                         prometheus_port=t.prometheus_port, offline_after_s=t.offline_after_s,
                         params=fed.model_dump(mode="json"), console=console, heartbeat_s=t.heartbeat_s,
                         crashed_after_s=t.crashed_after_s, stalled_after_s=t.stalled_after_s)
    from lowres.federated.index import announcer

    beacon, status = None, "FAILED"
    try:
        beacon = announcer(fed, monitor.run_id, console)  # the index entry on the lab's MLflow (index.announce)
        result = run_rounds(grid, fed, prep, monitor, console)
        monitor.flush()  # the writer thread creates the clients' runs: all of them, before they are listed
        result.run_id, result.children = monitor.run_id, dict(monitor.children)
        status = "FINISHED"
        return result
    finally:
        monitor.close(status, step=fed.rounds)
        if beacon is not None:
            beacon.close(status)
        if prep.central is not None:
            prep.central.cleanup()
