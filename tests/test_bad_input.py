"""Bad input gets a clear error naming the field and the value or limit (INVALID_ARGUMENT or
NOT_FOUND), never crashes a process and never changes stored rows (ARCHITECTURE invariant 5).

Runs against the shared 3-server cluster, through the Python client, through hand-built router
requests (what a KeyedJaggedTensor would refuse to build) and directly against a shard server.
The last two tests each send a round of bad calls (``bad_calls``) and then check that every
process is still alive and every stored row is unchanged on every replica.
"""
from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import shoal
from shoal.errors import EPOCH_KEY, MAP_VERSION_KEY, from_rpc_error
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.wire import pack

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
MODEL = "bad_input"
N = 1000
DIMS = {"t32": 8, "t16": 4, "tnone": 4}
DTYPES = {"t32": np.float32, "t16": np.float16, "tnone": np.float32}


# ================================================================ fixtures and helpers

@pytest.fixture(scope="module")
def model(cluster, client):
    """One model: fp32 sum (two features), fp16 mean, fp32 unpooled; every row written."""
    tables = [
        EmbeddingBagConfig(name="t32", embedding_dim=DIMS["t32"], num_embeddings=N,
                           feature_names=["f32a", "f32b"], data_type=DataType.FP32,
                           pooling=PoolingType.SUM),
        EmbeddingBagConfig(name="t16", embedding_dim=DIMS["t16"], num_embeddings=N,
                           feature_names=["f16"], data_type=DataType.FP16,
                           pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="tnone", embedding_dim=DIMS["tnone"], num_embeddings=N,
                           feature_names=["fnone"], data_type=DataType.FP32,
                           pooling=PoolingType.NONE),
    ]
    specs = client.create_model(MODEL, tables)
    rng = np.random.default_rng(1234)
    rows = {}
    for name, dim in DIMS.items():
        rows[name] = rng.standard_normal((N, dim)).astype(DTYPES[name])
        assert client.write_rows(MODEL, name, np.arange(N), rows[name]) == N
    return {"specs": {s.name: s for s in specs}, "rows": rows}


@pytest.fixture(scope="module")
def router_stub(cluster):
    ch = grpc.insecure_channel(cluster.router_address)
    yield pbg.RouterStub(ch)
    ch.close()


def call(method, request):
    """A raw stub call with the client's error conversion (grpc.RpcError -> ShoalError)."""
    try:
        return method(request, timeout=30)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


def expect(code, *fragments):
    """pytest.raises(ShoalError) that also checks the code and message fragments on exit."""
    return _Expect(code, fragments)


class _Expect:
    def __init__(self, code, fragments):
        self.code, self.fragments = code, fragments

    def __enter__(self):
        self._cm = pytest.raises(shoal.ShoalError)
        self.info = self._cm.__enter__()
        return self.info

    def __exit__(self, *exc):
        suppressed = self._cm.__exit__(*exc)
        if not suppressed:          # another exception type: let it propagate as is
            return False
        err = self.info.value
        assert err.code == self.code, f"expected {self.code.name}, got {err}"
        for f in self.fragments:
            assert f in err.message, f"{f!r} not in {err.message!r}"
        return suppressed


def kjt(keys, values, lengths, weights=None):
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.int64),
                             lengths=torch.tensor(lengths, dtype=torch.int32),
                             weights=None if weights is None
                             else torch.tensor(weights, dtype=torch.float32))


def batch(keys, values, lengths, batch_size, weights=None, model=MODEL):
    """A FeatureBatch built by hand; ``values`` / ``lengths`` may be ready-made Tensors."""
    if not isinstance(values, pb.Tensor):
        values = pack(np.asarray(values, np.int64))
    if not isinstance(lengths, pb.Tensor):
        lengths = pack(np.asarray(lengths, np.int32))
    fb = pb.FeatureBatch(model=model, keys=keys, batch_size=batch_size, values=values,
                         lengths=lengths)
    if weights is not None:
        fb.weights.CopyFrom(pack(np.asarray(weights, np.float32)))
    return fb


