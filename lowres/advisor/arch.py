"""A model's architecture as the estimator needs it, read from the model itself: built on the meta device
from its config (``with torch.device("meta"): AutoModelForCausalLM.from_config(cfg)`` — nothing allocated),
for any decoder-only causal LM transformers can build (Llama, Qwen2, Gemma 3, Mistral, Phi, StableLM,
GPT-NeoX, OPT, GPT-2, ...).

* ``arch_of(spec)``: parameter groups (block linears, embeddings + an untied head + positional embeddings,
  norms and biases), every decoder layer's linears ``(name, in, out)``, the attention implementation, and
  "unmodelled" notes for what the estimator does not model in this family.
* ``activation_trace(spec, compute, rank, targets, seq_len)``: bytes autograd saves for backward, per token,
  found by running the decoder with LoRA (peft, as lowres trains it) forward on the meta device under
  ``torch.autograd.graph.saved_tensors_hooks`` at 1 and 2 layers. Whatever the family does — head_dim
  not hidden/heads, GQA/MQA, gated or plain MLPs, LayerNorm or RMSNorm, q/k norms, partial rotary, eager
  attention's s² scores, a sliding-window mask — is in the saved tensors. The one substitution: on the meta
  device SDPA has no fused kernel, so a stand-in saves what the CPU/CUDA flash kernels save (q, k, v, the
  output, a fp32 logsumexp per head and row, the mask if any), not the math path's s² probabilities.

Both are cached per config (``functools.lru_cache``): an advice grid asks for a handful of keys.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class Arch:
    """What the meta-device model says. ``layers``: per decoder layer, its linears (name inside the layer,
    in_features, out_features), in order; ``params``: linear (block linears' weights — what bitsandbytes
    quantizes), embeddings (input, untied output head, positional), norms (norm weights, biases, the rest)."""

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    layers: tuple[tuple[tuple[str, int, int], ...], ...]
    params: dict[str, int]
    tied_head: bool
    attn_implementation: str
    norms: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Layer 0's linears by short name (``q_proj`` → ``q``, ``mlp.fc1`` → ``fc1``; the full name
        inside the layer where two short names collide)."""
        short = [n.rsplit(".", 1)[-1].removesuffix("_proj") for n, _, _ in self.layers[0]]
        clash = {s for s in short if short.count(s) > 1}
        return {(n if s in clash else s): (i, o) for s, (n, i, o) in zip(short, self.layers[0])}


def config_dict(spec: Any) -> dict:
    """The transformers config of ``spec`` as a plain dict (``model_type`` included)."""
    raw = getattr(spec, "hf_config", None)
    if raw:
        return dict(raw)
    return spec.to_hf_config().to_dict()


def _key(spec: Any) -> str:
    return json.dumps(config_dict(spec), sort_keys=True, default=str)


def _build_config(key: str, layers: int | None = None):
    from transformers import AutoConfig

    d = json.loads(key)
    model_type = d.pop("model_type")
    for k in ("architectures", "auto_map", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        d.pop(k, None)
    cfg = AutoConfig.for_model(model_type, **d)
    if layers is not None:
        cfg.num_hidden_layers = layers
        for name in ("layer_types", "sliding_window_pattern_list"):
            value = getattr(cfg, name, None)
            if isinstance(value, list) and len(value) > layers:
                setattr(cfg, name, value[:layers])
    cfg.use_cache = False
    return cfg


def _meta_model(key: str, layers: int | None = None, dtype: Any = None):
    import torch
    from transformers import AutoModelForCausalLM

    from lowres.errors import ModelError

    cfg = _build_config(key, layers)
    try:
        with torch.device("meta"), _quiet():
            return AutoModelForCausalLM.from_config(cfg, **({"dtype": dtype} if dtype is not None else {}))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"transformers cannot build a causal LM from this config ({cfg.model_type}): "
                         f"{str(exc).splitlines()[0][:200]}",
                         hint="lowres needs a decoder-only causal LM that AutoModelForCausalLM knows") from None


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _is_linear(mod: Any) -> bool:
    import torch

    if isinstance(mod, torch.nn.Linear):
        return True
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")  # GPT-2's transposed linear


