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

import io
import math

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


# what a codec part may be: plain numbers, never objects (np.load would refuse pickles anyway)
WIRE_DTYPES = frozenset({"float32", "float16", "int8", "int32", "int64", "uint8"})


def from_arrayrecord(record, max_elements: int | None = None) -> dict[str, np.ndarray]:
    """An ArrayRecord written by ``to_arrayrecord`` → codec parts (read-only views on the received bytes).

    Nothing is allocated from what a header claims: each array's ``.npy`` header is parsed, its dtype must be
    one of ``WIRE_DTYPES`` and its shape must account for exactly the bytes that came, and no array may claim
    more than ``max_elements`` elements — else ValueError. (Flower's ``Array.numpy`` would allocate whatever
    count the header claims before finding the data short: 2 kB claiming (1, 2e8) took 382 MiB.)"""
    from flwr.app import ArrayRecord

    if not isinstance(record, ArrayRecord):
        raise ValueError(f"expected an ArrayRecord, got {type(record).__name__}")
    return {str(key): array_to_numpy(arr, str(key), max_elements) for key, arr in record.items()}


def array_to_numpy(arr, key: str = "array", max_elements: int | None = None) -> np.ndarray:
    """One Flower ``Array`` → numpy, checking its ``.npy`` header against its bytes first (see above)."""
    from numpy.lib import format as npy

    if getattr(arr, "stype", None) != "numpy.ndarray" or not isinstance(getattr(arr, "data", None), bytes):
        raise ValueError(f"wire array {key!r}: serialisation {getattr(arr, 'stype', None)!r} is not numpy.ndarray")
    data = arr.data
    buf = io.BytesIO(data)
    try:
        major, _ = npy.read_magic(buf)
        read = npy.read_array_header_1_0 if major == 1 else npy.read_array_header_2_0
        shape, fortran, dtype = read(buf, max_header_size=4096)
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        raise ValueError(f"wire array {key!r}: bad .npy header ({exc})") from None
    if dtype.hasobject or str(dtype) not in WIRE_DTYPES or dtype.byteorder == ">":
        raise ValueError(f"wire array {key!r}: dtype {dtype} is not one of {sorted(WIRE_DTYPES)}")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"wire array {key!r}: shape {shape} is not a tuple of sizes")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise ValueError(f"wire array {key!r}: shape {shape} claims {count} elements, more than the "
                         f"{max_elements} this message can hold")
    if count * dtype.itemsize != len(data) - buf.tell():
        raise ValueError(f"wire array {key!r}: shape {shape} of {dtype} needs {count * dtype.itemsize} bytes, "
                         f"{len(data) - buf.tell()} came")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


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
