"""Sibling LoRA layers that read the same input — an attention block's q/k/v projections, an MLP's gate and up
projections — run as one GEMM (``train.fused_lora``'s grouped form; lowres.train.speed).

At setup the siblings' frozen weights are moved into one buffer ``C`` = [W₁; …; Wₙ; A-rows], each layer's
``base_layer.weight`` becoming a contiguous row block of it (no second copy: the same memory as before, plus
the rank-r rows; the file pages of a memory-mapped checkpoint that the move read are dropped, see
``release_pages``). A weight that another module also holds (tied across layers) is not moved: its siblings
stay single layers. A forward of the group, run when the first sibling is called:

* copies the adapters' A matrices (cast to the compute dtype: r × in elements each) into C's A-rows;
* ``Y = x Cᵀ``: every sibling's frozen output and every ``h = x Aᵢᵀ`` in one GEMM, where the layers ran n
  frozen GEMMs and n rank-r GEMMs, each reading ``x`` again;
* ``yᵢ += sᵢ · hᵢ Bᵢᵀ`` in place, as the single fused layer does.

The first sibling returns its ``yᵢ`` (a column block of ``Y``); the others find theirs kept for them, checked to
be for the same input object and the same state (an optimizer step in between, an adapter changed,
disabled or merged, or a call with another input computes afresh). The backward writes the input gradient once: the
siblings' ``gᵢ Wᵢ`` accumulated into one output (where autograd summed n of them) and one rank-(n·r) term
``dH A`` for all adapters; ``dA`` for all adapters is one GEMM.

Anything the single fused layer would not run (lowres.train.speed) falls back to it, sibling by sibling: a
disabled or merged adapter, dropout, several adapters, autocast, compiling, a base weight no longer in C
(``model.to(…)`` made new tensors), and so on. Saving the base weights (``save_pretrained`` of a merged or
unloaded model) works on the views; ``ungroup`` gives each layer its own tensor back.
"""

from __future__ import annotations

from typing import Any

from lowres.train.lazy import built_once

# sibling projections that a decoder layer calls on the same tensor, by the names transformers gives them
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class LoraGroup:
    """n peft LoRA Linear layers (one adapter each, the same input width, dtype and device) whose frozen
    weights live in one buffer."""

    def __init__(self, layers: list, adapter: str, droppable: Any = None):
        import torch

        self.layers = layers
        self.adapter = adapter
        w0 = layers[0].base_layer.weight
        self.outs = [layer.base_layer.out_features for layer in layers]
        self.ranks = [layer.lora_A[adapter].weight.shape[0] for layer in layers]
        self.out_total = sum(self.outs)
        rows = self.out_total + sum(self.ranks)
        with torch.no_grad():
            c = torch.zeros((rows, w0.shape[1]), dtype=w0.dtype, device=w0.device)
            biased = any(layer.base_layer.bias is not None for layer in layers)
            bias = torch.zeros(rows, dtype=w0.dtype, device=w0.device) if biased else None
            off = 0
            for layer, n in zip(layers, self.outs):
                base = layer.base_layer
                c[off:off + n].copy_(base.weight)
                if droppable is not None:
                    release_pages(base.weight, droppable)
                base.weight.data = c[off:off + n]
                if base.bias is not None:
                    bias[off:off + n].copy_(base.bias)
                    base.bias.data = bias[off:off + n]
                off += n
        self.c, self.bias = c, bias
        self.index = {id(layer): i for i, layer in enumerate(layers)}
        self.kept: dict | None = None

    def intact(self) -> bool:
        """Whether each layer's base weight (and bias) is still its block of C (``model.to(…)`` or a
        ``load_state_dict`` that assigns makes new tensors; an in-place copy keeps them)."""
        off = 0
        for layer, n in zip(self.layers, self.outs):
            base = layer.base_layer
            if base.bias is not None and self.bias is None:
                return False
            for t, whole, start in ((base.weight, self.c, off * self.c.stride(0)), (base.bias, self.bias, off)):
                if t is None:
                    continue
                if (t.dtype != whole.dtype or t.device != whole.device or t.shape[0] != n
                        or t.storage_offset() != start
                        or (t.device.type != "meta"
                            and t.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr())):
                    return False
            off += n
        return True

    def state(self) -> tuple:
        """What a kept output depends on besides its input: the buffer's and adapters' versions (in-place
        changes: an optimizer step, a merge) and each layer's adapter switches."""
        name = self.adapter
        return (self.c._version,) + tuple(
            (layer.lora_A[name].weight._version, layer.lora_B[name].weight._version, layer.disable_adapters,
             layer.merged, tuple(layer.active_adapters)) for layer in self.layers)

    def output(self, layer: Any, x: Any):
        """This layer's output for input ``x``: kept from the group's forward on the same ``x``, or the group's
        forward run now; None where the group does not apply (the caller runs the single layer)."""
        i = self.index[id(layer)]
        kept = self.kept
        if kept is not None and kept["x"] is x and kept["ys"][i] is not None and kept["state"] == self.state():
            y, kept["ys"][i] = kept["ys"][i], None
            if all(v is None for v in kept["ys"]):
                self.kept = None
            return y
        self.kept = None
        if not self._applies(x):
            return None
        name = self.adapter
        x2 = x.reshape(-1, x.shape[-1])
        ab = [layer.lora_A[name].weight for layer in self.layers] + [layer.lora_B[name].weight
                                                                  for layer in self.layers]
        meta = (tuple(self.outs), tuple(self.ranks), tuple(float(layer.scaling[name]) for layer in self.layers),
                getattr(layer, "_lowres_gemm", "torch"), self)
        ys = _build_group_function().apply(x2, meta, *ab)
        ys = [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]
        mine, ys[i] = ys[i], None
        self.kept = {"x": x, "ys": ys, "state": self.state()}
        return mine

    def _applies(self, x) -> bool:
        """Whether the single fused layer would run every sibling on ``x`` with the group's adapter and rank,
        and the weights are still C's."""
        import torch

        from lowres.train.speed import fused_adapter

        if torch.compiler.is_compiling() or x.dtype != self.c.dtype or x.device != self.c.device:
            return False
        name = self.adapter
        return all(fused_adapter(layer, x) == name and layer.lora_A[name].weight.shape[0] == r
                   for layer, r in zip(self.layers, self.ranks)) and self.intact()


