"""The training step's speed options (``train.compile``, ``train.attention``, ``train.optimizer_impl``), applied
to a loaded LoRA model. Each is kept as an option only because an interleaved A/B measurement was made of it
(``bench/step_options.py``; figures in the README's "Measured here"), and each leaves the loss curve of the
default within numerical noise (tests/test_train_speed.py). Defaults are what measured fastest or equal.

* ``compile``: ``torch.compile`` of the decoder stack (CPU: the inductor backend, C++/OpenMP kernels). The
  first step pays the compilation; it is timed, reported as ``info["compile_seconds"]``, and its kernels are
  cached on disk (``$LOWRES_CACHE_DIR/inductor``), so a second run of the same shapes compiles much faster.
* ``attention``: ``sdpa`` (torch's scaled_dot_product_attention, a fused flash kernel on CPU) or ``eager``
  (the model's own matmul-softmax-matmul).
* ``fused_lora``: each LoRA linear as two GEMMs, the second an ``addmm`` that adds ``scaling · (x A) Bᵀ`` onto
  the frozen projection's output in one kernel — peft's own forward spends a multiply and an add over the whole
  [tokens × out] output per LoRA layer (forward, and the multiply again backward). Falls back to peft's forward
  for anything else (dropout, DoRA, several adapters, a quantized base, autocast, a disabled or merged adapter).
* ``gemm``: ``onednn`` runs the frozen fp32 GEMMs — each LoRA layer's base projection and the LM head, forward
  and the input gradient backward — through oneDNN's JIT kernels (``torch.ops.mkldnn._linear_pointwise``, on
  the weights as they are: no packed copy, no extra memory) instead of torch's BLAS (MKL's sgemm in the
  pinned CPU build). Same products, another summation order. Only
  for fp32 tensors outside autocast (under bf16 autocast torch already calls oneDNN); anything else runs as
  before. Implies ``fused_lora``'s forward for the LoRA layers.
* ``optimizer_impl``: torch AdamW ``fused`` (one kernel over all LoRA tensors), ``foreach`` (batched ops
  over the tensor list) or ``loop`` (one tensor at a time).
"""

from __future__ import annotations

import os
from typing import Any


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled kernels between runs: beside the roofline cache."""
    from lowres.train.roofline_cache import cache_path

    return str(cache_path().parent / "inductor")


def set_attention(model: Any, impl: str) -> None:
    """Switch the (peft-wrapped) model's attention implementation to ``impl`` (sdpa or eager)."""
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
    from lowres.train.loss import _head_and_decoder

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir())
    decoder, _ = _head_and_decoder(model)
    if decoder is None:
        return False
    decoder.compile(dynamic=False)
    return True


def onednn_available() -> bool:
    import torch

    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def frozen_linear(x2, weight, bias=None, gemm: str = "torch"):
    """``F.linear(x2, weight, bias)`` for a 2-D ``x2``; with ``gemm="onednn"`` through oneDNN when the weight
    (and bias) are frozen fp32 CPU tensors and no autocast is on, else torch's own."""
    import torch
    import torch.nn.functional as F

    if (gemm != "onednn" or weight.requires_grad or (bias is not None and bias.requires_grad)
            or weight.dtype != torch.float32 or x2.dtype != torch.float32 or weight.device.type != "cpu"
            or x2.dim() != 2 or torch.is_autocast_enabled("cpu")):
        return F.linear(x2, weight, bias)
    from lowres.train.loss import OneDnnFrozenLinear

    return OneDnnFrozenLinear.apply(x2, weight, bias)


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft lora.Linear's forward for one plain adapter, as base GEMM + LoRA down-projection + one addmm."""
    import torch
    import torch.nn.functional as F

    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    if (args or kwargs or name is None or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant or type(self.lora_dropout[name]) is not torch.nn.Identity
            or type(self.base_layer) is not torch.nn.Linear or self.lora_B[name].bias is not None
            or x.dtype != self.lora_A[name].weight.dtype or torch.is_autocast_enabled(x.device.type)):
        return self._lowres_peft_forward(x, *args, **kwargs)
    x2 = x.reshape(-1, x.shape[-1])
    out = frozen_linear(x2, self.base_layer.weight, self.base_layer.bias, getattr(self, "_lowres_gemm", "torch"))
    down = F.linear(x2, self.lora_A[name].weight)
    out = torch.addmm(out, down, self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return out.reshape(*x.shape[:-1], out.shape[-1])


def fuse_lora(model: Any, gemm: str = "torch") -> int:
    """Give every peft LoRA Linear of ``model`` the fused forward (its base GEMM through ``gemm``); the number
    of layers changed."""
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
    return n


def apply(model: Any, train_cfg: Any) -> dict:
    """Apply ``train.attention``, ``train.fused_lora`` and ``train.compile`` to a loaded model (compile last:
    it traces what the others set up); what was done, for the run's info."""
    set_attention(model, train_cfg.attention)
    gemm = getattr(train_cfg, "gemm", "torch")
    if gemm == "onednn" and not onednn_available():
        raise ValueError("train.gemm=onednn: this torch build has no oneDNN (torch.backends.mkldnn is not "
                         "available); use train.gemm=torch")
    fused = fuse_lora(model, gemm) if getattr(train_cfg, "fused_lora", False) or gemm == "onednn" else 0
    compiled = compile_decoder(model) if train_cfg.compile else False
    return {"attention": train_cfg.attention, "compiled": compiled, "optimizer_impl": train_cfg.optimizer_impl,
            "fused_lora_layers": fused, "gemm": gemm}


def compile_seconds(step_seconds: list[float]) -> float | None:
    """What compiling cost: the first step (which compiled) minus the median of the later ones."""
    if len(step_seconds) < 2:
        return None
    rest = sorted(step_seconds[1:])
    return max(0.0, step_seconds[0] - rest[len(rest) // 2])
