"""Compression codecs for what travels between server and clients: pure functions over numpy arrays.

A codec turns ``{name: float32 array}`` into a few flat raw arrays whose buffers are exactly what goes on the
wire (Flower ``Array`` objects hold the raw bytes of a numpy array; nothing is pickled), and back.

    spec = parse_codec("topk10+int8")
    parts = encode(tensors, spec)    # {"names": utf-8, "shapes": int64, "idx": int32, "count", "q": int8, "vscale"}
    restored = decode(parts)         # {name: float32 array}, shapes as sent

Codecs (``parse_codec`` strings):

- ``none``: float32 as is. ``fp16``: half precision (relative error ≤ 2⁻¹¹ in the normal range).
- ``int8`` (per channel: one scale per slice along the rank axis, see ``channel_axis``) and ``int8t`` (one
  scale per tensor): symmetric
  ``q = round(x / s)``, ``s = max|x| / 127``, so every element is off by at most ``s / 2``.
- ``int4``: the same per channel with 15 levels (``s = max|x| / 7``), two values packed per byte: half the
  bytes of int8, 18× coarser steps. ``quantize(x, codec)`` is the round trip of the dense codecs, the quantiser
  QAT trains through (``lowres.federated.qat``): a tensor it returns is its own fixed point.
- ``topk<P>``: the P % largest-magnitude entries of each tensor as positions + values (never dense zeros:
  zeros in a dense tensor cost as much as any other value on the wire). Positions travel as int32 indices,
  or as a packed bitmask when that is smaller (more than 1/32 of the entries kept: 1 bit per entry beats
  32 bits per kept one). ``topk<P>+int8`` / ``+fp16`` quantise the values (int8: one scale per tensor).
- ``prune<P>``: magnitude pruning — the P % smallest entries of each tensor dropped, the survivors sent as a
  packed bitmask + values (fp16 by default, ``+int8``). The same wire format as a top-k that keeps 100−P %.

Error feedback (``ErrorFeedback``) keeps what a lossy codec dropped and adds it to the next update, so the
dropped mass is delayed rather than lost (Seide et al. 2014; Karimireddy et al. 2019, "EF-SGD").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

QAT_KINDS = ("int8", "int4")  # the codecs whose rounding QAT trains through (lowres.federated.qat)


@dataclass(frozen=True)
class Codec:
    """A parsed codec string: ``kind`` is none/fp16/int8/int4/topk/prune; ``fraction`` is what top-k keeps or what
    pruning drops (0..1); ``values`` is how sparse values travel (fp32/fp16/int8); ``per_channel`` for int8."""

    kind: str
    fraction: float = 0.0
    values: str = "fp32"
    per_channel: bool = True

    @property
    def lossy(self) -> bool:
        return self.kind != "none"

    def __str__(self) -> str:
        if self.kind in ("none", "fp16"):
            return self.kind
        if self.kind == "int8":
            return "int8" if self.per_channel else "int8t"
        if self.kind == "int4":
            return "int4"
        pct = f"{self.fraction * 100:g}"
        suffix = "" if self.values == ("fp16" if self.kind == "prune" else "fp32") else f"+{self.values}"
        return f"{self.kind}{pct}{suffix}"


_SPARSE = re.compile(r"^(topk|prune)(\d+(?:\.\d+)?)(?:\+(fp32|fp16|int8))?$")


def parse_codec(text: str) -> Codec:
    """``none`` · ``fp16`` · ``int8`` · ``int8t`` · ``int4`` · ``topk10`` · ``topk10+int8`` · ``prune50``; ValueError naming
    the accepted forms otherwise."""
    t = text.strip().lower()
    if t in ("none", "fp16"):
        return Codec(t)
    if t in ("int8", "int8t"):
        return Codec("int8", per_channel=t == "int8")
    if t == "int4":
        return Codec("int4")
    m = _SPARSE.match(t)
    if m:
        pct = float(m.group(2))
        if not 0 < pct < 100:
            raise ValueError(f"codec {text!r}: the percentage must be between 0 and 100 (exclusive)")
        kind = m.group(1)
        return Codec(kind, pct / 100, m.group(3) or ("fp16" if kind == "prune" else "fp32"))
    raise ValueError(f"unknown codec {text!r}; use none, fp16, int8 (per channel), int8t (per tensor), int4, "
                     "topk<percent>[+fp16|+int8] (e.g. topk10+int8) or prune<percent> (e.g. prune50)")


# ---------------------------------------------------------------------------------------------- int8
def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The axis int8 gets one scale per slice of: the shorter axis of a 2-D tensor — for LoRA the rank axis
    (rows of A ``(r, in)``, columns of B ``(out, r)``), whose slots have ranges of their own, at r scales a
    tensor rather than one per output feature. None (one scale) for other shapes."""
    if len(shape) != 2 or 0 in shape:
        return None
    return 0 if shape[0] <= shape[1] else 1


