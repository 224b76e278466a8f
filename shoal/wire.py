"""Packing tensors into the wire's ``Tensor`` message and back, without per-element work.

Unpacking is zero-copy: the returned array is a read-only view of the message's bytes.
"""
from __future__ import annotations

import numpy as np

from shoal.errors import InvalidArgument
from shoal.proto import shoal_pb2 as pb

ALLOWED_DTYPES = ("int64", "int32", "float32", "float16")


def pack(array, dtype: str | None = None) -> pb.Tensor:
    """numpy array (or torch tensor) -> Tensor message, little-endian C order."""
    if hasattr(array, "detach"):  # torch.Tensor without importing torch here
        array = array.detach().cpu().numpy()
    a = np.asarray(array)
    if dtype is not None and a.dtype != np.dtype(dtype):
        a = a.astype(dtype)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return pb.Tensor(dtype=a.dtype.name, shape=a.shape, data=a.tobytes())


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def serialize_with_tensor(msg, field_number: int, array: np.ndarray) -> bytes:
    """``msg`` serialised with ``array`` as a Tensor in its field ``field_number`` (which
    ``msg`` leaves unset), the array's bytes copied once (``pack`` then ``SerializeToString``
    copy them three times): protobuf fields may come in any order, so the Tensor's encoding
    is appended to the rest of the message's."""
    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    head = pb.Tensor(dtype=a.dtype.name, shape=a.shape).SerializeToString()
    data = b"\x1a" + _varint(a.nbytes)                         # field 3 (data), bytes
    sub = len(head) + len(data) + a.nbytes
    return b"".join([msg.SerializeToString(), _varint(field_number << 3 | 2), _varint(sub),
                     head, data, memoryview(a.reshape(-1).view(np.uint8))])


def unpack(t: pb.Tensor, field: str, dtype: str | tuple[str, ...] | None = None,
           ndim: int | None = None) -> np.ndarray:
    """Tensor message -> read-only numpy view; InvalidArgument naming ``field`` if malformed."""
    if t.dtype not in ALLOWED_DTYPES:
        raise InvalidArgument(f"{field}: dtype {t.dtype!r} is not supported (allowed: "
                              f"{', '.join(ALLOWED_DTYPES)})")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, str) else dtype
        if t.dtype not in allowed:
            raise InvalidArgument(f"{field}: dtype is {t.dtype}, expected {' or '.join(allowed)}")
    shape = tuple(int(s) for s in t.shape)
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(f"{field}: shape {list(shape)} has {len(shape)} dimensions, "
                              f"expected {ndim}")
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"{field}: shape {list(shape)} has a negative dimension")
    dt = np.dtype(t.dtype).newbyteorder("<")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    data = t.data                # each access to a bytes field copies it: take it once
    if count * dt.itemsize != len(data):
        raise InvalidArgument(f"{field}: {len(data)} bytes do not match shape {list(shape)} "
                              f"of {t.dtype} ({count * dt.itemsize} bytes)")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def is_set(t: pb.Tensor) -> bool:
    """True when an optional Tensor field was filled in."""
    return bool(t.dtype)
