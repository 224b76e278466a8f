"""Packing tensors into the wire's ``Tensor`` message and back, without per-element work.

Unpacking is zero-copy: the returned array is a read-only view of the message's bytes.
"""
from __future__ import annotations

import math

import numpy as np

from shoal.errors import InvalidArgument
from shoal.proto import shoal_pb2 as pb

ALLOWED_DTYPES = ("int64", "int32", "float32", "float16", "bfloat16")
# bfloat16 travels as its 16-bit patterns; numpy has no bfloat16, so its views are uint16
# (``to_torch`` makes them bfloat16 again), and a numpy uint16 array is packed as bfloat16:
# Shoal has no other 16-bit integers.
_NP_WIRE = {"bfloat16": "uint16"}


_NAMES = {np.dtype(n): n for n in ("int64", "int32", "float32", "float16")}
_NAMES[np.dtype("uint16")] = "bfloat16"
# Little-endian numpy dtype of each wire dtype (looked up, not built, per message).
_DTYPES = {n: np.dtype(_NP_WIRE.get(n, n)).newbyteorder("<") for n in ALLOWED_DTYPES}


def _wire_name(a: np.ndarray) -> str:
    name = _NAMES.get(a.dtype)
    return name if name is not None else a.dtype.name


def pack(array, dtype: str | None = None) -> pb.Tensor:
    """numpy array (or torch tensor, bfloat16 included) -> Tensor message, little-endian C
    order."""
    name = None
    if hasattr(array, "detach"):  # torch.Tensor without importing torch here
        t = array.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import torch
            if dtype in (None, "bfloat16"):
                t, name, dtype = t.view(torch.int16), "bfloat16", None
            else:
                t = t.float()
        array = t.numpy()
    a = np.asarray(array)
    if dtype is not None and a.dtype != np.dtype(dtype):
        a = a.astype(dtype)
    a = _little_endian_c(a)
    return pb.Tensor(dtype=name or _wire_name(a), shape=a.shape, data=a.tobytes())


def to_torch(t: pb.Tensor, field: str, dtype: str | tuple[str, ...] | None = None,
             ndim: int | None = None):
    """Tensor message -> torch tensor viewing the message's bytes (read-only: do not write to
    it), bfloat16 included; InvalidArgument naming ``field`` if malformed."""
    import warnings

    import torch
    a = unpack(t, field, dtype, ndim)
    with warnings.catch_warnings():             # the view is read-only, and only read
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(a)
    return x.view(torch.bfloat16) if t.dtype == "bfloat16" else x


def _little_endian_c(a: np.ndarray) -> np.ndarray:
    """``a`` as the wire holds it: C order, little-endian (a copy only when it is not)."""
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a


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
    a = _little_endian_c(array)
    head = pb.Tensor(dtype=_wire_name(a), shape=a.shape).SerializeToString()
    data = b"\x1a" + _varint(a.nbytes)                         # field 3 (data), bytes
    sub = len(head) + len(data) + a.nbytes
    return b"".join([msg.SerializeToString(), _varint(field_number << 3 | 2), _varint(sub),
                     head, data, memoryview(a.reshape(-1).view(np.uint8))])


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, start, value start, end) of each field in buf[start:end]:
    a walk over the few fields of a message, never over a tensor's values."""
    pos = start
    while pos < end:
        tag, at = _read_varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            _, stop = _read_varint(buf, at)
        elif wire == 2:
            n, at = _read_varint(buf, at)
            stop = at + n
        elif wire in (1, 5):
            stop = at + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire}")
        if stop > end:
            raise ValueError("field runs past the message")
        yield tag >> 3, wire, pos, at, stop
        pos = stop