def _in_out(mod: Any) -> tuple[int, int]:
    if hasattr(mod, "in_features"):
        return int(mod.in_features), int(mod.out_features)
    return int(mod.weight.shape[0]), int(mod.weight.shape[1])  # Conv1D: weight is (in, out)


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder layers: the longest ModuleList under the decoder."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    lists = [m for m in decoder.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else []


@lru_cache(maxsize=64)
def _arch(key: str) -> Arch:
    model = _meta_model(key)
    cfg = model.config
    layers = decoder_layers(model)
    head = model.get_output_embeddings()
    groups = {"linear": 0, "embeddings": 0, "norms": 0}
    seen: set[int] = set()
    layer_ids = {id(m) for layer in layers for m in layer.modules()}
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if mod is head:
                groups["embeddings"] += n   # an untied output head (a tied one was seen as the embedding)
            elif "Embedding" in type(mod).__name__:  # nn.Embedding, Gemma's scaled one, learned positions
                groups["embeddings"] += n
            elif _is_linear(mod) and pname == "weight" and id(mod) in layer_ids:
                groups["linear"] += n
            else:
                groups["norms"] += n        # norm weights, biases, anything else small
    per_layer = tuple(tuple((name, *_in_out(m)) for name, m in layer.named_modules() if _is_linear(m))
                      for layer in layers)
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    norms = tuple(sorted({type(m).__name__ for m in layers[0].modules() if "Norm" in type(m).__name__}))
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    notes = _notes(model, cfg, per_layer, head, impl)
    return Arch(model_type=cfg.model_type, num_layers=len(layers), hidden_size=int(cfg.hidden_size),
                vocab_size=int(cfg.vocab_size), layers=per_layer, params=groups, tied_head=tied,
                attn_implementation=impl, norms=norms, notes=notes)


