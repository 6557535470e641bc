"""Quantization-aware training of a federated client's LoRA update (``compression.qat: true``).

A client uploads ``Δ = w − w_global`` encoded by its uplink codec. With int8/int4 the server receives
``Q(Δ)``, not ``Δ``: post-training quantisation adds an error the client never saw. QAT trains through the
quantiser instead: during the round each LoRA weight is used as ``w_global + Q(w − w_global)``, the same
per-channel quantiser as the codec (``compression.quantize``; the scale is taken from the current ``Δ``),
with the straight-through estimator (Bengio et al. 2013) — the forward pass sees ``Q(Δ)``, the backward
pass treats ``Q`` as the identity, so the latent ``w`` keeps accumulating small steps that one rounding would
erase. When the round ends the model keeps the quantised weights, so the ``Δ`` it uploads is (up to float
rounding of ``w_global + Q(Δ)``) a fixed point of the codec: the upload loses nothing more.

    handle = start_qat(model, "int4")   # after the global weights are loaded: they are the anchor
    recipe.train(steps=5)
    handle.finish()                      # the model now holds w_global + Q(Δ)

It is a ``torch.nn.utils.parametrize`` parametrization on each trainable LoRA weight: the Parameter object
stays the same one (the optimizer's state keeps pointing at it), and ``finish`` removes it again, so peft's
state-dict names are untouched between rounds. Without QAT nothing is registered: training is the recipe's own.
"""

from __future__ import annotations

from typing import Any

import torch

from lowres.federated.compression import QAT_KINDS, Codec, channel_axis, parse_codec


def fake_quantize(x: Any, codec: Codec) -> Any:
    """``compression.quantize`` in torch (same scales, same round-half-even), without a gradient."""
    levels = 7 if codec.kind == "int4" else 127
    per_channel = codec.per_channel or codec.kind == "int4"
    axis = channel_axis(tuple(x.shape)) if per_channel else None
    with torch.no_grad():
        xf = x.float()
        if axis is None:
            peak = xf.abs().max() if xf.numel() else xf.new_zeros(())
        else:
            peak = xf.abs().amax(dim=1 - axis, keepdim=True)
        scale = peak / float(levels)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(xf / safe), -levels, levels)
        return (q * scale).to(x.dtype)


class FakeQuantDelta(torch.nn.Module):
    """A parametrization ``w ↦ anchor + Δ + (Q(Δ) − Δ).detach()`` with ``Δ = w − anchor`` (the STE)."""

    def __init__(self, anchor: Any, codec: Codec) -> None:
        super().__init__()
        self.codec = codec
        self.register_buffer("anchor", anchor.detach().clone(), persistent=False)

    def forward(self, w):
        delta = w - self.anchor
        return self.anchor + delta + (fake_quantize(delta, self.codec) - delta).detach()


class QATHandle:
    """What ``start_qat`` armed; ``finish()`` leaves the quantised weights in the model and removes the rest."""

    def __init__(self, modules: list[Any]) -> None:
        self.modules = modules

    def finish(self) -> None:
        from torch.nn.utils import parametrize

        for m in self.modules:
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        self.modules = []


def lora_weight_modules(model: Any) -> list[Any]:
    """The modules whose ``weight`` is a trainable LoRA matrix (peft's ``lora_A.<adapter>`` / ``lora_B.…``)."""
    out = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if ("lora_A" in name or "lora_B" in name) and w is not None and getattr(w, "requires_grad", False):
            out.append(module)
    return out


def start_qat(model: Any, codec: Codec | str) -> QATHandle:
    """Fake-quantise every trainable LoRA weight's change from its current value by ``codec`` (int8, int8t or
    int4) until ``finish()``; ValueError for a codec QAT has no quantiser for."""
    from torch.nn.utils import parametrize

    codec = parse_codec(codec) if isinstance(codec, str) else codec
    if codec.kind not in QAT_KINDS:
        raise ValueError(f"QAT trains through int8/int8t/int4 rounding; codec {codec} has none "
                         "(set compression.qat: false, or an int8/int4 uplink)")
    modules = lora_weight_modules(model)
    for m in modules:
        # unsafe: the parametrization keeps the weight's shape and dtype, no need to call it to check
        parametrize.register_parametrization(m, "weight", FakeQuantDelta(m.weight, codec), unsafe=True)
    return QATHandle(modules)