class Droppable:
    """Where ``release_pages`` may drop pages: inside a file-backed mapping of this process (a checkpoint
    read with mmap: a dropped page is read again from the file if ever touched) and outside every other
    tensor of the model (``ranges``: [start, end) byte ranges of its parameters and buffers)."""

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges = ranges
        self.files = _file_mappings()

    def inside_a_file(self, lo: int, hi: int) -> bool:
        return any(start <= lo and hi <= end for start, end in self.files)

    def others_on(self, lo: int, hi: int) -> bool:
        """Whether a tensor besides the one these bytes belong to lies on them (or one tensor is held under two
        names: tied weights)."""
        return sum(start < hi and lo < end for start, end in self.ranges) > 1


def _file_mappings() -> list[tuple[int, int]]:
    """[start, end) of this process' mappings of regular files (``/proc/self/maps``: a non-zero inode); empty
    where it cannot be read."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[4] != "0" and parts[5].startswith("/"):
                    start, end = (int(v, 16) for v in parts[0].split("-"))
                    out.append((start, end))
    except OSError:
        return []
    return out


def _byte_range(t: Any) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def model_ranges(model: Any) -> list[tuple[int, int]]:
    """The byte ranges of ``model``'s CPU parameters and buffers, one per name: a tensor held under two names
    (tied weights) is there twice."""
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    return [_byte_range(t) for t in tensors if t is not None and t.device.type == "cpu" and t.numel()]


def release_pages(t: Any, droppable: Droppable) -> bool:
    """Drop the whole pages inside ``t``'s memory from this process (``madvise(MADV_DONTNEED)``; Linux, CPU) just
    before ``t`` is let go, where they lie in a mapped file and no other tensor of the model lies on them. A
    checkpoint loaded in its own dtype is a read-only map of the safetensors file that lives on while any of
    its tensors does (the embeddings, the other layers): the pages the copy into C read would stay resident
    beside C — the weights twice in the run's RSS. Heap memory is never dropped (its content would be lost
    for anyone else holding it); freeing it is malloc's business. True where pages were dropped."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() * t.element_size() < (64 << 10):
        return False
    page = 4096
    start, end = _byte_range(t)
    lo, hi = -(-start // page) * page, (end // page) * page
    if hi - lo < page or not droppable.inside_a_file(lo, hi) or droppable.others_on(lo, hi):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4) == 0
    except (OSError, AttributeError):
        return False