def expected_pooled(model, key_rows: dict[str, list[list[int]]]) -> np.ndarray:
    """What the lookup must return for bags of ids, features in model order."""
    out = []
    for feature in ("f32a", "f32b", "f16"):
        if feature not in key_rows:
            continue
        table = "t16" if feature == "f16" else "t32"
        rows = model["rows"][table].astype(np.float32)
        bags = [rows[ids].sum(axis=0) if ids else np.zeros(rows.shape[1], np.float32)
                for ids in key_rows[feature]]
        if table == "t16":
            bags = [b / max(1, len(ids)) for b, ids in zip(bags, key_rows[feature])]
        out.append(np.stack(bags))
    return np.concatenate(out, axis=1)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a crashed child of ours stays a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def all_pids(c) -> list[int]:
    return [c.router.pid, c.coordinator.pid, *[s.pid for s in c.servers]]


# ================================================================ the model works at all

def test_good_lookup_matches(model, client):
    kt = client.lookup(MODEL, kjt(["f32a", "f16"], [1, 2, 999, 3, 4, 5], [2, 1, 0, 3]))
    assert kt.keys() == ["f32a", "f16"]
    expect_ = expected_pooled(model, {"f32a": [[1, 2], [999]], "f16": [[], [3, 4, 5]]})
    np.testing.assert_allclose(kt.values().numpy(), expect_, rtol=1e-3, atol=1e-3)
    rows = client.lookup_rows(MODEL, "tnone", [0, 999, 0])
    np.testing.assert_array_equal(rows.numpy(), model["rows"]["tnone"][[0, 999, 0]])


# ================================================================ unknown names

def test_unknown_model(model, client):
    with expect(NOT_FOUND, "model 'nope' does not exist", MODEL):
        client.lookup("nope", kjt(["f32a"], [1], [1]))
    with expect(NOT_FOUND, "model 'nope' does not exist"):
        client.lookup_rows("nope", "t32", [1])
    with expect(NOT_FOUND, "model 'nope' does not exist"):
        client.write_rows("nope", "t32", [1], np.zeros((1, 8), np.float32))
    with expect(NOT_FOUND, f"model {MODEL!r} has no version 7"):
        client.lookup_rows(MODEL, "t32", [1], version=7)


def test_unknown_table(model, client):
    with expect(NOT_FOUND, "table 't64' is not in model", "t32, t16, tnone"):
        client.lookup_rows(MODEL, "t64", [1])
    with expect(NOT_FOUND, "table 't64' is not in model"):
        client.write_rows(MODEL, "t64", [1], np.zeros((1, 8), np.float32))


def test_unknown_feature(model, client):
    with expect(NOT_FOUND, "feature 'fx' is not in model", "f32a, f32b, f16"):
        client.lookup(MODEL, kjt(["f32a", "fx"], [1, 2], [1, 1]))


def test_pooling_none_feature(model, client):
    with expect(INVALID, "feature 'fnone'", "'tnone'", "pooling 'none'", "lookup_rows"):
        client.lookup(MODEL, kjt(["f32a", "fnone"], [1, 2], [1, 1]))


# ================================================================ ids out of range

@pytest.mark.parametrize("bad", [-1, N, 2**40])
def test_id_out_of_range(model, client, bad):
    limit = f"out of range [0, {N})"
    with expect(INVALID, "values of feature 'f16'", f"id {bad}", limit, "'t16'"):
        client.lookup(MODEL, kjt(["f32a", "f16"], [1, 2, bad], [1, 2]))
    with expect(INVALID, "values of feature 'f32b'", f"id {bad}", limit):
        client.lookup(MODEL, kjt(["f32a", "f32b"], [1, bad], [1, 1]))
    with expect(INVALID, "ids", f"id {bad}", limit, "'t32'"):
        client.lookup_rows(MODEL, "t32", [0, bad, 5])
    with expect(INVALID, "ids", f"id {bad}", limit, "'tnone'"):
        client.lookup_rows(MODEL, "tnone", np.array([bad], np.int32) if abs(bad) < 2**31
                           else [bad])
    with expect(INVALID, "ids", f"id {bad}", limit, "'t16'"):
        client.write_rows(MODEL, "t16", [3, bad], np.ones((2, 4), np.float16))


# ================================================================ jagged structure, sent by hand

def test_lengths_do_not_sum_to_values(model, router_stub):
    with expect(INVALID, "lengths", "sum to 4", "3 values"):
        call(router_stub.Lookup, batch(["f32a", "f16"], [1, 2, 3], [1, 1, 1, 1], 2))
    with expect(INVALID, "lengths", "sum to 1", "3 values"):
        call(router_stub.Lookup, batch(["f32a"], [1, 2, 3], [1, 0], 2))


