"""What a federated client does with a round, as plain functions: the Flower handlers only unpack and pack.

    state = client_state(cfg, key, tokenizer_dir)           # cached across rounds (module level)
    parts, metrics = train_round(state, global_parts, local_steps=5, codec_up="topk10+int8", fedprox_mu=0.01)
    metrics = evaluate_global(state, global_parts)

The base model is loaded once per process and configuration: a Flower deployment may hand each message to
a fresh process (then the cache is empty and the model loads again — unavoidable), while the simulation's
actors and a long-lived ``flower-supernode --isolation subprocess`` keep it.

FedProx (Li et al. 2020) is a client-side hook rather than a change to the recipe's loss: the proximal
term μ/2‖w − w_global‖² has gradient μ(w − w_global), added to each LoRA parameter's gradient by a tensor
hook — the same update as putting the term in the loss, with the recipe's loop untouched. The hook fires
once per micro-batch, so it adds μ/grad_accum each time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowres.config import RunConfig
from lowres.federated.compression import QAT_KINDS, ErrorFeedback, decode, encode, parse_codec
from lowres.federated.strategy import truncate_to_rank
from lowres.train.recipe import Recipe


class FedRecipe(Recipe):
    """The train recipe with the federation's shared tokenizer.

    Random-init presets train their tokenizer on the run's data; clients holding different partitions would
    each train a different one and their token ids would mean different things. The server trains one on the
    federation's data and clients read it from ``tokenizer_dir``. Pretrained models bring their own."""

    # A simulated client's state is cached per worker process, and Ray may hand the same client to another
    # worker in a later round: both then hold a recipe on the client's folder. The server's round loop, not a
    # folder lock, keeps one client's rounds apart.
    owns_output_dir = False

    def __init__(self, cfg: RunConfig, tokenizer_dir: str | None, **kw: Any):
        super().__init__(cfg, **kw)
        self.tokenizer_dir = tokenizer_dir

    def _tokenizer(self, records, resume_from):
        if self.tokenizer_dir and not self.loc.pretrained:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.tokenizer_dir), "federation-shared"
        return super()._tokenizer(records, resume_from)


@dataclass
class ClientState:
    """One client's loaded recipe and what it keeps between rounds."""

    key: str
    recipe: Recipe
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)
    mu: float = 0.0
    hooks: list = field(default_factory=list)
    rounds: int = 0


_CACHE: dict[tuple[str, str], ClientState] = {}


def client_state(cfg: RunConfig, key: str, tokenizer_dir: str | None) -> ClientState:
    """The cached state of client ``key`` under ``cfg`` (loaded on first use: data, model, optimizer)."""
    cache_key = (key, cfg.config_hash() + str(cfg.data.path) + str(tokenizer_dir))
    state = _CACHE.get(cache_key)
    if state is None:
        recipe = FedRecipe(cfg, tokenizer_dir, progress=False).setup()
        state = _CACHE[cache_key] = ClientState(key, recipe)
    return state


def clear_cache() -> None:
    """Drop every cached client (tests; a process that changes federation)."""
    for state in _CACHE.values():
        state.recipe.cleanup()
    _CACHE.clear()


def lora_tensors(model: Any) -> dict[str, np.ndarray]:
    """The model's LoRA weights as float32 numpy (peft names without the adapter name)."""
    from peft import get_peft_model_state_dict

    from lowres.federated.wire import state_to_numpy

    return state_to_numpy(get_peft_model_state_dict(model))


