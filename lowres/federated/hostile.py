"""Crafted client replies against the real server loop: what tests/test_fed_hostile.py and bench/hostile_fed.py feed.

    grid = HostileGrid(client_app, honest=3, crafted=list(CRAFTED))   # 3 real clients + one node per craft
    result = run_federation(grid, fed, prep=prep)
    grid.honest_mean(1), grid.server_windows                          # what the honest sent; server memory

Honest nodes run the real ClientApp (as ``LocalGrid``); each hostile node answers every message with one
crafted reply, built from an honest reply of the same round (so a poison has a plausible size and norm),
and every reply crosses the same serialise/parse "wire" as the honest ones. ``server_windows`` holds, per
message exchange, the server's own work between a reply batch and its next message: the rise in RSS and the
tracemalloc peak (numpy reports its buffers to tracemalloc, so an allocation driven by a claimed size shows
even if its pages are never touched).
"""

from __future__ import annotations

import math
import tracemalloc
from typing import Any, Callable

import numpy as np

from lowres.federated.compression import decode, encode
from lowres.federated.local_grid import LocalGrid, through_wire
from lowres.federated.wire import ARRAYS_KEY, METRICS_KEY, from_arrayrecord, to_arrayrecord

Parts = dict[str, np.ndarray]


def _npy(dtype: str, shape: tuple, body: bytes, pad_header_to: int = 0) -> bytes:
    """A hand-written .npy: a header saying (dtype, shape) followed by ``body``, whatever its length."""
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape!r}, }}"
    header = header.ljust(max(pad_header_to, len(header) + 1)) + "\n"
    if len(header) < 65536:
        return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + body
    return b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header.encode("latin1") + body


def _raw_array(dtype: str, shape: tuple, body: bytes, pad_header_to: int = 0):
    from flwr.app import Array

    return Array(dtype=dtype, shape=tuple(int(min(d, 2 ** 62)) for d in shape), stype="numpy.ndarray",
                 data=_npy(dtype, shape, body, pad_header_to))


def _with(parts: Parts, **changes: np.ndarray) -> Parts:
    return {**{k: np.array(v) for k, v in parts.items()}, **changes}


def _header(tensors: dict[str, tuple[int, ...]]) -> Parts:
    names = np.frombuffer("\n".join(tensors).encode(), np.uint8)
    return {"names": names, "shapes": np.asarray([d for s in tensors.values() for d in (len(s), *s)], np.int64)}


def _claimed(parts: Parts, shape: tuple[int, ...]) -> Parts:
    """The honest header with its first tensor's shape replaced by ``shape`` (every name as expected)."""
    shapes = {n: x.shape for n, x in decode(parts).items()}
    shapes[next(iter(shapes))] = shape
    return _header(shapes)


# ---------------------------------------------------------------------------------------------- crafts
# Each craft: (honest parts "none" codec, honest metrics, honest mean delta) → (arrays record or None,
# metrics dict or None). None leaves that record out of the reply.
def _nan(p, m, mean):
    f = p["f32"].copy()
    f[::7] = np.nan
    return to_arrayrecord(_with(p, f32=f)), m


def _inf(p, m, mean):
    f = p["f32"].copy()
    f[::5] = np.inf
    return to_arrayrecord(_with(p, f32=f)), m


def _wrong_rank_shapes(p, m, mean):
    d = decode(p)
    big = {n: (np.concatenate([x, x]) if "lora_A" in n else np.concatenate([x, x], axis=1)) for n, x in d.items()}
    return to_arrayrecord(encode(big, "none")), m


def _claims_1e12(p, m, mean):
    return to_arrayrecord({**_claimed(p, (1_000_000, 1_000_000)), "f32": np.ones(16, np.float32)}), m