def test_lengths_count_does_not_match_keys_times_batch(model, router_stub):
    with expect(INVALID, "lengths", "3 lengths for 2 keys x batch_size 2", "expected 4"):
        call(router_stub.Lookup, batch(["f32a", "f16"], [1, 2, 3], [1, 1, 1], 2))
    with expect(INVALID, "lengths", "batch_size -1"):
        call(router_stub.Lookup, batch(["f32a"], [1], [1], -1))


def test_negative_lengths(model, router_stub):
    with expect(INVALID, "lengths", "must be >= 0", "got -1"):
        call(router_stub.Lookup, batch(["f32a", "f16"], [1, 2, 3], [2, -1, 1, 1], 2))


def test_duplicate_keys(model, router_stub):
    with expect(INVALID, "keys", "unique", "'f32a'"):
        call(router_stub.Lookup, batch(["f32a", "f32a"], [1, 2], [1, 1], 1))


def test_weights_wrong_length(model, router_stub):
    with expect(INVALID, "weights", "2 weights for 3 values"):
        call(router_stub.Lookup, batch(["f32a"], [1, 2, 3], [3], 1, weights=[1.0, 2.0]))
    with expect(INVALID, "weights", "4 weights for 3 values"):
        call(router_stub.Lookup, batch(["f32a"], [1, 2, 3], [3], 1, weights=[1.0] * 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights(model, client, router_stub, bad):
    with expect(INVALID, "weights", "weights[1]", str(np.float32(bad)), "finite"):
        call(router_stub.Lookup, batch(["f32a"], [1, 2, 3], [3], 1, weights=[1.0, bad, 1.0]))
    with expect(INVALID, "weights", "finite"):
        client.lookup(MODEL, kjt(["f16"], [1, 2], [2], weights=[bad, 1.0]))


def test_weights_on_mean_table(model, client):
    """torch and torchrec refuse a weighted mean; so does Shoal, naming the feature."""
    with expect(INVALID, "weights", "'f16'", "mean"):
        client.lookup(MODEL, kjt(["f32a", "f16"], [1, 2, 3], [1, 2], weights=[1.0, 1.0, 1.0]))


def test_malformed_tensors(model, router_stub):
    short = pb.Tensor(dtype="int64", shape=[3], data=bytes(20))
    with expect(INVALID, "values", "20 bytes do not match shape [3] of int64", "24 bytes"):
        call(router_stub.Lookup, batch(["f32a"], short, [3], 1))
    with expect(INVALID, "lengths", "5 bytes do not match shape [1] of int32"):
        call(router_stub.Lookup, batch(["f32a"], [1], pb.Tensor(dtype="int32", shape=[1], data=bytes(5)),
                                       1))
    with expect(INVALID, "values", "dtype 'uint8' is not supported", "int64, int32"):
        call(router_stub.Lookup, batch(["f32a"], pb.Tensor(dtype="uint8", shape=[3], data=bytes(3)),
                                       [3], 1))
    with expect(INVALID, "values", "dtype is float32, expected int64 or int32"):
        call(router_stub.Lookup, batch(["f32a"], pack(np.array([1.0], np.float32)), [1], 1))
    with expect(INVALID, "values", "shape [1, 1] has 2 dimensions, expected 1"):
        call(router_stub.Lookup, batch(["f32a"], pack(np.array([[1]], np.int64)), [1], 1))
    with expect(INVALID, "ids", "dtype 'bogus' is not supported"):
        call(router_stub.LookupRows, pb.RouterLookupRowsRequest(
            model=MODEL, table="t32", ids=pb.Tensor(dtype="bogus", shape=[1], data=bytes(8))))
    with expect(INVALID, "ids", "4 bytes do not match shape [1] of int64"):
        call(router_stub.WriteRows, pb.RouterWriteRowsRequest(
            model=MODEL, table="t32", ids=pb.Tensor(dtype="int64", shape=[1], data=bytes(4)),
            rows=pack(np.zeros((1, 8), np.float32))))
    with expect(INVALID, "rows", "31 bytes do not match shape [1, 8] of float32"):
        call(router_stub.WriteRows, pb.RouterWriteRowsRequest(
            model=MODEL, table="t32", ids=pack(np.array([1], np.int64)),
            rows=pb.Tensor(dtype="float32", shape=[1, 8], data=bytes(31))))


# ================================================================ writes

def test_write_wrong_dtype(model, client):
    with expect(INVALID, "rows", "dtype float64", "'t32'", "float32"):
        client.write_rows(MODEL, "t32", [1, 2], np.ones((2, 8), np.float64))
    with expect(INVALID, "rows", "dtype float32", "'t16'", "float16"):
        client.write_rows(MODEL, "t16", [1, 2], np.ones((2, 4), np.float32))
    with expect(INVALID, "rows", "dtype float16", "'t32'"):
        client.write_rows(MODEL, "t32", [1], torch.ones((1, 8), dtype=torch.float16))


def test_write_wrong_width(model, client):
    with expect(INVALID, "rows", "shape [2, 9] must be [2, 8]", "dim 8"):
        client.write_rows(MODEL, "t32", [1, 2], np.ones((2, 9), np.float32))
    with expect(INVALID, "rows", "shape [1, 3] must be [1, 4]"):
        client.write_rows(MODEL, "t16", [1], np.ones((1, 3), np.float16))


def test_ids_and_rows_lengths_differ(model, client, router_stub):
    # The client refuses before sending ...
    with expect(INVALID, "rows", "shape [2, 8] must be [3, dim]"):
        client.write_rows(MODEL, "t32", [1, 2, 3], np.ones((2, 8), np.float32))
    # ... and the router refuses the same request sent by hand.
    with expect(INVALID, "rows", "shape [2, 8] must be [3, 8]"):
        call(router_stub.WriteRows, pb.RouterWriteRowsRequest(
            model=MODEL, table="t32", ids=pack(np.array([1, 2, 3], np.int64)),
            rows=pack(np.ones((2, 8), np.float32))))
    with expect(INVALID, "rows", "shape [4] has 1 dimensions, expected 2"):
        call(router_stub.WriteRows, pb.RouterWriteRowsRequest(
            model=MODEL, table="t16", ids=pack(np.array([1], np.int64)),
            rows=pack(np.ones(4, np.float16))))


# ================================================================ create_model

def _table_proto(name, n=100, dim=4, parts=0, features=()):
    return pb.TableSpec(name=name, num_embeddings=n, dim=dim, dtype="float32", pooling="sum",
                        feature_names=list(features), num_partitions=parts)


def test_create_model_bad_specs(model, client, router_stub):
    before = sorted(m.name for m in client.models())

    def create(name, *tables):
        return call(router_stub.CreateModel,
                    pb.CreateModelRequest(spec=pb.ModelSpec(name=name, tables=list(tables))))

    with expect(INVALID, "table name 'a' appears twice"):
        create("m_dup", _table_proto("a", features=["x"]), _table_proto("a", features=["y"]))
    with expect(INVALID, "feature name 'x' appears twice"):
        create("m_dupf", _table_proto("a", features=["x"]), _table_proto("b", features=["x"]))
    with expect(INVALID, "num_partitions 3 must be a power of two"):
        create("m_p3", _table_proto("a", parts=3))
    with expect(INVALID, "num_partitions -4 must be a power of two"):
        create("m_pneg", _table_proto("a", parts=-4))
    with expect(INVALID, "table 'a'", "dim 0 must be in [1, 65536]"):
        create("m_dim0", _table_proto("a", dim=0))
    with expect(INVALID, "num_embeddings 0 must be in [1, "):
        create("m_n0", _table_proto("a", n=0))
    with expect(INVALID, "tables must not be empty"):
        create("m_empty")
    with expect(INVALID, "model.name: must not be empty"):
        create("", _table_proto("a"))
    with expect(grpc.StatusCode.ALREADY_EXISTS, f"model {MODEL!r} already exists"):
        create(MODEL, _table_proto("a"))
    # Through the client, torchrec configs and TableSpecs are checked before sending.
    with expect(INVALID, "dim 0 must be in [1, 65536]"):
        client.create_model("m_dim0", [EmbeddingBagConfig(
            name="z", embedding_dim=0, num_embeddings=10, feature_names=["z"])])
    with expect(INVALID, "num_partitions 6 must be a power of two"):
        client.create_model("m_p6", [shoal.TableSpec("z", 10, 4, num_partitions=6)])
    with expect(INVALID, "table name 'z' appears twice"):
        client.create_model("m_dup2", [
            EmbeddingBagConfig(name="z", embedding_dim=4, num_embeddings=10, feature_names=["p"]),
            EmbeddingBagConfig(name="z", embedding_dim=4, num_embeddings=10, feature_names=["q"])])
    with expect(grpc.StatusCode.ALREADY_EXISTS, f"model {MODEL!r} already exists"):
        client.create_model(MODEL, [shoal.TableSpec("z", 10, 4)])
    # Nothing was registered by the failed calls, and the existing model is unchanged.
    assert sorted(m.name for m in client.models()) == before
    current = {t.name: (t.num_embeddings, t.dim, t.dtype)
               for m in client.models() if m.name == MODEL for t in m.tables}
    assert current == {"t32": (N, 8, "float32"), "t16": (N, 4, "float16"),
                       "tnone": (N, 4, "float32")}


# ================================================================ straight to a shard server

@pytest.fixture(scope="module")
def shard(cluster, client, model):
    """Server 0's stub, the current map, and one table's partitions it holds / does not."""
    server = cluster.servers[0]
    m = client.status().map
    spec = model["specs"]["t32"]
    held = {rs.partition: rs.epoch for rs in m.partitions
            if rs.table_uid == spec.table_uid and server.server_id in rs.replicas}
    ch = grpc.insecure_channel(server.address)
    yield {"stub": pbg.ShardServerStub(ch), "map": m, "spec": spec, "held": held,
           "server": server}
    ch.close()


def _routed(parts, epochs):
    return pb.PartitionEpochs(partitions=pack(np.asarray(parts, np.int32)),
                              epochs=pack(np.asarray(epochs, np.int64)))


def _held_ids(sh, count=3):
    """Ids of one partition server 0 holds, and its routing."""
    P = sh["spec"].num_partitions
    p, epoch = sorted(sh["held"].items())[0]
    ids = np.arange(p, P * count + p, P, dtype=np.int64)
    return ids, _routed([p], [epoch])


def test_shard_out_of_range_ids(shard):
    stub, spec = shard["stub"], shard["spec"]
    ids, routed = _held_ids(shard)
    P = spec.num_partitions
    p = int(ids[0] % P)
    for bad in (N + p, -P + p):          # same partition as the routed ids, out of range
        bad_ids = np.append(ids, bad)
        with expect(INVALID, "ids", f"id {bad}", f"out of range [0, {N})", "'t32'"):
            call(stub.LookupRows, pb.LookupRowsRequest(
                segments=[pb.RowsSegment(table_uid=spec.table_uid, ids=pack(bad_ids),
                                         routed=routed)]))
        with expect(INVALID, "ids", f"id {bad}", f"out of range [0, {N})"):
            call(stub.LookupPooled, pb.LookupPooledRequest(segments=[pb.PooledSegment(
                table_uid=spec.table_uid, ids=pack(bad_ids),
                lengths=pack(np.array([len(bad_ids)], np.int32)), routed=routed)]))
        with expect(INVALID, "ids", f"id {bad}", f"out of range [0, {N})"):
            call(stub.WriteRows, pb.WriteRowsRequest(
                table_uid=spec.table_uid, ids=pack(bad_ids),
                rows=pack(np.zeros((len(bad_ids), 8), np.float32)), routed=routed))


def test_shard_inconsistent_pooled_segments(shard):
    stub, spec = shard["stub"], shard["spec"]
    ids, routed = _held_ids(shard)

    def seg(**kw):
        base = dict(table_uid=spec.table_uid, ids=pack(ids),
                    lengths=pack(np.array([2, 1], np.int32)), routed=routed)
        base.update(kw)
        return pb.LookupPooledRequest(segments=[pb.PooledSegment(**base)])

    # Sanity: the well-formed segment is answered.
    reply = call(stub.LookupPooled, seg())
    assert list(reply.sums[0].shape) == [2, 8]
    with expect(INVALID, "segments[0].lengths", "sum 4 != 3 ids"):
        call(stub.LookupPooled, seg(lengths=pack(np.array([2, 2], np.int32))))
    with expect(INVALID, "segments[0].lengths", "must be >= 0", "got -1"):
        call(stub.LookupPooled, seg(lengths=pack(np.array([4, -1], np.int32))))
    with expect(INVALID, "segments[0].inverse", "must index [0, 3)"):
        call(stub.LookupPooled, seg(inverse=pack(np.array([0, 3, 1], np.int32))))
    with expect(INVALID, "segments[0].inverse", "must index [0, 3)"):
        call(stub.LookupPooled, seg(inverse=pack(np.array([0, -1, 1], np.int32))))
    with expect(INVALID, "segments[0].lengths", "sum 3 != 4 ids"):
        call(stub.LookupPooled, seg(inverse=pack(np.array([0, 1, 1, 2], np.int32))))
    with expect(INVALID, "segments[0].weights", "2 weights for 3 ids"):
        call(stub.LookupPooled, seg(weights=pack(np.ones(2, np.float32))))
    with expect(INVALID, "segments[0].lengths", "dtype is int64, expected int32"):
        call(stub.LookupPooled, seg(lengths=pack(np.array([2, 1], np.int64))))
    with expect(INVALID, "routed", "1 partitions but 2 epochs"):
        call(stub.LookupPooled, seg(routed=_routed([int(ids[0] % spec.num_partitions)],
                                                   [1, 1])))
    with expect(INVALID, "routed.partitions", f"must be in [0, {spec.num_partitions})"):
        call(stub.LookupPooled, seg(routed=_routed([spec.num_partitions], [1])))
    with expect(INVALID, "ids", f"id {int(ids[0]) + 1}", "did not route here"):
        call(stub.LookupPooled, seg(ids=pack(ids + 1)))


def test_shard_partition_not_held(shard):
    stub, spec, server = shard["stub"], shard["spec"], shard["server"]
    P = spec.num_partitions
    missing = sorted(set(range(P)) - set(shard["held"]))
    assert missing, f"server {server.server_id} holds every partition of t32: {shard['held']}"
    p = missing[0]
    ids = np.array([p, p + P], np.int64)
    requests = [
        (stub.LookupRows, pb.LookupRowsRequest(map_version=shard["map"].version, segments=[
            pb.RowsSegment(table_uid=spec.table_uid, ids=pack(ids), routed=_routed([p], [1]))])),
        (stub.LookupPooled, pb.LookupPooledRequest(segments=[pb.PooledSegment(
            table_uid=spec.table_uid, ids=pack(ids), lengths=pack(np.array([2], np.int32)),
            routed=_routed([p], [1]))])),
        (stub.WriteRows, pb.WriteRowsRequest(
            table_uid=spec.table_uid, ids=pack(ids), rows=pack(np.zeros((2, 8), np.float32)),
            routed=_routed([p], [1]))),
        # A table uid the server holds nothing of at all.
        (stub.LookupRows, pb.LookupRowsRequest(segments=[
            pb.RowsSegment(table_uid=987_654, ids=pack(ids), routed=_routed([p], [1]))])),
    ]
    for method, request in requests:
        with pytest.raises(grpc.RpcError) as e:
            method(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        md = dict(e.value.trailing_metadata() or ())
        assert MAP_VERSION_KEY in md
        assert int(md[MAP_VERSION_KEY]) >= shard["map"].version
        err = from_rpc_error(e.value)
        assert isinstance(err, shoal.ShoalError) and err.map_version == int(md[MAP_VERSION_KEY])
        assert server.server_id in err.message
    # A held partition routed at a wrong epoch is also a redirect.
    held_p, epoch = sorted(shard["held"].items())[0]
    with pytest.raises(grpc.RpcError) as e:
        stub.LookupRows(pb.LookupRowsRequest(segments=[pb.RowsSegment(
            table_uid=spec.table_uid, ids=pack(np.array([held_p], np.int64)),
            routed=_routed([held_p], [epoch + 5]))]), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"epoch {epoch + 5}" in e.value.details() and f"epoch {epoch}" in e.value.details()
    # The redirect carries the server's current epoch of that partition, machine-readable.
    assert dict(e.value.trailing_metadata())[EPOCH_KEY] == str(epoch)
    assert from_rpc_error(e.value).epoch == epoch


def test_shard_write_rows_bad_shapes(shard):
    stub, spec = shard["stub"], shard["spec"]
    ids, routed = _held_ids(shard)

    def write(rows, ids_=ids):
        return call(stub.WriteRows, pb.WriteRowsRequest(table_uid=spec.table_uid,
                                                        ids=pack(ids_), rows=rows,
                                                        routed=routed))

    with expect(INVALID, "rows", "shape [3, 9] must be [3, 8]"):
        write(pack(np.ones((3, 9), np.float32)))
    with expect(INVALID, "rows", "shape [2, 8] must be [3, 8]"):
        write(pack(np.ones((2, 8), np.float32)))
    with expect(INVALID, "rows", "shape [24] has 1 dimensions, expected 2"):
        write(pack(np.ones(24, np.float32)))
    with expect(INVALID, "rows", "dtype is float16, expected float32"):
        write(pack(np.ones((3, 8), np.float16)))
    with expect(INVALID, "rows", "dtype 'float64' is not supported"):
        write(pack(np.ones((3, 8), np.float64)))
    with expect(INVALID, "rows", "95 bytes do not match shape [3, 8] of float32"):
        write(pb.Tensor(dtype="float32", shape=[3, 8], data=bytes(95)))
    with expect(INVALID, "ids", "must be unique"):
        write(pack(np.ones((3, 8), np.float32)), np.array([ids[0], ids[1], ids[0]]))
    with expect(INVALID, "ids", "dtype is int32, expected int64"):
        write(pack(np.ones((3, 8), np.float32)), ids.astype(np.int32))


# ================================================================ limits: a second, small cluster

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One server, max 100 ids per router request."""
    cfg = shoal.ShoalConfig().replace(router__max_ids_per_request=100)
    with shoal.LocalCluster(servers=1, replication=1, config=cfg,
                            data_dir=str(tmp_path_factory.mktemp("small"))) as c:
        cl = c.client()
        cl.create_model("lim", [EmbeddingBagConfig(name="t", embedding_dim=4,
                                                   num_embeddings=500, feature_names=["f"])])
        rows = np.arange(500 * 4, dtype=np.float32).reshape(500, 4)
        for lo in range(0, 500, 100):          # writes obey the 100-id limit too
            cl.write_rows("lim", "t", np.arange(lo, lo + 100), rows[lo:lo + 100])
        yield c, cl, rows
        cl.close()


def test_max_ids_per_request(small):
    c, cl, rows = small
    ok = cl.lookup("lim", kjt(["f"], list(range(100)), [60, 40]))          # exactly the limit
    np.testing.assert_array_equal(ok.values().numpy(),
                                  np.stack([rows[:60].sum(0), rows[60:100].sum(0)]))
    with expect(EXHAUSTED, "values", "101 ids exceed max_ids_per_request 100", "split"):
        cl.lookup("lim", kjt(["f"], list(range(101)), [60, 41]))
    np.testing.assert_array_equal(cl.lookup_rows("lim", "t", np.arange(100)).numpy(), rows[:100])
    with expect(EXHAUSTED, "ids", "101 ids exceed max_ids_per_request 100"):
        cl.lookup_rows("lim", "t", np.arange(101))
    assert all(alive(p) for p in all_pids(c))


def test_max_ids_per_request_write(small):
    c, cl, rows = small
    with expect(EXHAUSTED, "ids", "101 ids exceed max_ids_per_request 100"):
        cl.write_rows("lim", "t", np.arange(101), rows[:101])


def test_lengths_overflow_int64(small):
    """Four int64 lengths of 2**62 sum (mod 2**64) to 0 = the number of values."""
    c, cl, rows = small
    stub = pbg.RouterStub(grpc.insecure_channel(c.router_address))
    fb = pb.FeatureBatch(model="lim", keys=["f"], batch_size=4,
                         values=pack(np.zeros(0, np.int64)),
                         lengths=pack(np.full(4, 2**62, np.int64)))
    try:
        with expect(INVALID, "lengths"):
            call(stub.Lookup, fb)
    finally:
        assert alive(c.router.pid), "the router died"


# ================================================================ afterwards: nothing broke

def bad_calls(cluster, client, router_stub, shard):
    """A round of bad calls that would change rows or kill a process if they were taken: every
    one must be refused with the code it gets in the tests above."""
    spec, stub = shard["spec"], shard["stub"]
    ids, routed = _held_ids(shard)
    new_rows = np.full((3, 8), 7.0, np.float32)
    with expect(INVALID, "ids", f"id {N}"):          # good rows, one id out of range
        client.write_rows(MODEL, "t32", [1, 2, N], new_rows)
    with expect(INVALID, "rows", "shape [2, 9] must be [2, 8]"):
        client.write_rows(MODEL, "t32", [1, 2], np.ones((2, 9), np.float32))
    with expect(INVALID, "rows", "dtype float32", "'t16'"):
        client.write_rows(MODEL, "t16", [1, 2], np.ones((2, 4), np.float32))
    with expect(INVALID, "rows", "shape [2, 8] must be [3, 8]"):
        call(router_stub.WriteRows, pb.RouterWriteRowsRequest(
            model=MODEL, table="t32", ids=pack(np.array([1, 2, 3], np.int64)),
            rows=pack(new_rows[:2])))
    with expect(INVALID, "rows", "31 bytes do not match shape [1, 8] of float32"):
        call(router_stub.WriteRows, pb.RouterWriteRowsRequest(
            model=MODEL, table="t32", ids=pack(np.array([1], np.int64)),
            rows=pb.Tensor(dtype="float32", shape=[1, 8], data=bytes(31))))
    with expect(INVALID, "ids", "must be unique"):    # straight to a replica
        call(stub.WriteRows, pb.WriteRowsRequest(
            table_uid=spec.table_uid, ids=pack(np.array([ids[0], ids[1], ids[0]])),
            rows=pack(new_rows), routed=routed))
    with expect(INVALID, "ids", f"id {N + int(ids[0])}"):
        call(stub.WriteRows, pb.WriteRowsRequest(
            table_uid=spec.table_uid, ids=pack(np.append(ids[:2], N + ids[0])),
            rows=pack(new_rows), routed=routed))
    with expect(INVALID, "values", "20 bytes do not match shape [3] of int64"):
        call(router_stub.Lookup, batch(["f32a"], pb.Tensor(dtype="int64", shape=[3],
                                                           data=bytes(20)), [3], 1))
    with expect(INVALID, "lengths"):
        call(router_stub.Lookup, batch(["f32a"], [1, 2], [4, -2], 2))
    with expect(INVALID, "lengths"):
        call(router_stub.Lookup, pb.FeatureBatch(
            model=MODEL, keys=["f32a"], batch_size=4, values=pack(np.zeros(0, np.int64)),
            lengths=pack(np.full(4, 2**62, np.int64))))
    with expect(INVALID, "segments[0].inverse", "must index [0, 3)"):
        call(stub.LookupPooled, pb.LookupPooledRequest(segments=[pb.PooledSegment(
            table_uid=spec.table_uid, ids=pack(ids), lengths=pack(np.array([2, 1], np.int32)),
            inverse=pack(np.array([0, 3, 1], np.int32)), routed=routed)]))
    for address, method in ((cluster.router_address, "/shoal.v1.Router/Lookup"),
                            (cluster.router_address, "/shoal.v1.Router/WriteRows"),
                            (shard["server"].address, "/shoal.v1.ShardServer/WriteRows")):
        ch = grpc.insecure_channel(address)
        try:                                          # bytes that are no message at all
            with expect(INVALID, "not a valid"):
                call(ch.unary_unary(method), b"\xff\xff\xff\xff\x0f")
        finally:
            ch.close()


def test_every_process_alive(cluster, client, model, router_stub, shard):
    bad_calls(cluster, client, router_stub, shard)
    for pid in all_pids(cluster):
        assert alive(pid), f"process {pid} is gone"
    stats = client.status()
    assert stats.router.pid == cluster.router.pid
    assert {s.server_id: s.state for s in stats.map.servers} == {
        s.server_id: "alive" for s in cluster.servers}
    kt = client.lookup(MODEL, kjt(["f32a", "f32b", "f16"], [7, 8, 9, 10, 11, 12],
                                  [1, 2, 0, 1, 1, 1]))
    np.testing.assert_allclose(
        kt.values().numpy(),
        expected_pooled(model, {"f32a": [[7], [8, 9]], "f32b": [[], [10]],
                                "f16": [[11], [12]]}), rtol=1e-3, atol=1e-3)


def test_stored_rows_unchanged(cluster, client, model, router_stub, shard):
    bad_calls(cluster, client, router_stub, shard)
    for name, want in model["rows"].items():
        got = client.lookup_rows(MODEL, name, np.arange(N))
        assert got.dtype == torch.from_numpy(want).dtype
        np.testing.assert_array_equal(got.numpy(), want)
    # ... on every replica, not only the ones the router reads.
    m = client.status().map
    spec = model["specs"]["t32"]
    addr = {s.server_id: s.address for s in m.servers}
    for rs in (r for r in m.partitions if r.table_uid == spec.table_uid):
        mine = np.arange(rs.partition, N, spec.num_partitions, dtype=np.int64)
        for server in rs.replicas:
            ch = grpc.insecure_channel(addr[server])
            try:
                reply = pbg.ShardServerStub(ch).LookupRows(pb.LookupRowsRequest(
                    map_version=m.version, segments=[pb.RowsSegment(
                        table_uid=spec.table_uid, ids=pack(mine),
                        routed=_routed([rs.partition], [rs.epoch]))]), timeout=30)
            finally:
                ch.close()
            t = reply.rows[0]
            np.testing.assert_array_equal(
                np.frombuffer(t.data, t.dtype).reshape(tuple(t.shape)),
                model["rows"]["t32"][mine], err_msg=f"{server}, partition {rs.partition}")
