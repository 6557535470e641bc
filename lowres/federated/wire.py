"""Between codec arrays and Flower records, and the exact bytes a message's content takes on the wire.

Flower 1.41 moves a message as a tree of content-addressed objects (RecordDict → ArrayRecord → Array →
ArrayChunk …); each is serialised by its ``deflate()`` and pushed or pulled once per transfer. The bytes of
a message's content are therefore the sum of ``len(obj.deflate())`` over the distinct objects of its
RecordDict — what ``content_bytes`` returns. Flower's own per-run counters (``flwr list --format json``)
also count the message envelope and the RPC requests around the objects, and the SuperLink stores objects by
content hash, so an object identical in several replies (e.g. the tensor-names header) crosses once: they
agree with ours within about 1 % (tests/test_fed_deployment.py checks it).
"""

from __future__ import annotations

import numpy as np

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"


def to_arrayrecord(parts: dict[str, np.ndarray]):
    """Codec parts → an ArrayRecord of raw numpy buffers (dtype and shape travel with each; no pickle)."""
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord()
    for key, arr in parts.items():
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"wire array {key!r} has dtype {arr.dtype}, which Flower cannot carry")
        record[key] = Array(np.ascontiguousarray(arr))
    return record


def from_arrayrecord(record) -> dict[str, np.ndarray]:
    """An ArrayRecord written by ``to_arrayrecord`` → codec parts."""
    return {key: arr.numpy() for key, arr in record.items()}


def content_bytes(content) -> int:
    """Exact serialised bytes of a RecordDict (or any Flower inflatable object) and everything it holds."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def state_to_numpy(state: dict) -> dict[str, np.ndarray]:
    """A torch state dict (e.g. peft's LoRA weights) → float32 numpy arrays.

    float32 on purpose: ArrayRecord refuses bf16, and the codec decides what precision travels."""
    return {k: v.detach().to("cpu").float().numpy().copy() for k, v in state.items()}


def numpy_to_state(arrays: dict[str, np.ndarray], like: dict) -> dict:
    """numpy arrays → torch tensors in the dtype of the matching tensor of ``like``."""
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(a)).to(like[k].dtype if k in like else torch.float32)
            for k, a in arrays.items()}