def _notes(model: Any, cfg: Any, per_layer: tuple, head: Any, impl: str) -> tuple[str, ...]:
    """What the estimator does not model for this family, said rather than ignored."""
    import torch

    out = []
    if len(set(per_layer)) > 1:
        out.append("decoder layers differ in their linears: weights and FLOPs are summed layer by layer, "
                   "activations averaged over the first two layers")
    if any(getattr(cfg, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        out.append("mixture of experts: every expert's weights are counted, FLOPs as if each token used all "
                   "experts (routing is not modelled)")
    window = getattr(cfg, "sliding_window", None)
    if window:
        out.append(f"sliding-window attention ({window} tokens): attention FLOPs are counted over the full "
                   "causal length; past the window the mask is materialised (its bytes are modelled)")
    if getattr(cfg, "final_logit_softcapping", None):
        out.append("final logit soft-capping: lowres' chunked loss leaves it out (memory unchanged; loss values "
                   "differ from the family's own forward)")
    if head is not None and type(head) is not torch.nn.Linear:
        out.append(f"output head is a {type(head).__name__}, not a plain Linear: the loss runs on the whole "
                   "batch's logits (no chunks)")
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        out.append("Conv1D linears (GPT-2 style): bitsandbytes does not quantize them — quantized weight bytes "
                   "are those of nn.Linear layers only")
    if impl == "eager":
        out.append("eager attention: its s² scores per head are saved for backward (modelled) and its FLOPs "
                   "counted as SDPA's")
    return tuple(out)


def arch_of(spec: Any) -> Arch:
    """The architecture of ``spec`` (a ModelSpec), from its meta-device model; cached."""
    return _arch(_key(spec))


# --------------------------------------------------------------------------------------------- LoRA targets
def peft_targets(targets: Any) -> list[str] | str:
    """What lowres passes peft as ``target_modules`` for a Candidate's ``lora_targets``."""
    from lowres.models.loading import lora_target_modules

    if isinstance(targets, str):
        return lora_target_modules(targets)
    return [t if "_" in t or "." in t else f"{t}_proj" for t in targets]


def targeted(arch: Arch, targets: Any) -> list[list[tuple[str, int, int]]]:
    """Per layer, the linears peft wraps for ``targets``: module names matched by suffix, as peft does
    (``name == t`` or ``name.endswith('.' + t)``); "all-linear" is every linear of the layer."""
    from lowres.errors import ModelError

    names = peft_targets(targets)
    out = []
    for layer in arch.layers:
        if names == "all-linear":
            out.append(list(layer))
        else:
            out.append([lin for lin in layer if any(lin[0] == t or lin[0].endswith("." + t) for t in names)])
    if not any(out):
        have = ", ".join(n for n, _, _ in arch.layers[0])
        raise ModelError(f"LoRA targets {targets!r} match no linear of this {arch.model_type} model (its layers "
                         f"have {have})", hint="use --targets all_linear (lora.targets=all_linear) or name "
                         "its modules")
    return out


def target_notes(arch: Arch, targets: Any) -> list[str]:
    """A line when ``targets`` match only some of a layer's linears (e.g. attention_mlp on Phi)."""
    hit = targeted(arch, targets)[0]
    if len(hit) == len(arch.layers[0]) or targets in ("attention", ["q_proj", "k_proj", "v_proj", "o_proj"]):
        return []
    return [f"LoRA targets {targets!r} match only {', '.join(n for n, _, _ in hit)} of this "
            f"{arch.model_type} layer's linears; all_linear adapts all of them"]


# --------------------------------------------------------------------------------------- activation trace
class _FlashSDPA:
    """A stand-in for ``torch.nn.functional.scaled_dot_product_attention`` on the meta device that saves
    what the flash kernels save for backward (q, k, v, output, fp32 logsumexp; the mask when given) and
    returns its output laid out as the CPU flash kernel does ((b, s, h, d) memory, seen as (b, h, s, d))."""

    @staticmethod
    def make():
        import torch

        def seq_major(q) -> bool:
            """The CPU kernels return the output in the memory layout of the query: (b, s, h, d) when q is a
            transposed view of a projection (Llama's rotary keeps that layout), (b, h, s, d) when q was
            rebuilt (a partial rotary's cat) — then transformers' transpose(1, 2).contiguous() copies it."""
            return q.shape[1] > 1 and q.transpose(1, 2).is_contiguous()

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, mask, kw):
                b, h, s, _ = q.shape
                if seq_major(q):
                    out = torch.empty(b, s, h, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
                else:
                    out = torch.empty(b, h, s, v.shape[-1], dtype=q.dtype, device=q.device)
                lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
                ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
                return out

            @staticmethod
            def backward(ctx, grad):  # pragma: no cover - the trace never runs backward
                raise RuntimeError("trace only")

        def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
            opts = {"is_causal": bool(is_causal and attn_mask is None), **({"enable_gqa": True} if enable_gqa else {})}
            return Fn.apply(q, k, v, attn_mask, opts)

        return sdpa


@contextlib.contextmanager
def _trace_patches():
    import torch
    import transformers.masking_utils as mu

    orig_sdpa = torch.nn.functional.scaled_dot_product_attention
    orig_packed = getattr(mu, "find_packed_sequence_indices", None)
    torch.nn.functional.scaled_dot_product_attention = _FlashSDPA.make()
    if orig_packed is not None:  # it reads values (.all()), which meta tensors do not have; lowres packs
        mu.find_packed_sequence_indices = lambda *a, **k: None  # without position resets
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig_sdpa
        if orig_packed is not None:
            mu.find_packed_sequence_indices = orig_packed


@lru_cache(maxsize=256)
def _saved_bytes(key: str, layers: int, compute: str, rank: int, targets: str, seq_len: int,
                 fused: bool = True, attention: str = "sdpa", fused_norm: bool = False) -> tuple[float, int]:
    """(bytes autograd saves — parameters and buffers excluded, each storage once —, autograd nodes) in one
    forward of the ``layers``-layer decoder with LoRA over a frozen base, batch 1 × ``seq_len``, meta device;
    ``fused``: the LoRA linears as the recipe runs them with ``train.fused_lora`` (lowres.train.speed);
    ``attention``: the kernel as resolved (lowres.train.attention's bmm runs itself on the meta device and
    saves its s² probabilities; sdpa and eager as above); ``fused_norm``: the RMSNorms as the recipe runs
    them with ``train.fused_norm`` (lowres.train.norms)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lowres.models.precision import torch_dtype

    dtype = torch_dtype(compute)
    model = _meta_model(key, layers, dtype)
    if attention != "sdpa":
        from lowres.train.speed import set_attention

        set_attention(model, attention)
    for p in model.parameters():
        p.requires_grad_(False)
    names = json.loads(targets)
    with _quiet():
        model = get_peft_model(model, LoraConfig(r=rank, target_modules=names, lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"))
    if fused:
        from lowres.train.speed import fuse_lora

        fuse_lora(model)
    if fused_norm:
        from lowres.train.norms import fuse_norms

        fuse_norms(model)
    model.train()
    fixed = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in fixed:
            seen[st._cdata] = max(seen.get(st._cdata, 0), st.nbytes())
        return t

    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    decoder = model.get_base_model().get_decoder()
    with _trace_patches(), _quiet(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = decoder(input_ids=ids).last_hidden_state
    return float(sum(seen.values())), _count_nodes(out.grad_fn)


def _count_nodes(fn: Any) -> int:
    """Autograd nodes reachable from ``fn``: the ops backward runs (each had a forward op too)."""
    seen, stack = set(), [fn]
    while stack:
        f = stack.pop()
        if f is None or id(f) in seen:
            continue
        seen.add(id(f))
        stack.extend(nxt for nxt, _ in getattr(f, "next_functions", ()))
    return len(seen)


def activation_trace(spec: Any, compute: str, rank: int, targets: Any, seq_len: int,
                     fused: bool = True, attention: str = "sdpa", fused_norm: bool = False) -> tuple[float, float]:
    """(first layer + everything outside the layers, each further layer), bytes saved per token.

    The first layer is traced apart because its input (the frozen embedding's output) needs no gradient,
    so its first norm saves nothing; a whole model of L layers saves ``first + (L - 1) · per_layer``."""
    key = _key(spec)
    names = peft_targets(targets)
    tkey = json.dumps(names)
    one = _saved_bytes(key, 1, compute, rank, tkey, seq_len, fused, attention, fused_norm)[0]
    arch = _arch(key)
    two = (_saved_bytes(key, 2, compute, rank, tkey, seq_len, fused, attention, fused_norm)[0]
           if arch.num_layers > 1 else 2 * one)
    return one / seq_len, max(0.0, two - one) / seq_len


def graph_ops(spec: Any, compute: str, rank: int, targets: Any, seq_len: int, fused: bool = True,
              attention: str = "sdpa", fused_norm: bool = False) -> int:
    """Autograd nodes of one forward of the whole decoder (first layer + (L - 1) more), from the same trace:
    the number of ops whose fixed dispatch cost a step pays twice (forward and backward), whatever the
    tensor sizes."""
    key = _key(spec)
    tkey = json.dumps(peft_targets(targets))
    one = _saved_bytes(key, 1, compute, rank, tkey, seq_len, fused, attention, fused_norm)[1]
    arch = _arch(key)
    two = (_saved_bytes(key, 2, compute, rank, tkey, seq_len, fused, attention, fused_norm)[1]
           if arch.num_layers > 1 else 2 * one)
    return one + (arch.num_layers - 1) * max(0, two - one)