class WithTensor:
    """A message parsed from its wire bytes with one Tensor field's data left in place: what
    ``parse_with_tensor`` returns. ``message`` has every other field; ``tensor(...)`` is that
    field as ``unpack`` would give it, a view of the received bytes (no copy)."""

    def __init__(self, message, header: pb.Tensor, data: memoryview | None,
                 error: str = ""):
        self.message, self._header, self._data, self._error = message, header, data, error
        self.given = data is not None or header.ByteSize() > 0 or error != ""   # field sent

    def __getattr__(self, name):                  # map_version, table_uid, ... of the message
        return getattr(self.message, name)

    def tensor(self, field: str, dtype=None, ndim: int | None = None) -> np.ndarray:
        if self._error:
            raise InvalidArgument(f"{field}: {self._error}")
        return _view(self._header, self._data if self._data is not None else b"", field,
                     dtype, ndim)


def parse_with_tensor(message_cls, field_number: int):
    """A gRPC request deserializer for ``message_cls`` that leaves the data of its Tensor field
    ``field_number`` in the received bytes: protobuf would copy a 16 MiB tensor twice (parsing,
    then reading the bytes field), about 15 ms a chunk here. Malformed bytes are left to
    protobuf's own parser (and its error)."""
    def parse(raw: bytes) -> WithTensor:
        try:
            mv, rest, found = memoryview(raw), [], None
            for num, wire, pos, at, stop in _fields(raw, 0, len(raw)):
                if num == field_number and wire == 2:
                    if found is not None:           # protobuf would merge them: refuse
                        return WithTensor(message_cls.FromString(raw), pb.Tensor(), None,
                                          "given twice in one message")
                    found = (at, stop)
                else:
                    rest.append(mv[pos:stop])
            header, data = pb.Tensor(), None
            if found is not None:
                head = []
                for num, wire, pos, at, stop in _fields(raw, *found):
                    if num == 3 and wire == 2:          # Tensor.data
                        data = mv[at:stop]
                    else:
                        head.append(mv[pos:stop])
                header = pb.Tensor.FromString(b"".join(head))
            return WithTensor(message_cls.FromString(b"".join(rest)), header, data)
        except ValueError:
            # Bytes protobuf refuses get its error; wire features the walk does not follow
            # (groups, which protobuf still parses) take the copying way.
            msg = message_cls.FromString(raw)
            name = message_cls.DESCRIPTOR.fields_by_number[field_number].name
            if not msg.HasField(name):
                return WithTensor(msg, pb.Tensor(), None)
            header = pb.Tensor()
            header.CopyFrom(getattr(msg, name))
            data = memoryview(header.data) if header.data else None
            header.ClearField("data")
            msg.ClearField(name)
            out = WithTensor(msg, header, data)
            out.given = True
            return out
    return parse


def unpack(t: pb.Tensor, field: str, dtype: str | tuple[str, ...] | None = None,
           ndim: int | None = None) -> np.ndarray:
    """Tensor message -> read-only numpy view; InvalidArgument naming ``field`` if malformed."""
    return _view(t, t.data, field, dtype, ndim)   # each access to a bytes field copies it


def _view(t: pb.Tensor, data, field: str, dtype=None, ndim: int | None = None) -> np.ndarray:
    if t.dtype not in ALLOWED_DTYPES:
        raise InvalidArgument(f"{field}: dtype {t.dtype!r} is not supported (allowed: "
                              f"{', '.join(ALLOWED_DTYPES)})")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, str) else dtype
        if t.dtype not in allowed:
            raise InvalidArgument(f"{field}: dtype is {t.dtype}, expected {' or '.join(allowed)}")
    shape = tuple(t.shape)
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(f"{field}: shape {list(shape)} has {len(shape)} dimensions, "
                              f"expected {ndim}")
    if shape and min(shape) < 0:
        raise InvalidArgument(f"{field}: shape {list(shape)} has a negative dimension")
    dt = _DTYPES[t.dtype]
    count = math.prod(shape)
    if count * dt.itemsize != len(data):
        raise InvalidArgument(f"{field}: {len(data)} bytes do not match shape {list(shape)} "
                              f"of {t.dtype} ({count * dt.itemsize} bytes)")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def is_set(t: pb.Tensor) -> bool:
    """True when an optional Tensor field was filled in."""
    return bool(t.dtype)
