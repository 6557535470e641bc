"""Memory terms of a LoRA/QLoRA fine-tuning step, one function per term, each with its formula and source.

Shapes are those of a Llama-style decoder (Llama, Qwen2, SmolLM2, TinyLlama): per layer the projections
q, k, v, o (grouped-query attention: k and v have ``num_kv_heads * head_dim`` outputs) and a SwiGLU MLP
gate, up, down; RMSNorm before attention and before the MLP; an embedding and an lm_head (possibly tied).
Every function returns bytes. ``e`` is the byte width of the compute dtype (fp32 4, bf16/fp16 2).
"""

from __future__ import annotations

from typing import Any

MIB = 1024**2

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
TARGET_SETS = {
    "attention": ("q", "k", "v", "o"),
    "attention_mlp": PROJECTIONS,
    # In a Llama-style decoder every linear of a block is an attention or MLP projection; peft's
    # "all-linear" leaves out the lm_head, so the two sets coincide.
    "all_linear": PROJECTIONS,
}

# Transient-tensor peak → what the OS sees. glibc malloc keeps freed transient buffers (activations, logits,
# gradients) in its arenas, so RSS grows by more than the transient tensors alive at once. Measured here
# (EPYC, torch 2.13, tiny and SmolLM2-135M, 0.1-2.5 GB of transients): 1.6-1.9x in fp32 and ~1.4x in bf16
# (1.8x at the smallest size), where freed blocks of the many equal-sized casts are reused. These are priors until probes
# calibrate a machine (lowres.advisor.calibrate scales them). For CUDA the caching allocator's
# reserved/allocated ratio is an assumption (not measured here), also replaced by calibration.
ALLOCATOR_FACTOR = {"cpu": 1.85, "cuda": 1.10}
ALLOCATOR_FACTOR_16BIT_CPU = 1.40


def allocator_factor(device: str, e: int) -> float:
    """RSS growth per byte of transient tensors: ``ALLOCATOR_FACTOR[device]``, lower for 16-bit on CPU."""
    return ALLOCATOR_FACTOR_16BIT_CPU if device == "cpu" and e == 2 else ALLOCATOR_FACTOR[device]

# Memory the runtime holds before any model tensor. CPU: RSS of python + torch 2.13 + transformers 5.23 +
# peft 0.21 after one tiny training step, measured here at 443 MiB, rounded up. CUDA: context + cuBLAS
# workspace on the device, typically 300-500 MiB depending on driver and GPU (assumption; calibrated by probes).
RUNTIME_BASELINE_BYTES = {"cpu": 450 * MIB, "cuda": 500 * MIB}


def model_arch(spec: Any) -> Any:
    """The architecture transformers builds for ``spec`` on the meta device (lowres.advisor.arch), for a
    ModelSpec; None for a bare object of Llama-style numbers (the formulas below then apply)."""
    if not hasattr(spec, "to_hf_config"):
        return None
    from lowres.advisor.arch import arch_of

    return arch_of(spec)


