"""The training step's speed options (``train.compile``, ``train.attention``, ``train.optimizer_impl``), applied
to a loaded LoRA model. Each is kept as an option only because an interleaved A/B measurement was made of it
(``bench/step_options.py``; figures in the README's "Measured here"), and each leaves the loss curve of the
default within numerical noise (tests/test_train_speed.py). Defaults are what measured fastest or equal.

* ``compile``: ``torch.compile`` of each decoder layer (CPU: the inductor backend, C++/OpenMP kernels) —
  regional: one graph, traced once and shared by the layers, while the stack's own forward (embedding, rotary
  tables, mask) stays eager, so transformers leaves the causal mask out as it does eagerly and the block-causal
  attention is traced into the graph. No graph break (a test counts them): lowres' autograd Functions are
  built by ``lowres.train.lazy.built_once``, which dynamo can read. ``true`` compiles from the first step;
  ``auto`` (the default) decides by measurement mid-run (``AutoCompile``): on a CPU with a C++ compiler, after
  timing eager steps, only if the remaining steps would recoup the compile time, and keeps it only if the
  compiled steps measure faster. The compiling step is timed, reported as ``info["compile_seconds"]`` (and
  recorded per model and shape for the next run's estimate); kernels are cached on disk
  (``$LOWRES_CACHE_DIR/inductor``), so a second run of the same shapes compiles in seconds.
  Fused LoRA layers reach inductor as two opaque library ops (``lowres::lora_linear`` and its backward), so
  their GEMMs (oneDNN's too) and in-place adds run as they do eagerly while inductor fuses the norms, rotary
  embedding, activation and residual adds between them.
* ``attention``: ``sdpa`` (torch's scaled_dot_product_attention, a fused flash kernel on CPU), ``bmm``
  (lowres.train.attention: three batched GEMMs with the probabilities saved — faster for short bf16
  sequences on a CPU), ``eager`` (the model's own matmul-softmax-matmul) or ``auto`` (resolved by the recipe:
  ``lowres.train.attention.resolve_attention``).
* ``fused_lora``: each LoRA linear as one autograd Function (``LoraLinearFunction``): the frozen GEMM with
  ``scaling · (x Aᵀ) Bᵀ`` added into its output in place, and a backward of the same GEMMs as autograd's through
  peft, without peft's multiply, add and copies over the whole [tokens × out] output. In bf16 compute it
  also keeps the adapter's GEMMs in the compute dtype (peft casts every LoRA layer's input to fp32). Falls back
  to peft's forward for anything else (dropout, DoRA, several adapters, a quantized base, autocast, fp16, a
  disabled or merged adapter).
* ``lora_groups``: with ``fused_lora``, sibling LoRA layers that read the same input (q/k/v, gate/up) as one
  GEMM over one buffer of their frozen weights and A matrices (lowres.train.lora_groups).
* ``fused_norm``: RMSNorm layers as one autograd Function each where it reproduces the family's own norm
  (``lowres.train.norms``, checked once per class).
* ``gemm``: ``onednn`` runs the frozen fp32 GEMMs — each LoRA layer's base projection and the LM head, forward
  and the input gradient backward — through oneDNN's JIT kernels (``torch.ops.mkldnn._linear_pointwise``, on
  the weights as they are: no packed copy, no extra memory) instead of torch's BLAS (MKL's sgemm in the
  pinned CPU build). Same products, another summation order. Only for fp32 (in bf16 torch already calls
  oneDNN); anything else runs as before. Implies ``fused_lora`` (the LoRA layers' GEMMs are its).
* ``optimizer_impl``: torch AdamW ``fused`` (one kernel over all LoRA tensors), ``foreach`` (batched ops
  over the tensor list) or ``loop`` (one tensor at a time).
"""

from __future__ import annotations

import os
from typing import Any