def group_siblings(model: Any) -> int:
    """Make a group of each set of sibling LoRA layers (``SIBLINGS``) in ``model`` that can share a buffer:
    at least two, each a peft LoRA Linear over a plain ``nn.Linear`` with one adapter, the same input width,
    dtype and device. Returns the number of layers grouped; their forward (lowres.train.speed's fused one)
    then asks the group first."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    droppable = Droppable(model_ranges(model))
    for parent in model.modules():
        for names in SIBLINGS:
            layers = [getattr(parent, k, None) for k in names]
            layers = [m for m in layers if type(m) is LoraLinear and getattr(m, "_lowres_group", None) is None]
            if len(layers) < 2 or not _groupable(layers) or _shared(layers, droppable):
                continue
            group = LoraGroup(layers, layers[0].active_adapters[0], droppable)
            for m in layers:
                m._lowres_group = group
            n += len(layers)
    return n


def _groupable(layers: list) -> bool:
    import torch

    first = layers[0].base_layer
    for m in layers:
        base = m.base_layer
        if (type(base) is not torch.nn.Linear or len(m.active_adapters) != 1
                or m.active_adapters[0] != layers[0].active_adapters[0] or m.active_adapters[0] not in m.lora_A
                or base.weight.shape[1] != first.weight.shape[1] or base.weight.dtype != first.weight.dtype
                or base.weight.device != first.weight.device or base.weight.requires_grad
                or base.weight.dtype not in (torch.float32, torch.bfloat16)):
            return False
    return True


def _shared(layers: list, droppable: Droppable) -> bool:
    """Whether a base weight's memory is also another parameter's or buffer's (weights tied across layers):
    moving it into a group's buffer would untie them."""
    return any(droppable.others_on(*_byte_range(m.base_layer.weight)) for m in layers
               if m.base_layer.weight.device.type == "cpu")


def ungroup(model: Any) -> int:
    """Give every grouped layer its own weight (and bias) tensor back and drop the groups; the number of layers
    changed."""
    n = 0
    for m in model.modules():
        group = getattr(m, "_lowres_group", None)
        if group is None:
            continue
        base = m.base_layer
        base.weight.data = base.weight.data.clone()
        if base.bias is not None:
            base.bias.data = base.bias.data.clone()
        m._lowres_group = None
        group.kept = None
        n += 1
    return n


@built_once
def _build_group_function():
    import torch

    from lowres.train.speed import _base_gemm, _rank_gemm

    class _LoraGroupFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x2, meta, *ab):
            outs, ranks, scalings, gemm, group = meta
            n = len(outs)
            a_s, b_s = ab[:n], ab[n:]
            c, total = group.c, group.out_total
            off = total
            for a, r in zip(a_s, ranks):
                c[off:off + r].copy_(a)  # cast to the compute dtype
                off += r
            y = _base_gemm(x2, c, group.bias, gemm)  # [tokens × (Σ out + Σ r)]
            h = y[:, total:].clone()  # the rank-r activations, saved apart: y's outputs need not live on
            ys, o, k = [], 0, 0
            for width, r, b, s in zip(outs, ranks, b_s, scalings):
                yi = y[:, o:o + width]
                yi.addmm_(h[:, k:k + r], b.to(x2.dtype).t(), alpha=s)
                ys.append(yi)
                o, k = o + width, k + r
            # C is a frozen buffer, not an activation: kept on ctx (its A-rows hold these A's until backward)
            ctx.save_for_backward(x2, h, *a_s, *b_s)
            ctx.meta = meta
            return tuple(ys)

        @staticmethod
        def backward(ctx, *gs):
            x2, h, *ab = ctx.saved_tensors
            outs, ranks, scalings, gemm, group = ctx.meta
            group.kept = None  # whatever a forward left unclaimed (a recompute stopped early) is not held on
            n = len(outs)
            a_s, b_s = ab[:n], ab[n:]
            want_x = ctx.needs_input_grad[0]
            want_a = [ctx.needs_input_grad[2 + i] for i in range(n)]
            want_b = [ctx.needs_input_grad[2 + n + i] for i in range(n)]
            c, total = group.c, group.out_total
            dh = x2.new_zeros((x2.shape[0], sum(ranks))) if (want_x or any(want_a)) else None
            dx, dbs = None, []
            o = k = 0
            for g, width, r, b, s, wb in zip(gs, outs, ranks, b_s, scalings, want_b):
                if g is None:  # this output was not used
                    dbs.append(torch.zeros_like(b) if wb else None)
                    o, k = o + width, k + r
                    continue
                g = g.contiguous()
                bc = b.to(x2.dtype)
                if dh is not None:
                    dh[:, k:k + r] = _rank_gemm(g, bc, gemm).mul_(s)
                dbs.append((h[:, k:k + r].t() @ g).mul_(s).t().contiguous().to(b.dtype) if wb else None)
                if want_x:
                    w = c[o:o + width]
                    if dx is None:
                        dx = _base_gemm(g, w.t(), None, gemm)  # g W
                    else:
                        dx.addmm_(g, w)
                o, k = o + width, k + r
            if want_x:
                if dx is None:
                    dx = x2.new_zeros(x2.shape)
                dx.addmm_(dh, c[total:])
            das = []
            if any(want_a):
                da = dh.t() @ x2  # every adapter's dA in one GEMM
                k = 0
                for a, r, wa in zip(a_s, ranks, want_a):
                    das.append(da[k:k + r].to(a.dtype) if wa else None)
                    k += r
            else:
                das = [None] * n
            return (dx if want_x else None), None, *das, *dbs

    return _LoraGroupFn