def linear_shapes(spec: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear in one decoder layer (the first), read from the model
    built on the meta device for a ModelSpec of any family.

    For bare Llama-style numbers: q: h → heads·d, k and v: h → kv_heads·d (GQA, Ainslie et al. 2023),
    o: heads·d → h, gate and up: h → intermediate, down: intermediate → h (SwiGLU, Shazeer 2020).
    """
    arch = model_arch(spec)
    if arch is not None:
        return arch.linear_shapes()
    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d
    return {"q": (h, q_out), "k": (h, kv_out), "v": (h, kv_out), "o": (q_out, h),
            "gate": (h, i), "up": (h, i), "down": (i, h)}


def resolve_targets(targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """LoRA targets as projection names: a named set, or module names such as ``q_proj`` / ``down_proj``."""
    if isinstance(targets, str):
        if targets not in TARGET_SETS:
            raise ValueError(f"unknown LoRA target set {targets!r}; use one of {sorted(TARGET_SETS)}")
        return TARGET_SETS[targets]
    names = []
    for t in targets:
        name = t.rsplit(".", 1)[-1].removesuffix("_proj")
        if name not in PROJECTIONS:
            raise ValueError(f"LoRA target {t!r} is not a projection of a Llama-style layer {PROJECTIONS}")
        names.append(name)
    return tuple(p for p in PROJECTIONS if p in names)


def parameter_counts(spec: Any) -> dict[str, int]:
    """Parameters by part: block linears (quantizable), embeddings + lm_head, norms and biases.

    linears = L · Σ in·out over the projections; embeddings = V·h, plus V·h for an untied lm_head;
    norms = (2L + 1)·h (RMSNorm weights); biases = L·(heads + 2·kv_heads)·d where q/k/v carry a bias (Qwen2).
    For a ModelSpec, counted on the model itself (any family: LayerNorm biases, positional embeddings, q/k
    norms, an untied head all land in their group).
    """
    arch = model_arch(spec)
    if arch is not None:
        return dict(arch.params)
    shapes = linear_shapes(spec)
    layers = spec.num_layers
    emb = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    bias = 0
    if getattr(spec, "attention_bias", False):
        bias = layers * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    return {
        "linear": layers * sum(i * o for i, o in shapes.values()),
        "embeddings": emb,
        "norms": (2 * layers + 1) * spec.hidden_size + bias,
    }


def quantized_linear_bytes(in_features: int, out_features: int, quant: str, e: int,
                           double_quant: bool = True) -> float:
    """Bytes of one frozen linear weight in its stored format.

    none: in·out·e.
    int8 (LLM.int8, Dettmers et al. 2022; bitsandbytes Int8Params): 1 B per weight + one fp32 scale per
    output row → in·out + 4·out.
    nf4/fp4 (QLoRA, Dettmers et al. 2023, §3): 4 bits per weight, blocksize 64 with one absmax per block;
    without double quantization the absmax is fp32 (32/64 = 0.5 bit/param); with it, absmax is 8-bit plus one
    fp32 constant per 256 blocks (8/64 + 32/(64·256) = 0.127 bit/param) → n/2 + n/64 + 4·n/16384.
    """
    n = in_features * out_features
    if quant == "none":
        return float(n * e)
    if quant == "int8":
        return float(n + 4 * out_features)
    if quant in ("nf4", "fp4"):
        constants = n / 64 + 4 * n / (64 * 256) if double_quant else 4 * n / 64
        return n / 2 + constants
    raise ValueError(f"unknown quantization {quant!r}; use none, int8, nf4 or fp4")


def weight_bytes(spec: Any, e: int, quant: str, double_quant: bool = True) -> dict[str, float]:
    """Frozen base weights by part. Only the block linears are quantized: bitsandbytes replaces nn.Linear
    layers and transformers skips the lm_head (and what it is tied to), and nn.Embedding is no Linear.
    Unquantized, embeddings, lm_head, norms and biases are in the compute dtype (``e`` bytes each). On a
    quantized base, peft's ``prepare_model_for_kbit_training`` (peft 0.21, utils/other.py) casts every
    parameter that is not int8/4-bit to fp32 "for stability", so they take 4 bytes each whatever ``e`` is."""
    counts = parameter_counts(spec)
    linear = sum(quantized_linear_bytes(i, o, quant, e, double_quant)
                 for layer in _all_layers(spec) for _, i, o in layer)
    rest = e if quant == "none" else 4
    return {"weights.linear": linear,
            "weights.embeddings": float(counts["embeddings"] * rest),
            "weights.norms": float(counts["norms"] * rest)}


def quantize_load_bytes(spec: Any, e: int, quant: str) -> float:
    """The peak RSS (VmHWM) that building a quantized base adds: bitsandbytes packs each linear as the model
    loads, from a copy in the load dtype, and lowres.models builds a random-init base in full precision,
    saves it and reloads it quantized — so one full-precision copy of the block linears, L·Σ in·out·e, is
    resident at the load-time peak (and glibc keeps most of it). Zero unquantized.
    Measured here (SmolLM2-135M, random-init): int8 over fp32 peaked 420 MiB above the trained-state
    estimate, nf4 over bf16 200 MiB — its 106M linear weights × 4 B and × 2 B. Loading pretrained shards
    tensor by tensor may peak lower; probes calibrate it. The estimate counts only what of it the step's
    transient tensors do not reuse (lowres.advisor.estimate)."""
    if quant == "none":
        return 0.0
    return float(parameter_counts(spec)["linear"] * e)


def dequant_scratch_bytes(spec: Any, e: int, quant: str) -> float:
    """A quantized linear is dequantized to the compute dtype for each matmul (forward and backward), so the
    largest projection's full-precision copy is alive at a time: max(in·out)·e; zero when not quantized."""
    if quant == "none":
        return 0.0
    return float(max(i * o for i, o in linear_shapes(spec).values()) * e)


def _all_layers(spec: Any) -> list:
    """Every decoder layer's linears (name, in, out): from the model for a ModelSpec, else L × the formula."""
    arch = model_arch(spec)
    if arch is not None:
        return [list(layer) for layer in arch.layers]
    return [[(n, i, o) for n, (i, o) in linear_shapes(spec).items()]] * spec.num_layers


def lora_parameter_count(spec: Any, rank: int, targets: Any) -> int:
    """LoRA adds A (r × in) and B (out × r) to each targeted projection (Hu et al. 2021):
    L · r · Σ_targets (in + out). For a ModelSpec the targets are the linears peft matches in the model
    (``targets``: a target set name such as ``all_linear``, or projection names)."""
    arch = model_arch(spec)
    if arch is not None:
        from lowres.advisor.arch import targeted

        return rank * sum(i + o for layer in targeted(arch, targets) for _, i, o in layer)
    targets = resolve_targets(targets) if isinstance(targets, str) else targets
    shapes = linear_shapes(spec)
    return spec.num_layers * rank * sum(shapes[t][0] + shapes[t][1] for t in targets)


def lora_state_bytes(n_params: int, optimizer: str = "adamw") -> dict[str, float]:
    """Trainable LoRA state. peft keeps adapter weights in fp32 (``autocast_adapter_dtype``) even over a
    bf16 base, so: parameters 4 B, gradients 4 B, AdamW exp_avg + exp_avg_sq 2·4 B (Loshchilov & Hutter
    2019; the 16 B/param of Rajbhandari et al. 2020, ZeRO, without a second weight copy). The 8-bit
    optimizers keep both states blockwise in 1 B each (Dettmers et al. 2022, "8-bit Optimizers")."""
    state = 2.0 if optimizer in ("paged_adamw_8bit", "adamw_8bit") else 8.0
    return {"lora.params": 4.0 * n_params, "lora.grads": 4.0 * n_params, "lora.optimizer": state * n_params}


def activation_bytes_per_token_per_layer(spec: Any, e: int, rank: int, targets: tuple[str, ...],
                                         fused_lora: bool = True, attention: str = "sdpa",
                                         seq_len: int = 0, fused_norm: bool = False) -> float:
    """Bytes one decoder layer saves for backward, per token, with a frozen base and LoRA adapters.

    Adapted from Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    eq. 1 (sbh·(34 + 5as/h) bytes per layer at 2 B/element), to a Llama-style layer:
      - no dropout masks (dropout 0); RMSNorm, which upcasts to fp32 and saves that input: 2 norms · h · 4 B;
      - SDPA (flash-style, no s² scores) saves q (heads·d), k and v (kv_heads·d each: transformers passes
        GQA natively when no padding mask is given), its output (heads·d) and a fp32 logsumexp per head,
        + 8 B measured beside it (eager attention, which keeps a·s scores per token, is not modelled);
      - SwiGLU keeps gate output, SiLU output and up output: 3i·e;
      - a frozen linear needs no input for a weight gradient, so a projection's input is saved only when it
        carries LoRA (A's weight gradient needs it). In fp32 the targets sharing an input share one saved
        tensor (q/k/v the attention-norm output, gate/up the MLP-norm output; o's input is a view of the SDPA
        output, already counted). In 16-bit compute peft casts each target's input to the fp32 adapter
        dtype, so each target saves its own in·4 B copy;
      - each LoRA A output (r elements, fp32) is saved as B's input: r·4 B per target.
    With ``fused_lora`` (the recipe's default, lowres.train.speed) the layers save their input as it is, in
    the compute dtype, shared as in fp32 above, and A's output in the compute dtype: in·e per input group and
    r·e per target.
    With ``attention="bmm"`` (lowres.train.attention) the attention saves q, k, v and its probabilities —
    heads·s elements per token in one block, fewer in several (``probabilities_per_sequence``: a causal
    sequence in n query blocks keeps about (n + 1)/(2n) of them) — instead of the logsumexp (its output is
    o's saved input either way).
    With ``fused_norm`` (lowres.train.norms) each RMSNorm saves its input as it came (h·e) and one fp32
    reciprocal RMS per token.
    Checked against the tensors autograd saves (saved_tensors_hooks, torch 2.13 CPU, transformers 5.23,
    peft 0.21, SmolLM2-135M shapes, fp32/bf16, attention and attention_mlp targets): equal to within 0.1 %.
    """
    h, i, a = spec.hidden_size, spec.intermediate_size, spec.num_heads
    shapes = linear_shapes(spec)
    total = 2 * (h * e + 4.0) if fused_norm else 2 * h * 4.0   # RMSNorm inputs (fp32 unless fused)
    q_out, kv_out = shapes["q"][1], shapes["k"][1]
    if attention == "bmm":  # q, k, v, the output (o's input); the probabilities (fewer when block-causal)
        from lowres.train.attention import probabilities_per_sequence

        probs = probabilities_per_sequence(seq_len, e) / seq_len if seq_len > 0 else 0.0
        total += (2 * q_out + 2 * kv_out) * e + a * probs * e + 8
    else:
        total += (2 * q_out + 2 * kv_out) * e + 4 * a + 8     # SDPA: q, k, v, output; logsumexp
    total += 3 * i * e                       # SwiGLU: gate out, SiLU out, up out
    groups = (("q", "k", "v"), ("gate", "up"), ("down",))
    if fused_lora:
        total += sum(shapes[g[0]][0] * e for g in groups if any(t in targets for t in g))
        return total + len(targets) * rank * e
    if e == 4:
        total += sum(shapes[g[0]][0] * 4 for g in groups if any(t in targets for t in g))
    else:
        total += sum(shapes[t][0] * 4 for t in targets)
    total += len(targets) * rank * 4
    return total


def activation_bytes(spec: Any, e: int, rank: int, targets: tuple[str, ...], batch_size: int, seq_len: int,
                     gradient_checkpointing: bool, fused_lora: bool = True, attention: str = "sdpa",
                     fused_norm: bool = False) -> float:
    """Activations alive at the start of backward, for b·s tokens.

    Without checkpointing: L layers' saved tensors (see ``activation_bytes_per_token_per_layer``) plus one
    layer's worth of gradients in flight during backward, plus the final RMSNorm input (h·4 B).
    With full activation checkpointing per layer (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
    Cost"; Korthikanti et al. 2022 §4, 2sbh per layer at 2 B): each layer keeps only its input (h·e), and
    during backward one layer is recomputed (its saved tensors) while one layer's gradients are in flight.
    """
    tokens = batch_size * seq_len
    arch = model_arch(spec)
    if arch is not None:
        # any family: what autograd saves in the model itself, traced on the meta device (lowres.advisor.arch)
        from lowres.advisor.arch import activation_trace

        compute = {4: "fp32", 2: "bf16"}[e]
        first, per_layer = activation_trace(spec, compute, rank, targets, seq_len, fused_lora, attention,
                                            fused_norm)
        if gradient_checkpointing:
            per_token = spec.num_layers * spec.hidden_size * e + 2 * per_layer + spec.hidden_size * 4.0
        else:
            per_token = first + (spec.num_layers - 1) * per_layer + per_layer
        return tokens * per_token
    targets = resolve_targets(targets) if isinstance(targets, str) else targets
    per_layer = activation_bytes_per_token_per_layer(spec, e, rank, targets, fused_lora, attention, seq_len,
                                                     fused_norm)
    final = spec.hidden_size * 4.0
    if gradient_checkpointing:
        per_token = spec.num_layers * spec.hidden_size * e + 2 * per_layer + final
    else:
        per_token = (spec.num_layers + 1) * per_layer + final
    return tokens * per_token


def logits_bytes(spec: Any, e: int, batch_size: int, seq_len: int, loss_chunk_tokens: int,
                 device: str = "cpu") -> float:
    """The lm_head output and the cross-entropy around it at their peak, as lowres.train.loss computes them.

    No chunks (``loss_chunk_tokens`` 0, ``plain_lm_loss``): the logits are upcast to fp32 and the e-byte
    originals freed; log_softmax saves its fp32 output, and in backward its incoming gradient and its input
    gradient join it: T·V·12 B for T = b·s tokens.
    Chunked (``chunked_lm_loss``, the fused linear cross-entropy of Liger-Kernel, Hsu et al. 2024): one
    chunk's e-byte logits are alive at a time, turned into exponentials in place (``exp_rows``); when e < 4
    through an fp32 scratch of ``SOFTMAX_ROWS`` rows on the CPU (of the whole chunk elsewhere):
    min(chunk, T)·V·e + rows·V·4 B; and the hidden-state gradient of all tokens is kept for backward: T·h·e B.
    On the CPU the recipe's head is frozen (LoRA) and each chunk walks the vocabulary in blocks of
    ``VOCAB_BLOCK`` columns (``vocab_blocked_loss``): one block's e-byte logits (and, when e < 4, their fp32
    scratch) instead of the chunk's, plus its fp32 running sums at [chunk × h] (the gradient accumulator, the
    target rows of the head and one block's GEMM output): chunk·B·(e + 4·[e < 4]) + 3·chunk·h·4 + T·h·e B.
    """
    tokens = batch_size * seq_len
    if loss_chunk_tokens <= 0:
        return float(tokens) * spec.vocab_size * 12
    from lowres.train.loss import SOFTMAX_ROWS, VOCAB_BLOCK

    chunk = min(tokens, loss_chunk_tokens)
    if device == "cpu" and VOCAB_BLOCK > 0:
        cols = min(VOCAB_BLOCK, spec.vocab_size)
        return (float(chunk) * cols * (e + (4 if e < 4 else 0)) + 3.0 * chunk * spec.hidden_size * 4
                + float(tokens) * spec.hidden_size * e)
    scratch_rows = 0 if e >= 4 else (min(chunk, SOFTMAX_ROWS) if device == "cpu" else chunk)
    return (float(chunk) * spec.vocab_size * e + float(scratch_rows) * spec.vocab_size * 4
            + float(tokens) * spec.hidden_size * e)