from lowres.train.lazy import built_once


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled kernels between runs: beside the roofline cache, one folder per machine
    fingerprint (CPU model, the ISA flags torch's kernels may use, cores, RAM).

    Inductor's own cache key leaves out the ISA ATen runs at: kernels compiled and cached under AVX-512 and then
    loaded under ``ATEN_CPU_CAPABILITY=avx2`` (the level an AVX2-only CPU runs at) made a compiled
    SmolLM2-135M-Instruct's first training step NaN, where the same compile into an empty cache matched eager
    (session 13). One cache per fingerprint keeps a home folder shared by a lab's different machines, or a
    capped ISA (``lowres.hardware.cpu.isa_cap``), from reusing another ISA's kernels."""
    from lowres.hardware.detection import this_machine_fingerprint
    from lowres.train.roofline_cache import cache_path

    return str(cache_path().parent / "inductor" / this_machine_fingerprint())


def use_inductor_cache_dir() -> str:
    """Point inductor at ``inductor_cache_dir()`` unless the user chose a folder (TORCHINDUCTOR_CACHE_DIR).

    Importing ``torch._dynamo`` (bitsandbytes and peft do) already sets the variable to torch's default
    (/tmp/torchinductor_<user>), so a plain setdefault never took effect: the default's value is taken to mean
    "not chosen". Inductor reads the variable on each use, so setting it before compiling is enough."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        torch_default = os.path.abspath(default_cache_dir())
    except ImportError:  # a torch without that module: only an unset variable counts as "not chosen"
        torch_default = None
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, torch_default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def set_attention(model: Any, impl: str) -> None:
    """Switch the (peft-wrapped) model's attention implementation to ``impl`` (sdpa, eager, or bmm:
    lowres.train.attention, registered with transformers on first use)."""
    if impl == "bmm":
        from lowres.train.attention import register

        impl = register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) == impl:
        return
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(impl)
    else:  # transformers 4.x
        base.config._attn_implementation = impl


def compile_decoder(model: Any) -> bool:
    """Compile the decoder stack in place (the recipe's loss calls it directly, not the wrapper's forward);
    False when the model has none to compile (then the step runs eagerly)."""
    import torch

    from lowres.train.loss import _head_and_decoder

    use_inductor_cache_dir()
    decoder, _ = _head_and_decoder(model)
    if decoder is None:
        return False
    # build the autograd Functions (and register lowres' ops) now: built inside the traced forward, their
    # class definitions and torch.library calls would break the graph
    from lowres.train import attention, norms

    _build_lora_function()
    norms._function()
    attention._function()
    attention._blocked_function()
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        # regional: each decoder layer (one graph, traced once and shared by every layer of the same code);
        # the stack's own forward — embedding, rotary tables, the mask — stays eager, where transformers can
        # tell a plain causal mask is not needed (under tracing it materialises one)
        for layer in layers:
            layer.compile(dynamic=False)
    else:
        decoder.compile(dynamic=False)
    return True


def onednn_available() -> bool:
    import torch

    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class LoraLinearFunction:
    """``x Wᵀ (+ b) + s · (x Aᵀ) Bᵀ`` for a frozen ``W`` (and ``b``) and a trainable LoRA pair ``A`` [r × in],
    ``B`` [out × r], with a backward written for LoRA (built lazily: torch is imported on first use).

    Forward: the rank-r down-projection ``h = x Aᵀ``, the frozen GEMM, and ``s · h Bᵀ`` added into its output in
    place (one ``addmm_``: no [tokens × out] LoRA output, scaled copy or sum, which peft's forward makes).
    Backward: ``dh = s · g B``, ``dB = s · gᵀ h``, ``dA = dhᵀ x`` and ``dx = g W + dh A`` (the rank-r term added
    in place into the frozen GEMM's result) — the GEMMs autograd would run through peft's graph, less its
    element-wise passes over [tokens × out], and no input gradient where none is wanted (the first layer).
    In bf16 compute the fp32 adapter weights are cast to the compute dtype (r × (in + out) elements) rather
    than, as peft does, the [tokens × in] activations to fp32: the adapter's GEMMs run in bf16 with fp32
    accumulation, as under autocast, and the layer saves its bf16 input, not an fp32 copy of it."""

    @staticmethod
    def apply(x2, weight, bias, lora_a, lora_b, scaling: float, gemm: str = "torch"):
        return _build_lora_function().apply(x2, weight, bias, lora_a, lora_b, scaling, gemm)


def _lora_forward_impl(x2, weight, bias, lora_a, lora_b, scaling: float, gemm: str):
    """(y, h): ``h = x Aᵀ``, ``y = x Wᵀ (+ b)`` through ``gemm``, then ``y += s · h Bᵀ`` in place."""
    a, b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)
    h = _base_gemm(x2, a, None, gemm)  # x Aᵀ: [tokens × r]
    y = _base_gemm(x2, weight, bias, gemm)
    y.addmm_(h, b.t(), alpha=scaling)
    return y, h


def _lora_backward_impl(g, x2, weight, lora_a, lora_b, h, scaling: float, gemm: str,
                        want_x: bool, want_a: bool, want_b: bool):
    """(dx, dA, dB), each an empty tensor where it is not wanted (a fixed arity for the op schema)."""
    a, b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)
    g = g.contiguous()
    dh = _rank_gemm(g, b, gemm).mul_(scaling) if (want_x or want_a) else None
    db = (h.t() @ g).mul_(scaling).t().contiguous().to(lora_b.dtype) if want_b else lora_b.new_empty((0,))
    da = (dh.t() @ x2).to(lora_a.dtype) if want_a else lora_a.new_empty((0,))
    if want_x:
        dx = _base_gemm(g, weight.t(), None, gemm)  # g W
        dx.addmm_(dh, a)
    else:
        dx = x2.new_empty((0,))
    return dx, da, db


def _rank_gemm(g, b, gemm: str):
    """``g B`` ([tokens × out] by [out × r]) for a small rank r. In fp32, BLAS runs an r-column output poorly on
    some CPUs: the AMD EPYC's MKL took 51 ms a step for SmolLM2-135M's 210 of them, against 16–18 ms through
    oneDNN or as ``(Bᵀ gᵀ)ᵀ`` (an r-row output, read straight from ``g``). In bf16 (oneDNN's in torch) the
    plain product is never slower: alike on the EPYC, and on the Intel Xeon with AMX 0.06 against 0.11 ms for
    a 512 × 1536 ``g`` (the bf16 step 0.979× as long, in-process A/B)."""
    import torch

    if g.device.type != "cpu" or g.dtype == torch.bfloat16:
        return g @ b
    if gemm == "onednn" and g.dtype == torch.float32 and b.dtype == torch.float32:
        return _base_gemm(g, b.t().contiguous(), None, gemm)
    return (b.t() @ g.t()).t()


def _base_gemm(x2, weight, bias, gemm: str):
    import torch
    import torch.nn.functional as F

    if (gemm == "onednn" and x2.dtype == torch.float32 and weight.dtype == torch.float32
            and x2.device.type == "cpu"):
        from lowres.train.loss import onednn_linear

        return onednn_linear(x2, weight, bias)
    return F.linear(x2, weight, bias)


_LIB = None


def _lora_ops():
    """The two halves of the LoRA linear as torch library ops (``lowres::lora_linear[_backward]``), defined once:
    what ``torch.compile`` sees of a fused LoRA layer. Inductor calls them as opaque kernels — oneDNN's GEMMs
    and the in-place adds stay as they run eagerly (not functionalized into copies) — and fuses everything
    around them. Eagerly the same functions are called directly, without the dispatcher."""
    global _LIB
    import torch

    if _LIB is None:
        lib = torch.library.Library("lowres", "DEF")
        lib.define("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, "
                   "str gemm) -> (Tensor, Tensor)")
        lib.define("lora_linear_backward(Tensor g, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor h, "
                   "float scaling, str gemm, bool want_x, bool want_a, bool want_b) -> (Tensor, Tensor, Tensor)")
        lib.impl("lora_linear", _lora_forward_impl, "CompositeExplicitAutograd")
        lib.impl("lora_linear_backward", _lora_backward_impl, "CompositeExplicitAutograd")

        def forward_fake(x2, weight, bias, lora_a, lora_b, scaling, gemm):
            return x2.new_empty((x2.shape[0], weight.shape[0])), x2.new_empty((x2.shape[0], lora_a.shape[0]))

        def backward_fake(g, x2, weight, lora_a, lora_b, h, scaling, gemm, want_x, want_a, want_b):
            return (x2.new_empty(x2.shape if want_x else (0,)),
                    lora_a.new_empty(lora_a.shape if want_a else (0,)),
                    lora_b.new_empty(lora_b.shape if want_b else (0,)))

        torch.library.register_fake("lowres::lora_linear", forward_fake, lib=lib)
        torch.library.register_fake("lowres::lora_linear_backward", backward_fake, lib=lib)
        _LIB = lib
    return torch.ops.lowres


@built_once
def _build_lora_function():
    import torch

    ops = _lora_ops()

    class _LoraLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x2, weight, bias, lora_a, lora_b, scaling, gemm):
            if torch.compiler.is_compiling():
                y, h = ops.lora_linear(x2, weight, bias, lora_a, lora_b, scaling, gemm)
            else:
                y, h = _lora_forward_impl(x2, weight, bias, lora_a, lora_b, scaling, gemm)
            # the parameters themselves, not their casts: backward casts again (r × (in + out) elements)
            ctx.save_for_backward(x2, weight, lora_a, lora_b, h)
            ctx.scaling, ctx.gemm = scaling, gemm
            return y

        @staticmethod
        def backward(ctx, g):
            x2, weight, lora_a, lora_b, h = ctx.saved_tensors
            want = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
            args = (g, x2, weight, lora_a, lora_b, h, ctx.scaling, ctx.gemm, *want)
            if torch.compiler.is_compiling():
                dx, da, db = ops.lora_linear_backward(*args)
            else:
                dx, da, db = _lora_backward_impl(*args)
            return (dx if want[0] else None), None, None, (da if want[1] else None), (db if want[2] else None), \
                None, None

    return _LoraLinear


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for devices autocast does not know (meta: the
    advisor's trace)."""
    import torch

    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def fused_adapter(layer: Any, x: Any) -> str | None:
    """The adapter ``LoraLinearFunction`` runs for peft LoRA Linear ``layer`` on input ``x``: its one active
    adapter, where that is plain (no dropout, DoRA or other variant, no bias on B) over a frozen ``nn.Linear``
    in fp32 or bf16, enabled, unmerged and outside autocast; None where peft's own forward must run (also
    fp16, whose adapter gradients peft keeps in fp32, out of fp16's narrow range)."""
    import torch

    names = layer.active_adapters
    name = names[0] if len(names) == 1 else None
    base = layer.base_layer
    if (name is None or layer.disable_adapters or layer.merged or name not in layer.lora_A
            or name in layer.lora_variant or type(layer.lora_dropout[name]) is not torch.nn.Identity
            or type(base) is not torch.nn.Linear or layer.lora_B[name].bias is not None
            or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
            or x.dtype != base.weight.dtype or x.dtype not in (torch.float32, torch.bfloat16)
            or _autocast_on(x.device.type)):
        return None
    return name


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft lora.Linear's forward through ``LoraLinearFunction`` (or its sibling group's one GEMM,
    lowres.train.lora_groups) where ``fused_adapter`` names an adapter; peft's own for anything else."""
    import torch

    if args or kwargs:
        return self._lowres_peft_forward(x, *args, **kwargs)
    group = getattr(self, "_lowres_group", None)
    if group is not None and not torch.compiler.is_compiling():
        out = group.output(self, x)
        if out is not None:
            return out
    name = fused_adapter(self, x)
    if name is None:
        return self._lowres_peft_forward(x)
    base = self.base_layer
    x2 = x.reshape(-1, x.shape[-1])
    out = LoraLinearFunction.apply(x2, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                   self.scaling[name], getattr(self, "_lowres_gemm", "torch"))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def fuse_lora(model: Any, gemm: str = "torch", groups: bool = True) -> int:
    """Give every peft LoRA Linear of ``model`` the fused forward (its base GEMM through ``gemm``); with
    ``groups``, sibling layers that read the same input (q/k/v, gate/up) also share one GEMM
    (lowres.train.lora_groups). The number of layers changed."""
    import types

    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            if not hasattr(module, "_lowres_peft_forward"):
                module._lowres_peft_forward = module.forward
                module.forward = types.MethodType(_fused_lora_forward, module)
            module._lowres_gemm = gemm
            n += 1
    if groups:
        from lowres.train.lora_groups import group_siblings

        group_siblings(model)
    return n


def resolve_gemm(gemm: str, device: str = "cpu", compute: str = "fp32",
                 shapes: list[tuple[int, int, int]] | None = None, fingerprint: str | None = None,
                 say: Any = None) -> str:
    """``train.gemm`` as it will run. ``auto``: torch off the CPU, outside fp32 (bf16 GEMMs are oneDNN's in
    torch already) and where torch has no oneDNN; otherwise whichever of the two measured faster on this machine over the model's GEMM
    ``shapes`` (``measure_gemm_choice``, cached beside the roofline; ``say`` is told before it looks). An
    explicit onednn where it cannot run is an error that says what to do."""
    if gemm == "auto":
        if device != "cpu" or compute != "fp32" or not onednn_available() or not shapes:
            return "torch"
        if say is not None:
            say("setup: torch's GEMMs or oneDNN's, whichever is faster here (measured once, then cached) …")
        return measure_gemm_choice(shapes, fingerprint=fingerprint)["choice"]
    if gemm == "onednn" and not (device == "cpu" and onednn_available()):
        where = "off the CPU" if device != "cpu" else "with this torch build (torch.backends.mkldnn is not available)"
        raise ValueError(f"train.gemm=onednn: oneDNN's GEMMs cannot run {where}; use train.gemm=auto or torch")
    return gemm


# oneDNN must beat torch's BLAS by this much to be chosen: timing noise must not flip the choice
GEMM_MARGIN = 0.97


def measure_gemm_choice(shapes: list[tuple[int, int, int]], *, fingerprint: str | None = None, reps: int = 4,
                        path: Any = None) -> dict:
    """Time torch's fp32 GEMM (its BLAS) against oneDNN's on the model's shapes (M, K, N), both as a step uses
    them — forward ``x Wᵀ`` and input gradient ``g W`` — interleaved, the best of ``reps`` each, at torch's
    current thread count. ``{"choice", "torch_s", "onednn_s", "source"}``: onednn when its summed time is at
    most ``GEMM_MARGIN`` of torch's. Cached per machine, threads and shapes in the roofline cache; a result
    measured while the machine is busy is used, not kept (lowres.train.mfu's rule)."""
    import time

    import torch

    from lowres.advisor.calibrate import machine_load
    from lowres.train.loss import onednn_linear
    from lowres.train.roofline_cache import cache_key, cache_path, keep_if_quiet, read_cache

    if fingerprint is None:
        from lowres.hardware.detection import this_machine_fingerprint

        fingerprint = this_machine_fingerprint()
    key = cache_key(f"{fingerprint}:cpu", "gemm-choice-fp32", torch.get_num_threads(), shapes)
    path = path or cache_path()
    cache = read_cache(path)
    if key in cache and cache[key].get("choice") in ("torch", "onednn"):
        return dict(cache[key], source="cache")
    before = machine_load()
    ops = []
    for m, k, n in shapes:
        # at most 512 rows and 4,096 output columns (the LM head): enough to rank the two libraries, and a
        # few tens of MB at most — a 262k-vocabulary head at full size would add ~1.7 GB to the run's peak
        m, n = min(m, 512), min(n, 4096)
        # constant operands (a memset, not randn); GEMM speed is value-blind
        w = torch.full((n, k), 0.01)
        x, gy = torch.full((m, k), 0.5), torch.full((m, n), 0.5)
        ops.append(((lambda x=x, w=w: torch.nn.functional.linear(x, w)), (lambda x=x, w=w: onednn_linear(x, w))))
        ops.append(((lambda gy=gy, w=w: gy @ w), (lambda gy=gy, w=w: onednn_linear(gy, w.t()))))
    for pair in ops:  # warm-up: packing buffers, JIT kernels, the thread pool
        for fn in pair:
            fn()
    best = [[float("inf")] * 2 for _ in ops]  # per op: [torch, onednn]
    for _ in range(reps):
        for op, pair in zip(best, ops):
            for lib, fn in enumerate(pair):
                t0 = time.perf_counter()
                fn()
                op[lib] = min(op[lib], time.perf_counter() - t0)
    t_torch, t_onednn = sum(op[0] for op in best), sum(op[1] for op in best)
    out = {"choice": "onednn" if t_onednn <= GEMM_MARGIN * t_torch else "torch", "torch_s": t_torch,
           "onednn_s": t_onednn, "source": "measured", "measured_at": time.time()}
    keep_if_quiet(path, key, out, before)
    return out


def apply(model: Any, train_cfg: Any, gemm: str = "torch", attention: str | None = None) -> dict:
    """Apply ``train.attention`` (``attention``: as resolved, ``resolve_attention``), ``train.fused_lora``/
    ``gemm`` (already resolved: ``resolve_gemm``) and ``train.compile`` to a loaded model (compile last: it
    traces what the others set up); what was done, for the run's info."""
    attention = attention or ("sdpa" if train_cfg.attention == "auto" else train_cfg.attention)
    set_attention(model, attention)
    fused = (fuse_lora(model, gemm, groups=getattr(train_cfg, "lora_groups", False))
             if getattr(train_cfg, "fused_lora", False) or gemm == "onednn" else 0)
    if getattr(train_cfg, "fused_norm", False):
        from lowres.train.norms import fuse_norms

        norms = fuse_norms(model)
    else:
        norms = 0
    compiled = compile_decoder(model) if train_cfg.compile is True else False
    grouped = sum(getattr(m, "_lowres_group", None) is not None for m in model.modules())
    return {"attention": attention, "compiled": compiled, "optimizer_impl": train_cfg.optimizer_impl,
            "fused_lora_layers": fused, "grouped_lora_layers": grouped, "fused_norm_layers": norms, "gemm": gemm}


def compile_seconds(step_seconds: list[float]) -> float | None:
    """What compiling cost: the first step (which compiled) minus the median of the later ones."""
    if len(step_seconds) < 2:
        return None
    rest = sorted(step_seconds[1:])
    return max(0.0, step_seconds[0] - rest[len(rest) // 2])


# ---------------------------------------------------------------------------------------- train.compile=auto
AUTO_EAGER_STEPS = 3  # eager steps timed (after the warm-up) before deciding
AUTO_TRIAL_STEPS = 3  # compiled steps timed after the one that compiled, before keeping it
# what compiling is expected to save: measured 1.09 (fp32) and 1.10 (bf16) on the AMX Xeon (README, "Measured
# here"); the trial below checks it on every machine before the rest of the run relies on it
AUTO_EXPECTED_GAIN = 0.08
AUTO_FIRST_COMPILE_S = 90.0  # expected compile time where none was measured yet here (cold caches: 60–90 s)
AUTO_KEEP_BELOW = 0.98  # compiled steps must take at most this fraction of the eager ones to be kept


def cpp_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would call ($CXX, else g++, c++ or clang++), or None."""
    import shutil

    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def python_headers() -> bool:
    """Whether this Python's C headers are installed (inductor's CPU kernels include Python.h)."""
    import sysconfig

    return os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))


def uncompile_decoder(model: Any) -> None:
    """Undo ``compile_decoder``: every layer (or the stack) runs its eager forward again."""
    from lowres.train.loss import _head_and_decoder

    decoder, _ = _head_and_decoder(model)
    if decoder is None:
        return
    for module in [decoder, *getattr(decoder, "layers", [])]:
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def _compile_cache() -> Any:
    from lowres.paths import cache_dir

    return cache_dir() / "compile_seconds.json"


def recorded_compile_seconds(key: str) -> float | None:
    """The compile time last measured on this machine for ``key`` (model, shape, dtype), if any."""
    from lowres.train.roofline_cache import read_cache

    try:
        return float(read_cache(_compile_cache())[key])
    except (KeyError, TypeError, ValueError):
        return None


def record_compile_seconds(key: str, seconds: float) -> None:
    from lowres.train.roofline_cache import read_cache, write_cache

    path = _compile_cache()
    table = read_cache(path)
    table[key] = round(float(seconds), 2)
    try:
        write_cache(path, table)
    except OSError:
        pass  # a read-only cache only costs the next run its estimate


class AutoCompile:
    """``train.compile=auto``: compile only where this run measures that it pays.

    1. After the warm-up, ``AUTO_EAGER_STEPS`` eager steps are timed (their median: ``eager_s``).
    2. Compiling is tried only if the rest of the run would recoup it: remaining steps × ``eager_s`` ×
       ``AUTO_EXPECTED_GAIN`` ≥ the compile time measured last time here for this model, shape and dtype
       (``AUTO_FIRST_COMPILE_S`` if never). A short run (the quickstart's) stays eager.
    3. The next step compiles (its time minus ``eager_s`` is recorded for the next run's estimate); then
       ``AUTO_TRIAL_STEPS`` compiled steps are timed. Compiled is kept only if their median is at most
       ``AUTO_KEEP_BELOW`` × ``eager_s``; otherwise every layer goes back to eager for the rest of the run.

    ``decision`` says what happened, in words (``lowres train`` prints it; it is in the run's info)."""

    def __init__(self, model: Any, key: str, warmup: int, say: Any = None):
        self.model, self.key, self.say = model, key, say or (lambda msg: None)
        self.warmup = max(1, warmup)
        self.state = "wait"
        self.eager_s: float | None = None
        self.compile_step: int | None = None
        self.compile_seconds: float | None = None
        self.decision = "pending: eager steps are being timed"

    def off(self, why: str) -> None:
        self.state, self.decision = "off", f"eager: {why}"

    def compiling_now(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is the one that compiles."""
        return self.state == "trial" and step == self.compile_step

    def failed(self, error: BaseException) -> None:
        """The compiling step raised (no C++ toolchain that works, an inductor error): back to eager for the
        rest of the run, said with the error's first line."""
        uncompile_decoder(self.model)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        self.off(f"compiling failed at step {self.compile_step} ({type(error).__name__}: {first}); that step was "
                 "run again eagerly")
        self.say(f"train.compile=auto: {self.decision}")

    def after_step(self, history: list[dict], step: int, max_steps: int) -> None:
        """Called after each optimizer step (``history``: the run's step records, the last one just done)."""
        import statistics

        if self.state in ("off", "on"):
            return
        if self.state == "wait":
            timed = [r["step_seconds"] for r in history[self.warmup:]]
            if len(timed) < AUTO_EAGER_STEPS:
                return
            self.eager_s = statistics.median(timed[-AUTO_EAGER_STEPS:])
            remaining = max_steps - step
            known = recorded_compile_seconds(self.key)
            cost = known if known is not None else AUTO_FIRST_COMPILE_S
            saving = remaining * self.eager_s * AUTO_EXPECTED_GAIN
            if saving < cost:
                self.off(f"the {remaining} remaining steps at {self.eager_s:.3g} s would save ≈ {saving:.0f} s, "
                         f"less than compiling costs (≈ {cost:.0f} s, {'measured here' if known else 'a first compile'})")
                return
            compile_decoder(self.model)
            self.state, self.compile_step = "trial", step + 1
            self.decision = "trial: compiling"
            self.say(f"train.compile=auto: compiling the decoder layers at step {step + 1} (≈ {cost:.0f} s): the "
                     f"{remaining} remaining steps at {self.eager_s:.3g} s each would recoup it")
            return
        # trial
        if step == self.compile_step:
            history[-1]["compiled_here"] = True
            self.compile_seconds = max(0.0, history[-1]["step_seconds"] - self.eager_s)
            record_compile_seconds(self.key, self.compile_seconds)
            return
        timed = [r["step_seconds"] for r in history if r["step"] > self.compile_step]
        if len(timed) < AUTO_TRIAL_STEPS:
            return
        compiled_s = statistics.median(timed[:AUTO_TRIAL_STEPS])
        ratio = compiled_s / self.eager_s
        if ratio <= AUTO_KEEP_BELOW:
            self.state = "on"
            self.decision = (f"compiled at step {self.compile_step} ({self.compile_seconds:.1f} s): "
                             f"{compiled_s:.3g} s a step against {self.eager_s:.3g} eager ({ratio:.3f}×)")
        else:
            uncompile_decoder(self.model)
            self.off(f"compiled at step {self.compile_step} but measured {compiled_s:.3g} s a step against "
                     f"{self.eager_s:.3g} eager ({ratio:.3f}×): back to eager")
        self.say(f"train.compile=auto: {self.decision}")
