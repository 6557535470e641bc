"""The training step's speed options (``train.compile``, ``train.attention``, ``train.optimizer_impl``), applied
to a loaded LoRA model. Each is kept as an option only because an interleaved A/B measurement was made of it
(``bench/step_options.py``; figures in the README's "Measured here"), and each leaves the loss curve of the
default within numerical noise (tests/test_train_speed.py). Defaults are what measured fastest or equal.

* ``compile``: ``torch.compile`` of the decoder stack (CPU: the inductor backend, C++/OpenMP kernels). The
  first step pays the compilation; it is timed, reported as ``info["compile_seconds"]``, and its kernels are
  cached on disk (``$LOWRES_CACHE_DIR/inductor``), so a second run of the same shapes compiles much faster.
* ``attention``: ``sdpa`` (torch's scaled_dot_product_attention, a fused flash kernel on CPU) or ``eager``
  (the model's own matmul-softmax-matmul).
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


def apply(model: Any, train_cfg: Any) -> dict:
    """Apply ``train.attention`` and ``train.compile`` to a loaded model; what was done, for the run's info."""
    set_attention(model, train_cfg.attention)
    compiled = compile_decoder(model) if train_cfg.compile else False
    return {"attention": train_cfg.attention, "compiled": compiled, "optimizer_impl": train_cfg.optimizer_impl}


def compile_seconds(step_seconds: list[float]) -> float | None:
    """What compiling cost: the first step (which compiled) minus the median of the later ones."""
    if len(step_seconds) < 2:
        return None
    rest = sorted(step_seconds[1:])
    return max(0.0, step_seconds[0] - rest[len(rest) // 2])
