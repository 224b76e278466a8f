"""Random and mutated protobuf messages for Shoal's RPCs, drawn with hypothesis from the
messages' descriptors (no hand-written strategy per message): every field of every nested
message, boundary integers, odd strings, tensors whose dtype, shape and bytes agree or not.
``Names`` steers the fields that name things (models, tables, table_uids, servers) towards
values that exist, so requests get past the first lookup, while never naming what a test
protects."""
from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

INT_EDGES = {
    F.TYPE_INT32: (-(2**31), -1, 0, 1, 2, 7, 64, 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), -1, 0, 1, 2**31 - 1),
    F.TYPE_UINT32: (0, 1, 2, 3, 1000, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), -1, 0, 1, 2, 3, 100, 2**31, 2**62, 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), -1, 0, 1, 2**63 - 1),
    F.TYPE_UINT64: (0, 1, 2**63, 2**64 - 1),
}
RANGES = {F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1),
          F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_INT64: (-(2**63), 2**63 - 1),
          F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_UINT64: (0, 2**64 - 1),
          F.TYPE_FIXED32: (0, 2**32 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
          F.TYPE_SFIXED32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1)}
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "uint16", "uint8", "bool",
          "complex64", "", "float32\x00")
ODD_TEXT = ("", " ", "..", "../../etc/passwd", "\x00", "é" * 3, "a" * 300, "'; DROP TABLE")
# Fields a server may connect to: only loopback addresses (a closed port, a bad port, none) and
# strings that name no host, so a fuzzed address never sends traffic off this machine.
ADDRESS_FIELDS = ("address", "source_address", "metrics_address", "coordinator_metrics_address")
ADDRESSES = ("127.0.0.1:1", "127.0.0.1:0", "127.0.0.1:99999", "127.0.0.1:", "[::1]:1", "",
             "127.0.0.1:-5", ":::::")


@dataclass
class Names:
    models: tuple = ()
    tables: tuple = ()
    table_uids: tuple = ()
    servers: tuple = ()
    addresses: tuple = ()          # the cluster's own (loopback) addresses
    avoid_uids: frozenset = field(default_factory=frozenset)


def _text(names: Names, fname: str):
    if fname in ADDRESS_FIELDS:
        return st.sampled_from(ADDRESSES + names.addresses)
    pool = {"model": names.models, "table": names.tables, "layer": ("l0",),
            "server_id": names.servers, "source": names.servers, "target": names.servers,
            "reporter": names.servers, "learner": names.servers, "leader": names.servers,
            "dtype": DTYPES, "pooling": ("sum", "mean", "none", "max"),
            "state": ("ready", "loading", "x")}.get(fname, ())
    options = [st.text(max_size=24), st.sampled_from(ODD_TEXT)]
    if pool:
        options.insert(0, st.sampled_from(pool))
    return st.one_of(*options)


def _int(names: Names, f):
    lo, hi = RANGES.get(f.type, (-(2**31), 2**31 - 1))
    if f.name in ("table_uid", "table_uids"):
        uids = [u for u in names.table_uids if u not in names.avoid_uids]
        far = st.integers(1 << 20, hi) if hi > (1 << 20) else st.integers(lo, hi)
        return st.one_of(st.sampled_from(uids), far) if uids else far
    edges = [v for v in INT_EDGES.get(f.type, ()) if lo <= v <= hi]
    small = st.integers(max(lo, -4), min(hi, 70))
    return st.one_of(small, st.sampled_from(edges), st.integers(lo, hi)) if edges else \
        st.one_of(small, st.integers(lo, hi))


def _tensor(draw, msg_cls):
    """A Tensor whose dtype, shape and data agree about half the time."""
    t = msg_cls()
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.one_of(st.integers(0, 8), st.sampled_from([-1, 2**40])),
                          max_size=3))
    t.dtype = dtype
    t.shape.extend(shape)
    size = {"float32": 4, "int32": 4, "int64": 8, "float16": 2, "bfloat16": 2,
            "uint16": 2}.get(dtype, 1)
    n = 1
    for s in shape:
        n *= s if 0 <= s <= 8 else 0
    consistent = draw(st.booleans())
    t.data = draw(st.binary(min_size=n * size, max_size=n * size)) if consistent else \
        draw(st.binary(max_size=96))
    return t


def message(draw, cls, names: Names, depth: int = 0):
    """A random ``cls`` message (every field set or not, nested up to depth 3)."""
    m = cls()
    if cls.DESCRIPTOR.name == "Tensor":
        return _tensor(draw, cls)
    for f in cls.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        repeated = f.is_repeated
        count = draw(st.integers(0, 4)) if repeated else 1
        if f.type == F.TYPE_MESSAGE:
            if depth >= 3 or f.message_type.GetOptions().map_entry:
                continue
            sub = [message(draw, _cls(f), names, depth + 1) for _ in range(count)]
            if repeated:
                getattr(m, f.name).extend(sub)
            else:
                getattr(m, f.name).CopyFrom(sub[0])
            continue
        if f.type == F.TYPE_STRING:
            s = _text(names, f.name)
        elif f.type == F.TYPE_BYTES:
            s = st.binary(max_size=64)
        elif f.type == F.TYPE_BOOL:
            s = st.booleans()
        elif f.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            s = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                          st.sampled_from([0.0, -1.0, 1e30]))
        elif f.type == F.TYPE_ENUM:
            s = st.sampled_from([v.number for v in f.enum_type.values])
        else:
            s = _int(names, f)
        values = [draw(s) for _ in range(count)]
        if repeated:
            getattr(m, f.name).extend(values)
        else:
            setattr(m, f.name, values[0])
    return m


def _cls(f):
    from google.protobuf import message_factory
    return message_factory.GetMessageClass(f.message_type)


def mutate(draw, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, cut, duplicated or inserted."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        if not b:
            b += draw(st.binary(min_size=1, max_size=8))
            continue
        i = draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del b[i:]
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            b += b[i:i + 16]
    return bytes(b)