def load_global(state: ClientState, global_parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decode the server's weights, cut them to this client's rank, put them in the model; return them."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from lowres.federated.wire import numpy_to_state

    rank = state.recipe.cfg.lora.rank
    received = truncate_to_rank(decode(global_parts), rank)
    own = get_peft_model_state_dict(state.recipe.model)
    if set(received) != set(own):
        missing = sorted(set(own) - set(received))[:2]
        raise ValueError(f"the global adapter does not fit this client's model (missing {missing}): "
                         "do server and clients use the same lora.targets and model?")
    for n, x in received.items():
        if tuple(own[n].shape) != x.shape:
            raise ValueError(f"{n}: global {x.shape} vs local {tuple(own[n].shape)} at rank {rank}")
    set_peft_model_state_dict(state.recipe.model, numpy_to_state(received, own))
    return received


def _set_fedprox(state: ClientState, mu: float) -> None:
    """(Re)arm the proximal-gradient hooks around this round's global weights."""
    for h in state.hooks:
        h.remove()
    state.hooks, state.mu = [], mu
    if mu <= 0:
        return
    accum = state.recipe.cfg.train.grad_accum
    for name, p in state.recipe.model.named_parameters():
        if p.requires_grad:
            anchor = p.detach().clone()

            def hook(grad, p=p, anchor=anchor):
                # d/dw μ/2‖w − w0‖² = μ(w − w0), split over the step's micro-batches
                return grad + (mu / accum) * (p.detach() - anchor).to(grad.dtype)

            state.hooks.append(p.register_hook(hook))


def train_round(state: ClientState, global_parts: dict[str, np.ndarray], local_steps: int, codec_up: str,
                error_feedback: bool = False, fedprox_mu: float = 0.0,
                profile_interval: float = 0.5, qat: bool = False) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Load the global adapter, train ``local_steps``, return (encoded update, metrics). ``qat``: train through
    the uplink codec's rounding when it is int8/int8t/int4 (``lowres.federated.qat``; other codecs: ignored).

    metrics: num_examples (train blocks, the FedAvg weight), rank, steps, train_loss, train_seconds,
    tokens_per_second, peak_rss_bytes / cpu figures from the profiler, free_memory_bytes after the round, and
    eval_loss_before / eval_accuracy_before / eval_examples_before (the received global on this client's eval
    blocks — the federated eval of the previous round — when it has any)."""
    from profiler import Profiler

    r = state.recipe
    received = load_global(state, global_parts)
    before = _eval(r)
    _set_fedprox(state, fedprox_mu)
    codec = parse_codec(codec_up)
    fake = None
    if qat and codec.kind in QAT_KINDS:
        from lowres.federated.qat import start_qat

        fake = start_qat(r.model, codec)  # anchored at the global weights just loaded
    t0, step0 = time.perf_counter(), r.step
    try:
        with Profiler(interval=profile_interval, mode="thread") as prof:
            result = r.train(steps=local_steps)
    finally:
        if fake is not None:
            fake.finish()  # the model keeps global + Q(Δ): the update below is a fixed point of the codec
    seconds = time.perf_counter() - t0
    delta = {n: x - received[n] for n, x in lora_tensors(r.model).items()}
    parts = state.feedback.encode(delta, codec) if (error_feedback and codec.lossy) else encode(delta, codec)
    state.rounds += 1
    metrics = {"num_examples": float(len(r.data.train)), "rank": float(r.cfg.lora.rank), "qat": float(fake is not None),
               "steps": float(r.step - step0), "train_seconds": seconds,
               **_profile_figures(prof.summary.to_dict())}
    free = free_memory_bytes()
    if free is not None:
        metrics["free_memory_bytes"] = float(free)
    if result.loss is not None:
        metrics["train_loss"] = float(result.loss)
    if result.tokens_per_s:
        metrics["tokens_per_second"] = float(result.tokens_per_s)
    if before is not None:
        metrics |= {"eval_loss_before": before["loss"], "eval_accuracy_before": before["accuracy"],
                    "eval_examples_before": float(before["examples"])}
    return parts, metrics


def evaluate_global(state: ClientState, global_parts: dict[str, np.ndarray]) -> dict[str, float]:
    """Federated evaluation: the global adapter on this client's eval blocks — eval_loss, eval_accuracy (top-1
    next-token), eval_examples (blocks read: the weight), num_examples (eval blocks held)."""
    load_global(state, global_parts)
    res = _eval(state.recipe)
    out = {"num_examples": float(len(state.recipe.data.eval))}
    if res is not None:
        out |= {"eval_loss": res["loss"], "eval_accuracy": res["accuracy"], "eval_examples": float(res["examples"])}
    return out


def _eval(r: Recipe) -> dict | None:
    from lowres.train.evaluation import evaluate

    cfg = r.cfg
    res = evaluate(r.model, r.data.eval, cfg.train.batch_size, cfg.train.loss_chunk_tokens, cfg.train.eval_batches,
                   r.precision, r.device, accuracy=True)
    return None if res is None else {"loss": float(res["loss"]), "accuracy": float(res["accuracy"]),
                                     "examples": res["examples"]}


def free_memory_bytes() -> int | None:
    """Memory this client can still use: the system's available memory, or less under a cgroup limit."""
    try:
        import psutil

        from lowres.hardware.cgroup import read_cgroup

        free = int(psutil.virtual_memory().available)
        cg = read_cgroup()
        if cg.memory_limit_bytes is not None and cg.memory_usage_bytes is not None:
            free = min(free, max(0, cg.memory_limit_bytes - cg.memory_usage_bytes))
        return free
    except Exception:  # a figure for the selection, never a reason to fail a round
        return None


def identity_figures(cfg: RunConfig) -> dict[str, float]:
    """What a client tells the server before its first round, for the selection: free_memory_bytes and
    num_records (its training records: a read of its data, no model loaded)."""
    out: dict[str, float] = {}
    free = free_memory_bytes()
    if free is not None:
        out["free_memory_bytes"] = float(free)
    try:
        from lowres.data.reading import read_records

        out["num_records"] = float(len(read_records(cfg.data)))
    except Exception:  # unreadable data fails the first train round, with its own error
        pass
    return out


def _profile_figures(summary: dict) -> dict[str, float]:
    """The few profiler figures a round reports: peak RSS, CPU seconds and mean utilisation."""
    out = {}
    metrics = summary.get("metrics", summary)
    for key, name, stat in (("peak_rss_bytes", "lowres_process_resident_memory_peak_bytes", "max"),
                            ("cpu_utilization_ratio", "lowres_process_cpu_utilization_ratio", "mean")):
        entry = metrics.get(name) if isinstance(metrics, dict) else None
        if isinstance(entry, dict) and entry.get(stat) is not None:
            out[key] = float(entry[stat])
    return out


def shared_tokenizer(records: list[dict], cfg: RunConfig, folder: str | Path) -> str | None:
    """Train (once) and save the federation's tokenizer for a random-init preset; None for pretrained ones."""
    from lowres.data import render_texts
    from lowres.models import load_tokenizer, locate_weights

    loc = locate_weights(cfg.model)
    if loc.pretrained:
        return None
    d = Path(folder)
    if not (d / "tokenizer_config.json").is_file() and not (d / "tokenizer.json").is_file():
        tok, _ = load_tokenizer(loc, render_texts(records, cfg.data, None), cfg.data.tokenizer_vocab)
        tok.save_pretrained(str(d))
    return str(d)