def _quantize_int8(x: np.ndarray, per_channel: bool, levels: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: (q, scale) with ``x ≈ q · scale``; per channel: one scale per slice (``channel_axis``).
    ``levels`` 7: the int4 grid (q in −7..7, still held in int8 until packed)."""
    axis = channel_axis(x.shape) if per_channel else None
    if axis is None:
        peak = np.array([np.abs(x).max() if x.size else 0.0])
    else:
        peak = np.abs(x).max(axis=1 - axis)
    scale = (peak / float(levels)).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)  # an all-zero slice: any scale decodes to zeros
    q = np.clip(np.rint(x / _broadcast(safe, axis)), -levels, levels).astype(np.int8)
    return q, scale


def _pack4(q: np.ndarray) -> np.ndarray:
    """int8 values in −7..7 → bytes holding two of them (q + 8, low nibble first)."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(8))
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def _unpack4(packed: np.ndarray, count: int) -> np.ndarray:
    u = np.empty(packed.size * 2, np.int16)
    u[0::2], u[1::2] = packed & 0x0F, packed >> 4
    return (u[:count] - 8).astype(np.int8)


def quantize(x: np.ndarray, codec: "Codec | str") -> np.ndarray:
    """``decode(encode({x}))`` of a dense codec without the wire: what the receiver gets for ``x``."""
    codec = parse_codec(codec) if isinstance(codec, str) else codec
    x = np.asarray(x, dtype=np.float32)
    if codec.kind == "none":
        return x
    if codec.kind == "fp16":
        return x.astype(np.float16).astype(np.float32)
    if codec.kind in ("int8", "int4"):
        q, s = _quantize_int8(x, codec.per_channel, 7 if codec.kind == "int4" else 127)
        return _dequantize_int8(q, s, codec.per_channel)
    raise ValueError(f"quantize: {codec} is not a dense codec (none, fp16, int8, int8t, int4)")


def _broadcast(scale: np.ndarray, axis: int | None) -> np.ndarray | np.floating:
    if axis is None:
        return scale[0]
    return scale[:, None] if axis == 0 else scale[None, :]


def _dequantize_int8(q: np.ndarray, scale: np.ndarray, per_channel: bool) -> np.ndarray:
    axis = channel_axis(q.shape) if per_channel else None
    return q.astype(np.float32) * _broadcast(scale, axis)


# ---------------------------------------------------------------------------------------------- encode/decode
# Every tensor's parts are concatenated into a handful of flat arrays (plus names and shapes), because
# Flower frames each Array as its own object with a few hundred bytes of header: one array per tensor per
# part would cost more than the compressed LoRA weights themselves.
def _pack_header(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for name in tensors:
        if "\n" in name:
            raise ValueError(f"tensor name {name!r} contains a newline, which the wire format reserves")
    names = np.frombuffer("\n".join(tensors).encode(), dtype=np.uint8)
    shapes = np.asarray([d for x in tensors.values() for d in (x.ndim, *x.shape)], dtype=np.int64)
    return {"names": names, "shapes": shapes}


def _read_header(parts: dict[str, np.ndarray], max_ndim: int = 8) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) per tensor from the names/shapes parts; ValueError on anything a codec did not write
    (bad UTF-8, repeated names, a shapes list too short or too long, negative sizes, > ``max_ndim`` axes)."""
    names_part, shapes_part = parts["names"], parts["shapes"]
    if names_part.dtype != np.uint8 or names_part.ndim != 1:
        raise ValueError(f"wire names are {names_part.dtype} {names_part.shape}, expected 1-D uint8")
    if shapes_part.dtype.kind not in "iu" or shapes_part.ndim != 1:
        raise ValueError(f"wire shapes are {shapes_part.dtype} {shapes_part.shape}, expected 1-D integers")
    names = names_part.tobytes().decode("utf-8").split("\n") if names_part.size else []
    if len(set(names)) != len(names):
        raise ValueError("wire names repeat a tensor name")
    dims, out, i = shapes_part.tolist(), [], 0
    for name in names:
        if i >= len(dims):
            raise ValueError(f"wire shapes end before tensor {name!r} ({len(dims)} numbers for {len(names)} names)")
        nd = dims[i]
        if not 0 <= nd <= max_ndim or i + 1 + nd > len(dims):
            raise ValueError(f"wire shapes: tensor {name!r} claims {nd} axes, with {len(dims) - i - 1} numbers left")
        shape = tuple(int(d) for d in dims[i + 1:i + 1 + nd])
        if any(d < 0 for d in shape):
            raise ValueError(f"wire shapes: tensor {name!r} has a negative size {shape}")
        out.append((name, shape))
        i += 1 + nd
    if i != len(dims):
        raise ValueError(f"wire shapes hold {len(dims) - i} numbers more than {len(names)} tensors need")
    return out


def _need(parts: dict[str, np.ndarray], key: str, dtypes: str | tuple[str, ...], size: int) -> np.ndarray:
    """Part ``key``: 1-D, of one of ``dtypes``, with exactly ``size`` elements; ValueError otherwise."""
    if key not in parts:
        raise ValueError(f"wire arrays lack part {key!r}")
    a = parts[key]
    dtypes = (dtypes,) if isinstance(dtypes, str) else dtypes
    if str(a.dtype) not in dtypes or a.ndim != 1:
        raise ValueError(f"wire part {key!r} is {a.dtype} {a.shape}, expected 1-D {'/'.join(dtypes)}")
    if a.size != size:
        raise ValueError(f"wire part {key!r} holds {a.size} values, expected {size}")
    return a


def _values_out(v: np.ndarray, how: str, sizes: list[int]) -> dict[str, np.ndarray]:
    """Sparse values of all tensors, one block per tensor, in fp32, fp16 or int8 (one scale per tensor)."""
    if how == "fp32":
        return {"v": v.astype(np.float32)}
    if how == "fp16":
        return {"h": v.astype(np.float16)}
    qs, scales, start = [], [], 0
    for n in sizes:
        q, s = _quantize_int8(v[start:start + n], per_channel=False)
        qs.append(q)
        scales.append(s)
        start += n
    return {"q": np.concatenate(qs) if qs else np.zeros(0, np.int8),
            "vscale": np.concatenate(scales) if scales else np.zeros(0, np.float32)}


def _values_in(parts: dict[str, np.ndarray], sizes: list[int]) -> list[np.ndarray]:
    total = sum(sizes)
    if "v" in parts or "h" in parts:
        flat = _need(parts, "v", "float32", total) if "v" in parts else _need(parts, "h", "float16", total)
        flat = flat.astype(np.float32)
        return np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []
    q = _need(parts, "q", "int8", total)
    vscale = _need(parts, "vscale", "float32", len(sizes))
    blocks = np.split(q, np.cumsum(sizes)[:-1]) if sizes else []
    return [b.astype(np.float32) * s for b, s in zip(blocks, vscale)]


def encode(tensors: dict[str, np.ndarray], codec: Codec | str) -> dict[str, np.ndarray]:
    """``{name: float array}`` → a few flat wire arrays (see the module docstring for the codecs)."""
    codec = parse_codec(codec) if isinstance(codec, str) else codec
    xs = {n: np.asarray(x, dtype=np.float32) for n, x in tensors.items()}  # (ascontiguousarray makes 0-d 1-d)
    out = _pack_header(xs)
    flats = [x.reshape(-1) for x in xs.values()]
    cat = np.concatenate(flats) if flats else np.zeros(0, np.float32)
    if codec.kind == "none":
        return {**out, "f32": cat}
    if codec.kind == "fp16":
        return {**out, "f16": cat.astype(np.float16)}
    if codec.kind == "int8":
        pairs = [_quantize_int8(x, codec.per_channel) for x in xs.values()]
        return {**out, "i8": np.concatenate([q.reshape(-1) for q, _ in pairs]) if pairs else np.zeros(0, np.int8),
                "scale": np.concatenate([s for _, s in pairs]) if pairs else np.zeros(0, np.float32),
                "perchan": np.asarray([int(codec.per_channel)], np.uint8)}
    if codec.kind == "int4":
        pairs = [_quantize_int8(x, True, 7) for x in xs.values()]
        q = np.concatenate([q.reshape(-1) for q, _ in pairs]) if pairs else np.zeros(0, np.int8)
        return {**out, "i4": _pack4(q), "scale": np.concatenate([s for _, s in pairs]) if pairs else np.zeros(0, np.float32)}
    if codec.kind == "topk":
        idxs, vals = [], []
        for flat in flats:
            k = max(1, int(round(codec.fraction * flat.size))) if flat.size else 0
            idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:] if k else np.zeros(0, np.int64)
            idx = np.sort(idx).astype(np.int32)  # int32: tensors of up to 2³¹ entries; sorted: in-order writes
            idxs.append(idx)
            vals.append(flat[idx])
        sizes = [len(i) for i in idxs]
        values = _values_out(np.concatenate(vals) if vals else cat, codec.values, sizes)
        if 4 * sum(sizes) > (cat.size + 7) // 8:
            # More than 1/32 of the entries kept: a bitmask of positions (1 bit per entry) is smaller than
            # int32 indices (32 bits per kept entry). The values are the same, in the same (ascending) order.
            mask = np.zeros(cat.size, dtype=bool)
            offset = 0
            for flat, idx in zip(flats, idxs):
                mask[offset + idx] = True
                offset += flat.size
            return {**out, "mask": np.packbits(mask), **values}
        return {**out, "idx": np.concatenate(idxs) if idxs else np.zeros(0, np.int32),
                "count": np.asarray(sizes, np.int32), **values}
    if codec.kind == "prune":
        keeps = []
        for flat in flats:
            keep = np.ones(flat.size, dtype=bool)
            drop = int(round(codec.fraction * flat.size))
            if drop:
                keep[np.argpartition(np.abs(flat), drop - 1)[:drop]] = False
            keeps.append(keep)
        mask = np.concatenate(keeps) if keeps else np.zeros(0, bool)
        sizes = [int(k.sum()) for k in keeps]
        return {**out, "mask": np.packbits(mask), **_values_out(cat[mask], codec.values, sizes)}
    raise ValueError(f"unknown codec kind {codec.kind!r}")


def decode(parts: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]] | None = None,
           max_elements: int | None = None) -> dict[str, np.ndarray]:
    """Wire arrays from any codec (the part names say which) → ``{name: float32 array}`` in the sent shapes.

    Everything is checked before anything is allocated from it: the header (names, shapes) must parse, match
    ``expected`` (``{name: shape}``, what the receiver asked for) when given and total at most
    ``max_elements``; every part must have the dtype and length the header implies; top-k positions must lie
    inside their tensor. ValueError says what did not fit."""
    if "names" not in parts or "shapes" not in parts:
        raise ValueError(f"wire arrays {sorted(parts)} lack names/shapes: not written by lowres' codecs")
    header = _read_header(parts)
    if expected is not None:
        got = dict(header)
        if set(got) != set(expected):
            missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
            raise ValueError(f"tensor names differ (missing {missing[:2]}, unexpected {extra[:2]})")
        for n, shape in got.items():
            if shape != tuple(expected[n]):
                raise ValueError(f"{n}: shape {shape}, expected {tuple(expected[n])}")
    sizes = [math.prod(s) for _, s in header]
    total = sum(sizes)
    if max_elements is not None and total > max_elements:
        raise ValueError(f"wire header claims {total} elements, more than the {max_elements} allowed")
    bounds = np.cumsum(sizes)[:-1] if sizes else []
    if "i4" in parts:
        q = _unpack4(_need(parts, "i4", "uint8", (total + 1) // 2), total)
        axes = [channel_axis(s) for _, s in header]
        nscales = [1 if ax is None else s[ax] for ax, (_, s) in zip(axes, header)]
        scales = _need(parts, "scale", "float32", sum(nscales))
        out, si = {}, 0
        for (n, s), b, ns in zip(header, np.split(q, bounds), nscales):
            out[n] = _dequantize_int8(b.reshape(s), scales[si:si + ns], True)
            si += ns
        return out
    if "f32" in parts or "f16" in parts or "i8" in parts:
        key, dtype = next((k, d) for k, d in (("f32", "float32"), ("f16", "float16"), ("i8", "int8")) if k in parts)
        flat = _need(parts, key, dtype, total)
        if key != "i8":
            blocks = np.split(flat, bounds)
            return {n: b.astype(np.float32).reshape(s) for (n, s), b in zip(header, blocks)}
        perchan = _need(parts, "perchan", "uint8", 1)
        per_channel = bool(perchan[0])
        axes = [channel_axis(s) if per_channel else None for _, s in header]
        nscales = [1 if ax is None else s[ax] for ax, (_, s) in zip(axes, header)]
        scales = _need(parts, "scale", "float32", sum(nscales))
        blocks = np.split(flat, bounds)
        out, si = {}, 0
        for (n, s), b, ns in zip(header, blocks, nscales):
            out[n] = _dequantize_int8(b.reshape(s), scales[si:si + ns], per_channel)
            si += ns
        return out
    if "idx" in parts:
        counts_part = _need(parts, "count", ("int32", "int64"), len(header))
        counts = counts_part.tolist()
        if any(not 0 <= c <= size for c, size in zip(counts, sizes)):
            raise ValueError("wire top-k counts exceed their tensors' sizes")
        idx_all = _need(parts, "idx", ("int32", "int64"), sum(counts))
        idxs = np.split(idx_all.astype(np.int64), np.cumsum(counts)[:-1]) if counts else []
        for (n, s), size, idx in zip(header, sizes, idxs):
            if idx.size and (idx.min() < 0 or idx.max() >= size):
                raise ValueError(f"{n}: top-k index out of range for shape {s}")
        vals = _values_in(parts, counts)
        out = {}
        for (n, s), size, idx, v in zip(header, sizes, idxs, vals):
            dense = np.zeros(size, np.float32)
            dense[idx] = v
            out[n] = dense.reshape(s)
        return out
    if "mask" in parts:
        packed = _need(parts, "mask", "uint8", (total + 7) // 8)
        mask = np.unpackbits(packed, count=total).astype(bool)
        keeps = np.split(mask, bounds) if sizes else []
        vals = _values_in(parts, [int(k.sum()) for k in keeps])
        out = {}
        for (n, s), keep, v in zip(header, keeps, vals):
            dense = np.zeros(keep.size, np.float32)
            dense[keep] = v
            out[n] = dense.reshape(s)
        return out
    raise ValueError(f"wire arrays {sorted(parts)} match no codec")


def payload_bytes(parts: dict[str, np.ndarray]) -> int:
    """Bytes of the raw array buffers alone (what the codec controls; the wire adds a small header each)."""
    return sum(int(a.nbytes) for a in parts.values())


class ErrorFeedback:
    """Per-client residual of a lossy codec: ``send = C(x + r)``, ``r ← (x + r) − D(send)``.

    Lives where the client lives (in the client process' cache); a client that restarts starts from zero,
    which only delays the dropped mass of the rounds it lost."""

    def __init__(self) -> None:
        self.residual: dict[str, np.ndarray] = {}

    def encode(self, tensors: dict[str, np.ndarray], codec: Codec) -> dict[str, np.ndarray]:
        """Encode ``tensors`` plus the carried residual; keep the new residual."""
        corrected = {n: x + self.residual[n] if n in self.residual and self.residual[n].shape == x.shape else x
                     for n, x in tensors.items()}
        parts = encode(corrected, codec)
        sent = decode(parts)
        self.residual = {n: corrected[n] - sent[n] for n in corrected}
        return parts