def _shape_1x2e8_topk(p, m, mean):
    n = len(decode(p))
    parts = {**_claimed(p, (1, 200_000_000)), "idx": np.array([0, 199_999_999] + [0] * (n - 1), np.int32),
             "count": np.array([2] + [1] * (n - 1), np.int32), "v": np.ones(n + 1, np.float32)}
    return to_arrayrecord(parts), m


def _shape_1x2e8_mask(p, m, mean):
    parts = {**_claimed(p, (1, 200_000_000)), "mask": np.full(256, 255, np.uint8),
             "h": np.ones(2048, np.float16)}
    return to_arrayrecord(parts), m


def _short_shapes(p, m, mean):
    return to_arrayrecord(_with(p, shapes=p["shapes"][: len(p["shapes"]) // 2].copy())), m


def _shapes_claim_many_axes(p, m, mean):
    return to_arrayrecord(_with(p, shapes=np.array([10 ** 9, 1, 2], np.int64))), m


def _oversized_names(p, m, mean):
    names = np.frombuffer(("\n".join(f"t{i}" for i in range(300_000))).encode(), np.uint8)
    return to_arrayrecord(_with(p, names=names)), m


def _bad_utf8_names(p, m, mean):
    return to_arrayrecord(_with(p, names=np.full(8, 0xFF, np.uint8))), m


def _lying_npy_header(p, m, mean):
    from flwr.app import ArrayRecord

    record = to_arrayrecord({k: v for k, v in p.items() if k != "f32"})
    record["f32"] = _raw_array("<f2", (1, 200_000_000), b"\0" * 2048)
    assert isinstance(record, ArrayRecord)
    return record, m


def _oversized_npy_header(p, m, mean):
    record = to_arrayrecord({k: v for k, v in p.items() if k != "f32"})
    record["f32"] = _raw_array("<f4", p["f32"].shape, p["f32"].tobytes(), pad_header_to=200_000)
    return record, m


def _float64_values(p, m, mean):
    return to_arrayrecord(_with(p, f32=p["f32"].astype(np.float64))), m


def _complex_values(p, m, mean):
    from flwr.app import Array

    record = to_arrayrecord({k: v for k, v in p.items() if k != "f32"})
    record["f32"] = Array(p["f32"].astype(np.complex64))
    return record, m


def _object_dtype(p, m, mean):
    record = to_arrayrecord({k: v for k, v in p.items() if k != "f32"})
    record["f32"] = _raw_array("|O", (4,), b"\x80\x04N." * 8)  # a pickle: must never be loaded
    return record, m


def _truncated_values(p, m, mean):
    return to_arrayrecord(_with(p, f32=p["f32"][: p["f32"].size // 2].copy())), m


def _topk_index_out_of_range(p, m, mean):
    d = decode(p)
    parts = encode(d, "topk1")
    idx = parts["idx"].copy()
    idx[0] = np.iinfo(np.int32).max
    return to_arrayrecord(_with(parts, idx=idx)), m


def _extra_tensor(p, m, mean):
    d = decode(p)
    d["base_model.model.lm_head.weight"] = np.zeros((4, 4), np.float32)
    return to_arrayrecord(encode(d, "none")), m


def _missing_tensor(p, m, mean):
    d = decode(p)
    d.pop(next(iter(d)))
    return to_arrayrecord(encode(d, "none")), m


def _huge_norm(p, m, mean):
    return to_arrayrecord(encode({n: -1000.0 * x for n, x in mean.items()}, "none")), m


def _num_examples(value: Any, flip: bool = False) -> Callable:
    def craft(p, m, mean):
        arrays = to_arrayrecord(encode({n: -x for n, x in mean.items()}, "none")) if flip else to_arrayrecord(p)
        return arrays, {**m, "num_examples": value}
    return craft


def _claims_other_rank(p, m, mean):
    return to_arrayrecord(p), {**m, "rank": 64.0}


def _missing_metrics(p, m, mean):
    return to_arrayrecord(p), None


def _missing_num_examples(p, m, mean):
    return to_arrayrecord(p), {k: v for k, v in m.items() if k != "num_examples"}


def _missing_arrays(p, m, mean):
    return None, m


def _error_reply(p, m, mean):
    return "error", None


CRAFTED: dict[str, Callable] = {
    "nan_values": _nan,
    "inf_values": _inf,
    "wrong_shapes_rank_16": _wrong_rank_shapes,
    "header_claims_1e12_elements": _claims_1e12,
    "topk_shape_1x2e8_in_2kB": _shape_1x2e8_topk,
    "mask_shape_1x2e8_in_2kB": _shape_1x2e8_mask,
    "short_shapes_header": _short_shapes,
    "shapes_claim_1e9_axes": _shapes_claim_many_axes,
    "oversized_names_header": _oversized_names,
    "names_not_utf8": _bad_utf8_names,
    "npy_header_claims_1x2e8": _lying_npy_header,
    "oversized_npy_header": _oversized_npy_header,
    "float64_values": _float64_values,
    "complex_values": _complex_values,
    "object_dtype_pickle": _object_dtype,
    "truncated_values": _truncated_values,
    "topk_index_out_of_range": _topk_index_out_of_range,
    "extra_tensor": _extra_tensor,
    "missing_tensor": _missing_tensor,
    "huge_norm_flipped": _huge_norm,
    "num_examples_1e9_flipped": _num_examples(1e9, flip=True),
    "num_examples_inf": _num_examples(math.inf),
    "num_examples_nan": _num_examples(math.nan),
    "num_examples_negative": _num_examples(-50.0),
    "num_examples_zero": _num_examples(0.0),
    "num_examples_list": _num_examples([1e9, 1e9]),
    "claims_rank_64": _claims_other_rank,
    "missing_metrics_record": _missing_metrics,
    "missing_num_examples": _missing_num_examples,
    "missing_arrays_record": _missing_arrays,
    "error_reply": _error_reply,
}
# crafted answers to the identity query: the node must stay unknown (never sampled), the round unharmed
CRAFTED_IDENTITY: dict[str, dict | None] = {
    "identity_missing_metrics": None,
    "identity_rank_1e9": {"partition_id": -1.0, "rank": 1e9},
    "identity_rank_nan": {"partition_id": -1.0, "rank": math.nan},
    "identity_partition_fraction": {"partition_id": 0.5, "rank": 8.0},
}
# crafted answers to the final federated eval (these nodes fail their train rounds with an error reply);
# every other hostile node answers the eval as the honest template does, so a crash is the craft's own
CRAFTED_EVAL: dict[str, dict | None] = {
    "eval_missing_metrics": None,
    "eval_num_examples_inf": {"num_examples": math.inf, "eval_loss": 0.0},
    "eval_loss_list": {"num_examples": 10.0, "eval_loss": [1.0, 2.0]},
}


class HostileGrid(LocalGrid):
    """``honest`` real clients, then one node per name in ``crafted`` (keys of CRAFTED, CRAFTED_IDENTITY or
    CRAFTED_EVAL)."""

    def __init__(self, client_app: Any, honest: int, crafted: list[str], **kw: Any):
        super().__init__(client_app, honest + len(crafted), **kw)
        self.honest = honest
        self.crafted = {self.nodes[honest + i]: name for i, name in enumerate(crafted)}
        self.honest_updates: list[list[tuple[dict[str, np.ndarray], float]]] = []  # per train exchange
        self.server_windows: list[dict[str, float]] = []
        self._window_start: float | None = None

    def _close_window(self) -> None:
        import psutil

        if self._window_start is None:
            return
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rise = psutil.Process().memory_info().rss - self._window_start
        self.server_windows.append({"rss_rise_bytes": float(rise), "traced_peak_bytes": float(peak)})
        self._window_start = None

    def _open_window(self) -> None:
        import psutil

        self._window_start = psutil.Process().memory_info().rss
        tracemalloc.start()

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message, MetricRecord, RecordDict

        self._close_window()
        messages = list(messages)
        honest = [m for m in messages if m.metadata.dst_node_id not in self.crafted]
        hostile = [m for m in messages if m.metadata.dst_node_id in self.crafted]
        replies = super().send_and_receive(honest, timeout=timeout)
        kind = messages[0].metadata.message_type if messages else ""
        template = next((r for r in replies if not r.has_error()), None)
        mean = None
        if kind == "train" and template is not None:
            got = []
            for r in replies:
                if not r.has_error():
                    delta = decode(from_arrayrecord(r.content[ARRAYS_KEY]))
                    got.append((delta, float(r.content[METRICS_KEY]["num_examples"])))
            self.honest_updates.append(got)
            total = sum(w for _, w in got)
            mean = {n: sum(w * d[n] for d, w in got) / total for n in got[0][0]}
        for msg in hostile:
            name = self.crafted[msg.metadata.dst_node_id]
            content: Any
            if kind == "query":
                if name in CRAFTED_IDENTITY:
                    metrics = CRAFTED_IDENTITY[name]
                    content = RecordDict({} if metrics is None else {METRICS_KEY: MetricRecord(metrics)})
                else:  # a train craft identifies itself as the honest nodes do
                    content = RecordDict({METRICS_KEY: MetricRecord({"partition_id": -1.0, **_rank_of(template)})})
            elif kind == "train" and name in CRAFTED_EVAL:
                replies.append(Message(Error(code=0, reason="crafted error"), reply_to=msg))
                continue
            elif kind == "evaluate" and name in CRAFTED_EVAL:
                metrics = CRAFTED_EVAL[name]
                content = RecordDict({} if metrics is None else {METRICS_KEY: MetricRecord(metrics)})
            elif kind == "evaluate" and template is not None:  # as the honest do: only the craft above differs
                content = RecordDict({METRICS_KEY: MetricRecord(dict(template.content[METRICS_KEY]))})
            elif kind == "train" and template is not None and name in CRAFTED:
                parts = encode(decode(from_arrayrecord(template.content[ARRAYS_KEY])), "none")
                metrics = {k: v for k, v in dict(template.content[METRICS_KEY]).items()}
                arrays, metrics = CRAFTED[name](parts, metrics, mean)
                if arrays == "error":
                    replies.append(Message(Error(code=0, reason="crafted error"), reply_to=msg))
                    continue
                records: dict = {}
                if arrays is not None:
                    records[ARRAYS_KEY] = arrays
                if metrics is not None:
                    records[METRICS_KEY] = MetricRecord(metrics)
                content = RecordDict(records)
            else:  # no honest reply to copy from: an empty answer
                content = RecordDict({})
            reply, _ = through_wire(Message(content, reply_to=msg), reply=True)
            replies.append(reply)
        self._open_window()
        return replies

    def finish(self) -> None:
        """Close the last measuring window (call after run_federation returns)."""
        self._close_window()

    def honest_mean(self, exchange: int) -> dict[str, np.ndarray]:
        """The sample-weighted mean of the honest updates of the ``exchange``-th train exchange (0-based)."""
        got = self.honest_updates[exchange]
        total = sum(w for _, w in got)
        return {n: sum(w * d[n].astype(np.float64) for d, w in got) / total for n in got[0][0]}


def _rank_of(template: Any) -> dict[str, float]:
    if template is None or METRICS_KEY not in template.content:
        return {"rank": 8.0}
    return {"rank": float(template.content[METRICS_KEY].get("rank", 8.0))}


def cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Cosine similarity of two tensor dicts as flat vectors (0 when either is all zeros)."""
    x = np.concatenate([np.asarray(a[n], np.float64).ravel() for n in sorted(a)])
    y = np.concatenate([np.asarray(b[n], np.float64).ravel() for n in sorted(a)])
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / den) if den > 0 else 0.0

