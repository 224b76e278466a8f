"""Pure-logic unit tests: no processes, no sockets. Placement, the partition function, the
coordinator's state, stores and lease logic (fake clock), the router's routing table and batcher,
the wire codec, the config tree, RocksDB row storage and the memory arena."""
from __future__ import annotations

import collections
import random
import asyncio
import time

import grpc
import numpy as np
import pytest
import torch

from coordinator.placement import PartitionLoad, ServerLoad, place
from coordinator.service import CoordinatorService
from coordinator.state import ClusterState
from coordinator.store import MemoryStateStore, SqliteStateStore
from embeddings.partition import (choose_num_partitions, local_index, partition_of,
                                  rows_in_partition)
from embeddings.specs import TableSpec
from router.batcher import Batcher, StepBatcher
from embeddings.specs import check_ids
from router.routing import RoutingTable
from shards.memory import TableArena
from shards.storage import RocksRowStore
from shoal.config import CoordinatorConfig, ShoalConfig
from shoal.errors import InvalidArgument, NotFound, ShoalError
from shoal.proto import shoal_pb2 as pb
from shoal.wire import ALLOWED_DTYPES, is_set, pack, unpack


# ================================================================ placement

def _synthetic_partitions(seed: int, n: int = 64) -> list[PartitionLoad]:
    rng = np.random.default_rng(seed)
    return [PartitionLoad(1 + i // 16, i % 16, int(rng.integers(1, 100)) * 1000)
            for i in range(n)]


def _loads(plan, parts):
    size = {(p.table_uid, p.partition): p.bytes for p in parts}
    load, leaders = collections.Counter(), collections.Counter()
    for key, replicas in plan.items():
        for s in replicas:
            load[s] += size[key]
        leaders[replicas[0]] += 1
    return load, leaders


@pytest.mark.parametrize("n_servers", range(3, 9))
@pytest.mark.parametrize("replication", [1, 2, 3])
def test_place_distinct_balanced(n_servers, replication):
    parts = _synthetic_partitions(seed=n_servers * 10 + replication)
    servers = [ServerLoad(f"s{i}") for i in range(n_servers)]
    plan = place(parts, servers, replication)

    assert set(plan) == {(p.table_uid, p.partition) for p in parts}
    ids = {s.server_id for s in servers}
    for replicas in plan.values():
        assert len(replicas) == replication
        assert len(set(replicas)) == replication          # distinct servers
        assert set(replicas) <= ids
    load, leaders = _loads(plan, parts)
    assert sum(load.values()) == replication * sum(p.bytes for p in parts)
    assert set(load) == ids                               # every server used
    biggest = max(p.bytes for p in parts)
    assert max(load.values()) - min(load.values()) <= biggest
    mean = sum(load.values()) / n_servers
    assert max(load.values()) <= 1.05 * mean
    # Leaders (replicas[0]) spread over every server, nearly evenly.
    assert set(leaders) == ids
    assert max(leaders.values()) - min(leaders.values()) <= 2


def test_place_leader_is_least_leading_replica():
    # s0 already leads many partitions; for one new partition on both servers, s1 leads.
    plan = place([PartitionLoad(1, 0, 100)],
                 [ServerLoad("s0", bytes=0, leaders=10), ServerLoad("s1", bytes=0, leaders=0)], 2)
    assert plan == {(1, 0): ("s1", "s0")}


def test_place_deterministic_and_order_independent():
    parts = _synthetic_partitions(seed=7)
    servers = [ServerLoad(f"s{i}") for i in range(5)]
    a = place(parts, servers, 2)
    assert place(parts, servers, 2) == a
    rnd = random.Random(3)
    p2, s2 = parts[:], servers[:]
    rnd.shuffle(p2)
    rnd.shuffle(s2)
    assert place(p2, s2, 2) == a


def test_place_spreads_the_model_and_then_prefers_empty_servers():
    parts = [PartitionLoad(1, p, 1000) for p in range(8)]
    servers = [ServerLoad("full", bytes=10_000), ServerLoad("a"), ServerLoad("b")]
    plan = place(parts, servers, 1)
    load, _ = _loads(plan, parts)
    # every server takes a share of the model (its hot traffic spreads); the remainder goes
    # to the emptier servers
    assert load == {"full": 2000, "a": 3000, "b": 3000}


def test_place_errors():
    servers = [ServerLoad("s0"), ServerLoad("s1")]
    with pytest.raises(ShoalError) as e:
        place([PartitionLoad(1, 0, 1)], servers, 3)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "replication 3" in e.value.message and "2 are alive" in e.value.message
    with pytest.raises(ShoalError) as e:
        place([PartitionLoad(1, 0, 1)], servers, 0)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "replication 0" in e.value.message
    assert place([], servers, 2) == {}


# ================================================================ partition function

@pytest.mark.parametrize("log_p", range(11))
def test_partition_round_trip(log_p):
    P = 1 << log_p
    rng = np.random.default_rng(log_p)
    ids = np.concatenate([np.arange(5000, dtype=np.int64),
                          rng.integers(0, 1 << 40, 20_000, dtype=np.int64)])
    parts = partition_of(ids, P)
    local = local_index(ids, P)
    assert parts.dtype == np.int64 and local.dtype == np.int64
    assert parts.min() >= 0 and parts.max() < P
    np.testing.assert_array_equal(local * P + parts, ids)
    np.testing.assert_array_equal(parts, ids % P)
    np.testing.assert_array_equal(local, ids // P)
    # Splitting P -> 2P sends partition p's rows to p or p + P.
    parts2 = partition_of(ids, 2 * P)
    assert np.all((parts2 == parts) | (parts2 == parts + P))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000, 1023, 1024, 1025, 12_345])
def test_rows_in_partition_matches_count(n):
    ids = np.arange(n, dtype=np.int64)
    for P in (1, 2, 4, 16, 64, 1024):
        counts = np.bincount(partition_of(ids, P), minlength=P)
        got = [rows_in_partition(n, P, p) for p in range(P)]
        assert got == counts.tolist()
        assert sum(got) == n


def test_choose_num_partitions():
    for n in [1, 2, 3, 5, 100, 1000, 10**6, 10**9]:
        for row_bytes in [4, 64, 512]:
            for lo, hi in [(1, 1024), (4, 1024), (4, 64), (8, 8)]:
                p = choose_num_partitions(n, row_bytes, 64 << 20, lo, hi)
                assert p >= 1 and p & (p - 1) == 0, (n, row_bytes, lo, hi, p)
                assert p <= hi
                assert p <= max(1, n)
                if n >= lo:
                    assert p >= lo
    # Sized near the target: 1e9 rows of 64 B = 64 GB -> 1024 partitions of 64 MB.
    assert choose_num_partitions(10**9, 64, 64 << 20, 4, 4096) == 1024
    assert choose_num_partitions(10**9, 64, 64 << 20, 4, 256) == 256
    assert choose_num_partitions(1000, 32, 64 << 20, 4, 1024) == 4
    assert choose_num_partitions(3, 32, 64 << 20, 4, 1024) == 2


# ================================================================ coordinator state and stores

def _table(name, n=1000, dim=8, dtype="float32", parts=4):
    return TableSpec(name, n, dim, dtype, "sum", (name,), parts).to_proto()


def _state_with_model() -> ClusterState:
    s = ClusterState()
    for i in range(3):
        s = s.with_server(f"s{i}", f"127.0.0.1:{5000 + i}", 1 << 30)
    s, _ = s.with_model(pb.ModelSpec(name="m", tables=[_table("a"), _table("b", dtype="float16")]),
                        ["s0", "s1", "s2"], CoordinatorConfig(), 2)
    return s


def test_cluster_state_versions_and_steps():
    s0 = ClusterState()
    s1 = s0.with_server("s0", "127.0.0.1:1", 100)
    assert (s0.version, s1.version) == (0, 1)
    assert s0.servers == {}                                  # steps return new states
    assert s1.with_server("s0", "127.0.0.1:1", 100) is s1    # no change, no new version
    s2 = s1.with_server("s0", "127.0.0.1:2", 100)            # new address: a change
    assert s2.version == 2 and s2.servers["s0"].address == "127.0.0.1:2"
    # A measured disk capacity moves with free space: within 5%, no change; past it, one.
    c1 = s2.with_server("s0", "127.0.0.1:2", 100, disk_capacity=1000)
    assert c1.version == 3 and c1.servers["s0"].disk_capacity_bytes == 1000
    assert c1.with_server("s0", "127.0.0.1:2", 100, disk_capacity=960) is c1
    assert c1.with_server("s0", "127.0.0.1:2", 100, disk_capacity=900).version == 4
    s3 = s2.with_server("s1", "127.0.0.1:3", 100)
    s4, model = s3.with_model(pb.ModelSpec(name="m", tables=[_table("a", parts=4)]),
                              ["s0", "s1"], CoordinatorConfig(), 2)
    assert s4.version == 4 and s3.models == {}
    assert model.version == 1 and model.tables[0].table_uid == 1
    assert s4.next_table_uid == 2
    assert sorted(s4.partitions) == [(1, p) for p in range(4)]
    assert all(r.epoch == 1 and sorted(r.replicas) == ["s0", "s1"]
               for r in s4.partitions.values())

    rec = s4.partitions[(1, 2)]
    flipped = list(reversed(rec.replicas))
    s5 = s4.with_replicas(1, 2, flipped)
    assert s5.version == 5
    assert s5.partitions[(1, 2)].replicas == tuple(flipped)
    assert s5.partitions[(1, 2)].epoch == rec.epoch + 1
    assert s4.partitions[(1, 2)].epoch == rec.epoch            # the old state is untouched
    assert s5.partitions[(1, 1)] == s4.partitions[(1, 1)]      # other partitions untouched
    s6 = s5.with_replicas(1, 2, list(reversed(flipped)))
    assert s6.partitions[(1, 2)].epoch == rec.epoch + 2 and s6.version == 6

    for bad in (["s0", "s2"], ["s0"], ["s0", "s0"], ["s0", "s1", "s2"]):
        with pytest.raises(InvalidArgument) as e:
            s5.with_replicas(1, 2, bad)
        assert "reordering" in e.value.message and str(bad) in e.value.message
    with pytest.raises(NotFound) as e:
        s5.with_replicas(1, 99, ["s0", "s1"])
    assert "partition 99" in e.value.message
    with pytest.raises(ShoalError) as e:
        s5.with_model(pb.ModelSpec(name="m", tables=[_table("x")]), ["s0", "s1"],
                      CoordinatorConfig(), 2)
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_state_store_round_trip(kind, tmp_path):
    store = MemoryStateStore() if kind == "memory" else SqliteStateStore(tmp_path / "state.db")
    assert store.load() is None
    s = _state_with_model()
    store.save(s)
    loaded = store.load()
    assert loaded is not s
    assert loaded.to_map() == s.to_map()
    assert loaded.version == s.version == 4
    assert loaded.next_table_uid == s.next_table_uid == 3
    assert loaded.partitions == s.partitions

    key = sorted(s.partitions)[0]
    s2 = s.with_replicas(*key, list(reversed(s.partitions[key].replicas)))
    store.save(s2)
    again = store.load()
    assert again.version == 5
    assert again.partitions[key].epoch == 2
    assert again.to_map() == s2.to_map()
    # A further step on the loaded state continues numbering from it.
    s3, _ = again.with_model(pb.ModelSpec(name="n", tables=[_table("c")]), ["s0", "s1", "s2"],
                             CoordinatorConfig(), 2)
    assert s3.version == 6 and s3.models[("n", 1)].tables[0].table_uid == 3
    if kind == "sqlite":
        store.close()
        reopened = SqliteStateStore(tmp_path / "state.db")
        assert reopened.load().to_map() == s2.to_map()
        reopened.close()


# ================================================================ coordinator service, fake clock

class Aborted(Exception):
    pass


class FakeContext:
    """What CoordinatorService / abort_with use of a grpc.ServicerContext."""

    def __init__(self):
        self.code = None
        self.details = None
        self.trailing = ()

    def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted(code, details)

    def set_trailing_metadata(self, md):
        self.trailing = md


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _states(svc) -> dict[str, str]:
    return {s.server_id: s.state for s in svc.shard_map().servers}


def test_coordinator_lease_with_fake_clock():
    clock = FakeClock()
    cfg = CoordinatorConfig(lease_s=5.0)
    svc = CoordinatorService(MemoryStateStore(), cfg, default_replication=2, clock=clock)
    for i in range(3):
        reply = svc.Register(pb.RegisterRequest(server_id=f"s{i}", address=f"h:{i}",
                                                memory_budget_bytes=1), FakeContext())
        assert reply.map_version == i + 1
    assert _states(svc) == {"s0": "alive", "s1": "alive", "s2": "alive"}

    clock.t += 3.0
    svc.Heartbeat(pb.HeartbeatRequest(server_id="s0", stats=pb.ServerStats(rows=7)),
                  FakeContext())
    clock.t += 2.5          # s1, s2 silent 5.5 s > lease; s0 silent 2.5 s
    assert svc.alive() == ["s0"]
    m = svc.shard_map()
    info = {s.server_id: s for s in m.servers}
    assert {k: v.state for k, v in info.items()} == {"s0": "alive", "s1": "dead", "s2": "dead"}
    assert info["s0"].last_heartbeat_age_s == pytest.approx(2.5)
    assert info["s1"].last_heartbeat_age_s == pytest.approx(5.5)
    assert info["s0"].stats.rows == 7

    # Exactly at the lease boundary a server still counts as alive.
    clock.t += 2.5
    assert "s0" in svc.alive()
    clock.t += 0.01
    assert svc.alive() == []

    # With one live server, a replication-2 model cannot be placed.
    svc.Heartbeat(pb.HeartbeatRequest(server_id="s1"), FakeContext())
    ctx = FakeContext()
    with pytest.raises(Aborted):
        svc.CreateModel(pb.CreateModelRequest(spec=pb.ModelSpec(name="m", tables=[_table("a")])),
                        ctx)
    assert ctx.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "replication 2" in ctx.details and "1 are alive" in ctx.details

    # Heartbeats bring servers back; then the model is placed on live servers only.
    svc.Heartbeat(pb.HeartbeatRequest(server_id="s2"), FakeContext())
    assert _states(svc) == {"s0": "dead", "s1": "alive", "s2": "alive"}
    version = svc.shard_map().version
    reply = svc.CreateModel(pb.CreateModelRequest(spec=pb.ModelSpec(name="m",
                                                                    tables=[_table("a")])),
                            FakeContext())
    assert reply.map.version == version + 1
    assert {s for rs in reply.map.partitions for s in rs.replicas} == {"s1", "s2"}

    # Unknown server: NOT_FOUND naming it.
    ctx = FakeContext()
    with pytest.raises(Aborted):
        svc.Heartbeat(pb.HeartbeatRequest(server_id="ghost"), ctx)
    assert ctx.code == grpc.StatusCode.NOT_FOUND and "'ghost'" in ctx.details


def test_coordinator_get_shard_map_and_restart():
    clock = FakeClock()
    store = MemoryStateStore()
    svc = CoordinatorService(store, CoordinatorConfig(), default_replication=1, clock=clock)
    svc.Register(pb.RegisterRequest(server_id="s0", address="h:0"), FakeContext())
    m = svc.GetShardMap(pb.GetShardMapRequest(), FakeContext())
    assert not m.unchanged and m.map.version == 1 and m.map.default_replication == 1
    assert svc.GetShardMap(pb.GetShardMapRequest(known_version=1), FakeContext()).unchanged
    svc.CreateModel(pb.CreateModelRequest(spec=pb.ModelSpec(name="m", tables=[_table("a")])),
                    FakeContext())
    reply = svc.SetReplicas(pb.SetReplicasRequest(table_uid=1, partition=0, replicas=["s0"]),
                            FakeContext())
    assert reply.partition.epoch == 2 and reply.map_version == 3
    # A restarted coordinator resumes the durable state. Liveness is soft: known servers get one
    # lease of grace from the restart, then are dead until they heartbeat.
    svc2 = CoordinatorService(store, CoordinatorConfig(), default_replication=1, clock=clock)
    m2 = svc2.shard_map()
    assert m2.version == 3
    assert [s.state for s in m2.servers] == ["alive"]
    assert {(rs.partition, rs.epoch) for rs in m2.partitions} == {(0, 2), (1, 1), (2, 1), (3, 1)}
    clock.t += CoordinatorConfig().lease_s + 0.1
    assert [s.state for s in svc2.shard_map().servers] == ["dead"]
    svc2.Heartbeat(pb.HeartbeatRequest(server_id="s0"), FakeContext())
    assert [s.state for s in svc2.shard_map().servers] == ["alive"]


# ================================================================ routing table

def _map_for_routing() -> pb.ShardMap:
    spec = TableSpec("t", 100, 4, "float32", "sum", ("f",), 4, table_uid=9)
    sets = [pb.ReplicaSet(table_uid=9, partition=0, replicas=["s0", "s1", "s2"], epoch=3),
            pb.ReplicaSet(table_uid=9, partition=1, replicas=["s1", "s2", "s3"], epoch=1),
            pb.ReplicaSet(table_uid=9, partition=2, replicas=["s3", "s0", "s1"], epoch=7),
            pb.ReplicaSet(table_uid=9, partition=3, replicas=["s2"], epoch=2)]
    return pb.ShardMap(version=12,
                       models=[pb.ModelSpec(name="m", version=1, tables=[spec.to_proto()])],
                       servers=[pb.ServerInfo(server_id=f"s{i}", address=f"h:{i}")
                                for i in range(4)],
                       partitions=sets)


def test_routing_table_build():
    rt = RoutingTable.build(_map_for_routing())
    assert rt.version == 12
    assert rt.server_ids == ("s0", "s1", "s2", "s3")
    assert rt.addresses == ("h:0", "h:1", "h:2", "h:3")
    tr = rt.model("m").table("t")
    np.testing.assert_array_equal(tr.replicas, [[0, 1, 2], [1, 2, 3], [3, 0, 1], [2, -1, -1]])
    np.testing.assert_array_equal(tr.epochs, [3, 1, 7, 2])
    assert rt.model("m").feature("f") is tr
    assert rt.model("m", version=1) is rt.model("m")
    with pytest.raises(NotFound, match="model 'x' does not exist"):
        rt.model("x")
    with pytest.raises(NotFound, match="no version 2"):
        rt.model("m", version=2)
    with pytest.raises(NotFound, match="table 'u' is not in model 'm'"):
        rt.model("m").table("u")
    with pytest.raises(NotFound, match="feature 'g' is not in model 'm'"):
        rt.model("m").feature("g")


def test_routing_choose_spreads_and_excludes():
    tr = RoutingTable.build(_map_for_routing()).model("m").table("t")
    seen = collections.defaultdict(collections.Counter)
    for rotation in range(60):
        chosen = tr.choose(rotation)
        assert chosen.shape == (4,)
        for p, s in enumerate(chosen):
            assert s in tr.replicas[p]
            seen[p][int(s)] += 1
        # The batch's preferred server (by rotation, the same for every table) takes every
        # partition it holds.
        preferred = [0, 1, 2, 3][rotation % 4]
        for p in range(4):
            if preferred in tr.replicas[p]:
                assert chosen[p] == preferred
    # Every replica of every partition serves reads across rotations.
    assert set(seen[0]) == {0, 1, 2} and set(seen[1]) == {1, 2, 3}
    assert set(seen[2]) == {3, 0, 1} and seen[3] == {2: 60}
    assert all(n >= 10 for p in range(3) for n in seen[p].values())

    for rotation in range(6):
        got = tr.choose(rotation, frozenset({1}))
        assert 1 not in got.tolist()
        assert got[0] in (0, 2) and got[1] in (2, 3) and got[2] in (3, 0) and got[3] == 2
    np.testing.assert_array_equal(tr.choose(0, frozenset({0, 1, 2})), [-1, 3, 3, -1])
    np.testing.assert_array_equal(tr.choose(5, frozenset({0, 1, 2, 3})), [-1, -1, -1, -1])
    assert not any(tr.holds_all(s) for s in range(4))


def test_routing_choose_concentrates_a_table_on_one_server():
    """With replication = servers every server holds every partition: one server per table."""
    spec = TableSpec("t", 100, 4, "float32", "sum", ("f",), 8, table_uid=1)
    m = pb.ShardMap(version=1, models=[pb.ModelSpec(name="m", version=1,
                                                    tables=[spec.to_proto()])],
                    servers=[pb.ServerInfo(server_id="a"), pb.ServerInfo(server_id="b")],
                    partitions=[pb.ReplicaSet(table_uid=1, partition=p, epoch=1,
                                              replicas=["a", "b"] if p % 2 else ["b", "a"])
                                for p in range(8)])
    tr = RoutingTable.build(m).model("m").table("t")
    picks = [tr.choose(r) for r in range(4)]
    for chosen in picks:
        assert len(set(chosen.tolist())) == 1
    assert {int(c[0]) for c in picks} == {0, 1}
    # Each answer is worked out once and shared, so it is read-only; a server that holds every
    # partition is routed all of them, whatever ids a request sends it.
    assert tr.choose(6) is tr.choose(2) and not tr.choose(2).flags.writeable
    assert tr.holds_all(0) and tr.holds_all(1)
    from shoal.wire import unpack
    assert unpack(tr.routed_all().partitions, "p").tolist() == list(range(8))
    assert unpack(tr.routed_all().epochs, "e").tolist() == [1] * 8


def test_check_ids():
    spec = TableSpec("t", 10, 4)
    check_ids(np.array([0, 9], np.int64), spec, "ids")
    check_ids(np.array([], np.int64), spec, "ids")
    with pytest.raises(InvalidArgument, match=r"ids: id 10 is out of range \[0, 10\)"):
        check_ids(np.array([3, 10]), spec, "ids")
    with pytest.raises(InvalidArgument, match=r"ids: id -1 is out of range \[0, 10\)"):
        check_ids(np.array([-1, 10]), spec, "ids")


# ================================================================ wire

def test_wire_bfloat16_round_trip():
    from shoal.wire import to_torch
    x = torch.randn(3, 5).to(torch.bfloat16)
    t = pb.Tensor.FromString(pack(x).SerializeToString())
    assert t.dtype == "bfloat16" and list(t.shape) == [3, 5] and len(t.data) == 30
    y = to_torch(t, "x", "bfloat16", 2)
    assert y.dtype == torch.bfloat16 and torch.equal(y, x)
    assert torch.equal(to_torch(pack(x[:, ::2]), "x"), x[:, ::2])
    assert unpack(t, "x").dtype == np.uint16              # numpy sees the 16-bit patterns
    assert pack(x, "float32").dtype == "float32"          # an explicit dtype converts
    with pytest.raises(InvalidArgument, match="x: dtype is bfloat16, expected float32"):
        to_torch(t, "x", "float32")


@pytest.mark.parametrize("dtype", [d for d in ALLOWED_DTYPES if d != "bfloat16"])
def test_wire_round_trip(dtype):
    a = (np.arange(24) - 7).astype(dtype).reshape(2, 3, 4)
    t = pack(a)
    assert t.dtype == dtype and list(t.shape) == [2, 3, 4]
    assert len(t.data) == a.nbytes
    b = unpack(t, "x", dtype, 3)
    assert b.dtype == np.dtype(dtype) and not b.flags.writeable
    np.testing.assert_array_equal(b, a)
    # Through serialisation, from a non-contiguous view, from big-endian, and from torch.
    t2 = pb.Tensor.FromString(pack(a[:, ::2, 1:]).SerializeToString())
    np.testing.assert_array_equal(unpack(t2, "x"), a[:, ::2, 1:])
    big = a.astype(np.dtype(dtype).newbyteorder(">"))
    np.testing.assert_array_equal(unpack(pack(big), "x"), a)
    assert pack(big).data == t.data
    np.testing.assert_array_equal(unpack(pack(torch.from_numpy(a.copy())), "x"), a)
    # Empty arrays.
    e = unpack(pack(np.zeros((0, 5), dtype)), "x", dtype, 2)
    assert e.shape == (0, 5) and e.dtype == np.dtype(dtype)


def test_wire_pack_cast_and_is_set():
    t = pack(np.array([1.5, 2.5]), "float32")
    assert t.dtype == "float32"
    np.testing.assert_array_equal(unpack(t, "w"), np.array([1.5, 2.5], np.float32))
    assert is_set(t) and not is_set(pb.Tensor())


def test_wire_errors():
    with pytest.raises(InvalidArgument) as e:
        unpack(pack(np.zeros(3, np.float64)), "rows")
    assert "rows: dtype 'float64' is not supported" in e.value.message
    assert "int64, int32, float32, float16" in e.value.message
    with pytest.raises(InvalidArgument, match="ids: dtype is float32, expected int64 or int32"):
        unpack(pack(np.zeros(3, np.float32)), "ids", ("int64", "int32"))
    with pytest.raises(InvalidArgument, match=r"ids: shape \[2, 3\] has 2 dimensions, expected 1"):
        unpack(pack(np.zeros((2, 3), np.int64)), "ids", "int64", 1)
    with pytest.raises(InvalidArgument, match=r"ids: shape \[-1\] has a negative dimension"):
        unpack(pb.Tensor(dtype="int64", shape=[-1], data=b""), "ids")
    with pytest.raises(InvalidArgument,
                       match=r"ids: 12 bytes do not match shape \[2\] of int64 \(16 bytes\)"):
        unpack(pb.Tensor(dtype="int64", shape=[2], data=bytes(12)), "ids")
    with pytest.raises(InvalidArgument, match="dtype '' is not supported"):
        unpack(pb.Tensor(), "weights")
    with pytest.raises(InvalidArgument, match="dtype 'object' is not supported"):
        unpack(pb.Tensor(dtype="object", shape=[1], data=bytes(8)), "x")


# ================================================================ config

def test_config_json_round_trip():
    cfg = ShoalConfig().replace(router__max_ids_per_request=100, server__heartbeat_interval_s=3.0,
                                coordinator__lease_s=1.5)
    assert cfg.router.max_ids_per_request == 100
    assert cfg.server.heartbeat_interval_s == 3.0 and cfg.coordinator.lease_s == 1.5
    assert ShoalConfig().router.max_ids_per_request == 1_000_000     # the default is untouched
    back = ShoalConfig.from_json(cfg.to_json())
    assert back == cfg
    assert ShoalConfig.from_json("") == ShoalConfig()
    assert ShoalConfig.from_json('{"router": {"rpc_timeout_s": 2}}').router.rpc_timeout_s == 2
    assert ShoalConfig.from_json('{"router": {"rpc_timeout_s": 2}}').server == ShoalConfig().server


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown sections \['routr'\]"):
        ShoalConfig.from_json('{"routr": {}}')
    with pytest.raises(ValueError, match=r"config.router: unknown keys \['max_ids'\]"):
        ShoalConfig.from_json('{"router": {"max_ids": 5}}')
    with pytest.raises(ValueError, match=r"config.server: unknown keys"):
        ShoalConfig.from_json('{"server": {"threads": 1, "bogus": 2}}')
    with pytest.raises(TypeError):
        ShoalConfig().replace(router__bogus=1)


# ================================================================ batcher

def test_batcher_merges_concurrent_items():
    calls = []

    async def execute(items):
        calls.append(list(items))
        await asyncio.sleep(0)
        return [x * 10 for x in items]

    async def main():
        b = Batcher(execute, window_s=0.5, max_ids=10_000)
        results = await asyncio.gather(*(b.run(i, "m", 1) for i in range(8)))
        assert results == [i * 10 for i in range(8)]
        assert len(calls) == 1 and sorted(calls[0]) == list(range(8))
        # Different keys are executed separately, in the same merged batch.
        calls.clear()
        out = await asyncio.gather(b.run("a1", "A", 1), b.run("b1", "B", 1),
                                   b.run("a2", "A", 1))
        assert out == ["a1" * 10, "b1" * 10, "a2" * 10]
        assert sorted(map(sorted, calls)) == [["a1", "a2"], ["b1"]]

    asyncio.run(main())


def test_batcher_max_ids_closes_window():
    calls = []

    async def execute(items):
        calls.append(list(items))
        return list(items)

    async def main():
        b = Batcher(execute, window_s=30.0, max_ids=6)   # a window no test would wait out
        t0 = time.monotonic()
        assert await asyncio.gather(b.run(0, "m", 3), b.run(1, "m", 3)) == [0, 1]
        assert time.monotonic() - t0 < 10                # closed by max_ids, not the window
        assert len(calls) == 1 and sorted(calls[0]) == [0, 1]

    asyncio.run(main())


def test_batcher_lone_request_waits_only_the_window():
    async def execute(items):
        return [i + 1 for i in items]

    async def main():
        b = Batcher(execute, window_s=0.01, max_ids=100)
        t0 = time.monotonic()
        assert await b.run(1, "m", 1) == 2
        assert time.monotonic() - t0 < 1.0

    asyncio.run(main())


def test_step_batcher_merges_callers_in_lockstep_and_never_holds_a_lone_one():
    sizes, windows = [], []

    async def execute(items):
        sizes.append(len(items))
        await asyncio.sleep(0.02)              # a step's work: callers come back after it
        if "bad" in items:
            raise ValueError("the batch failed")
        return [f"{i}!" for i in items]

    async def caller(b, name, steps, key="L"):
        for s in range(steps):
            assert await b.run(f"{name}.{s}", key, 1) == f"{name}.{s}!"
            await asyncio.sleep(0.001 * (hash(name) % 3))    # callers return a bit apart

    async def main():
        b = StepBatcher(execute, window_s=5.0, max_ids=1_000)   # a window no step waits out
        t0 = time.monotonic()
        await caller(b, "lone", 5)
        assert sizes == [1] * 5 and time.monotonic() - t0 < 2.0   # never waited the window
        sizes.clear()
        t0 = time.monotonic()
        await asyncio.gather(*(caller(b, f"c{i}", 6) for i in range(8)))
        # One batch of all 8 a step, each waiting for the last caller to come back.
        assert sizes == [8] * 6, sizes
        assert time.monotonic() - t0 < 3.0 and b.merged == 6 * 8 and b.batches == 11
        # Keys run apart (each its own steps); an error fails its whole batch only.
        sizes.clear()
        out = await asyncio.gather(b.run("a", "A", 1), b.run("bad", "B", 1),
                                   return_exceptions=True)
        assert out[0] == "a!" and isinstance(out[1], ValueError)
        # max_ids: a batch takes calls up to the cap (a call alone may exceed it).
        b2 = StepBatcher(execute, window_s=5.0, max_ids=5)
        sizes.clear()
        got = await asyncio.gather(*(b2.run(i, "m", 3) for i in range(4)), b2.run(9, "m", 7))
        assert got == ["0!", "1!", "2!", "3!", "9!"] and sizes == [1, 1, 1, 1, 1]
        # A caller that left is waited for once (calls stop coming: one gap), then not.
        b3 = StepBatcher(execute, window_s=5.0, max_ids=100, gap_s=0.05)
        sizes.clear()
        await asyncio.gather(b3.run("x", "m", 1), b3.run("y", "m", 1))
        t0 = time.monotonic()
        await b3.run("x2", "m", 1)                  # y does not come back
        windows.append(time.monotonic() - t0)
        t0 = time.monotonic()
        await b3.run("x3", "m", 1)
        windows.append(time.monotonic() - t0)
        assert sizes == [2, 1, 1], sizes
        assert 0.05 <= windows[0] < 2.0 and windows[1] < 0.05 + 0.02 + 0.02, windows
    asyncio.run(main())


def test_step_batcher_lanes_settle_lockstep_callers_into_overlapping_halves():
    sizes, running, peak = [], [0], [0]

    async def execute(items):
        sizes.append(len(items))
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.02)
        running[0] -= 1
        return [f"{i}!" for i in items]

    async def caller(b, name, steps):
        for s in range(steps):
            assert await b.run(f"{name}.{s}", "L", 1) == f"{name}.{s}!"
            await asyncio.sleep(0.001)

    async def main():
        b = StepBatcher(execute, window_s=5.0, max_ids=1_000, lanes=2)
        t0 = time.monotonic()
        await asyncio.gather(*(caller(b, f"c{i}", 8) for i in range(8)))
        assert sum(sizes) == 64 and peak[0] == 2, (sizes, peak)
        assert sizes[-6:] == [4] * 6, sizes              # two groups of 4, overlapping
        assert time.monotonic() - t0 < 4.0

    asyncio.run(main())


def test_step_batcher_drops_a_batch_every_caller_gave_up_on():
    """A batch stuck on a hung server holds its lane only until its callers' deadlines; a
    batch cancelled from inside fails its callers with UNAVAILABLE, never leaves them waiting."""
    from shoal.errors import Unavailable

    async def execute(items):
        if "hang" in items:
            await asyncio.sleep(30)
        if "inner" in items:
            raise asyncio.CancelledError()
        return [f"{i}!" for i in items]

    async def main():
        b = StepBatcher(execute, window_s=0.01, max_ids=100, lanes=1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.run("hang", "L", 1), 0.1)
        t0 = time.monotonic()
        assert await asyncio.wait_for(b.run("next", "L", 1), 5) == "next!"
        assert time.monotonic() - t0 < 1.0          # the hung batch was cancelled
        with pytest.raises(Unavailable, match="cancelled"):
            await asyncio.wait_for(b.run("inner", "L", 1), 5)

    asyncio.run(main())


def test_batcher_exception_reaches_every_waiter():
    boom = ValueError("shard exploded")
    calls = []

    async def execute(items):
        calls.append(list(items))
        raise boom

    async def main():
        b = Batcher(execute, window_s=0.3, max_ids=10_000)
        results = await asyncio.gather(*(b.run(i, "m", 1) for i in range(5)),
                                       return_exceptions=True)
        assert all(r is boom for r in results)
        assert len(calls) == 1 and sorted(calls[0]) == [0, 1, 2, 3, 4]

        async def ok(items):
            return [i + 1 for i in items]

        b._execute = ok                  # the batcher keeps working after a failed batch
        assert await b.run(1, "m", 1) == 2

    asyncio.run(main())


def test_batcher_survives_a_cancelled_leader():
    async def execute(items):
        await asyncio.sleep(0.05)
        return [i * 2 for i in items]

    async def main():
        b = Batcher(execute, window_s=0.05, max_ids=100)
        leader = asyncio.create_task(b.run(1, "m", 1))
        await asyncio.sleep(0)
        follower = asyncio.create_task(b.run(2, "m", 1))
        await asyncio.sleep(0)
        leader.cancel()
        assert await follower == 4

    asyncio.run(main())


# ================================================================ RocksDB row store

def _rows(rng, n, dim, dtype=np.float32):
    return rng.standard_normal((n, dim)).astype(dtype)


def test_rocks_row_store(tmp_path):
    P, dim = 4, 6
    row_bytes = dim * 4
    rng = np.random.default_rng(0)
    store = RocksRowStore(tmp_path, block_cache_bytes=1 << 20, sst_threshold_rows=50)
    expected: dict[tuple[int, int], np.ndarray] = {}

    def write(uid, ids):
        ids = np.asarray(ids, np.int64)
        rows = _rows(rng, len(ids), dim)
        store.write_rows(uid, partition_of(ids, P), ids, rows)
        for i, r in zip(ids.tolist(), rows):
            expected[(uid, i)] = r

    write(1, rng.permutation(40))                                  # WriteBatch path (< 50)
    write(1, rng.permutation(np.arange(40, 300)))                  # SST path (>= 50)
    write(2, np.arange(0, 200, 3))                                 # SST, another table
    big = np.array([2**33 + 1, 2**40 + 5, 2**33 + 9], np.int64)    # ids beyond 32 bits
    write(1, big)
    write(1, [5, 17, 250])                                         # overwrite via WriteBatch
    write(1, np.arange(100, 160))                                  # overwrite via SST
    assert len(list(tmp_path.joinpath("sst-tmp").iterdir())) == 0  # temp SSTs cleaned up

    def check(s):
        for uid in (1, 2):
            ids = np.array(sorted(i for (u, i) in expected if u == uid) + [301, 2**41],
                           np.int64)
            raw = s.read_rows(uid, partition_of(ids, P), ids, row_bytes)
            got = np.frombuffer(raw, np.float32).reshape(len(ids), dim)
            want = np.stack([expected[(uid, i)] for i in ids[:-2].tolist()])
            np.testing.assert_array_equal(got[:-2], want)
            assert not got[-2:].any()                              # never written: zeros
            for p in range(P):
                sids, sraw = s.scan_partition(uid, p)
                mine = np.array(sorted(i for (u, i) in expected if u == uid and i % P == p),
                                np.int64)
                np.testing.assert_array_equal(sids, mine)
                np.testing.assert_array_equal(
                    np.frombuffer(sraw, np.float32).reshape(len(sids), dim),
                    np.stack([expected[(uid, i)] for i in mine.tolist()]))
        assert s.read_rows(1, np.zeros(0, np.int64), np.zeros(0, np.int64), row_bytes) == b""
        ids, raw = s.scan_partition(3, 0)
        assert len(ids) == 0 and raw == b""

    check(store)
    store.close()
    reopened = RocksRowStore(tmp_path, block_cache_bytes=1 << 20, sst_threshold_rows=50)
    try:
        check(reopened)
    finally:
        reopened.close()


# ================================================================ memory arena

@pytest.mark.parametrize("checkpoint", [False, True])
def test_partition_snapshot_is_a_point_in_time_view(tmp_path, checkpoint):
    """What a leader streams to a learner: the partition as it was when the snapshot was taken,
    whatever is written, deleted or flushed after (iterator or checkpoint alike)."""
    store = RocksRowStore(tmp_path, block_cache_bytes=1 << 20, sst_threshold_rows=1000)
    P = 4
    ids = np.arange(0, 4000, P, dtype=np.int64)                  # partition 0
    rows = np.repeat(ids[:, None], 3, 1).astype(np.float32)
    store.write_rows(7, np.zeros(len(ids), np.int64), ids, rows)  # an SST file
    store.write_rows(7, np.zeros(2, np.int64), ids[:2], rows[:2] + 0.5)   # the memtable
    snap = store.snapshot_partition(7, 0, checkpoint=checkpoint)
    store.write_rows(7, np.zeros(3, np.int64), ids[5:8], rows[5:8] * -1)  # after: unseen
    store.write_rows(7, np.zeros(1, np.int64), np.array([4000]), np.ones((1, 3), np.float32))
    first_ids, first = snap.read(100)
    store.drop_partition(7, 0)                                    # even a drop mid-stream
    rest_ids, rest = snap.read(10_000)
    assert snap.read(10)[0].size == 0
    snap.close()
    got_ids = np.concatenate([first_ids, rest_ids])
    got = np.frombuffer(first + rest, np.float32).reshape(-1, 3)
    want = rows.copy()
    want[:2] += 0.5
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got, want)
    assert not list((tmp_path / "checkpoints").glob("*"))        # a checkpoint is deleted
    store.close()


def test_positions_are_stored_with_their_rows(tmp_path):
    store = RocksRowStore(tmp_path, block_cache_bytes=1 << 20, sst_threshold_rows=4)
    ids = np.arange(8, dtype=np.int64)
    parts = ids & 1
    rows = np.ones((8, 2), np.float32)
    store.write_rows(3, parts[:2], ids[:2], rows[:2],              # a WriteBatch
                     (np.array([0, 1]), np.array([5, 6]), np.array([2, 2])))
    store.write_rows(3, parts, ids, rows,                          # an SST file
                     (np.array([1]), np.array([7]), np.array([3])))
    assert [x.tolist() for x in store.read_positions(3, 4)] == [[5, 7, 0, 0], [2, 3, 0, 0]]
    assert store.stored_partitions() == {(3, 0), (3, 1)}
    store.drop_partition(3, 1)
    assert store.stored_partitions() == {(3, 0)}
    assert [x.tolist() for x in store.read_positions(3, 2)] == [[5, 0], [2, 0]]
    store.close()
    reopened = RocksRowStore(tmp_path, block_cache_bytes=1 << 20)
    assert reopened.read_positions(3, 2)[0].tolist() == [5, 0]
    reopened.close()


def test_table_arena_set_partitions_keeps_resident_rows():
    n, dim, P = 103, 3, 4
    arena = TableArena(n, dim, torch.float32, P)
    assert arena.rows_per_partition == 26
    weights = torch.arange(n * dim, dtype=torch.float32).view(n, dim) + 1
    ids = np.arange(n, dtype=np.int64)
    parts = partition_of(ids, P)

    assert arena.set_partitions([0, 1, 2]) == [0, 1, 2]
    for p in (0, 1, 2):
        mine = ids[parts == p]
        arena.fill(p, mine, weights[torch.from_numpy(mine)])
    idx = arena.rows_index(ids, parts)
    assert (idx[parts == 3] == -1).all() and (idx[parts != 3] >= 0).all()
    res = parts != 3
    torch.testing.assert_close(arena.weight[torch.from_numpy(idx[res])],
                               weights[torch.from_numpy(ids[res])], rtol=0, atol=0)
    assert arena.nbytes == 3 * 26 * dim * 4

    assert arena.set_partitions([2, 3, 1]) == [3]      # 0 leaves, 3 is new, 1 and 2 stay
    assert [arena.resident(p) for p in range(P)] == [False, True, True, True]
    idx = arena.rows_index(ids, parts)
    assert (idx[parts == 0] == -1).all()
    kept = (parts == 1) | (parts == 2)
    torch.testing.assert_close(arena.weight[torch.from_numpy(idx[kept])],
                               weights[torch.from_numpy(ids[kept])], rtol=0, atol=0)
    assert not arena.weight[torch.from_numpy(idx[parts == 3])].any()   # new: zero until filled

    assert arena.set_partitions([]) == []
    assert arena.nbytes == 0 and (arena.rows_index(ids, parts) == -1).all()


# ================================================================ failure detection

def _cluster(clock, servers=("s0", "s1", "s2"), replication=2, parts=8, builds=0,
             build_replica=None):
    """``builds``: copies one server may build at once (0: re-replication off)."""
    svc = CoordinatorService(MemoryStateStore(),
                             CoordinatorConfig(lease_s=5.0, max_builds_per_server=builds),
                             default_replication=replication, clock=clock,
                             build_replica=build_replica)
    for s in servers:
        svc.Register(pb.RegisterRequest(server_id=s, address=f"h:{s}"), FakeContext())
    svc.CreateModel(pb.CreateModelRequest(spec=pb.ModelSpec(name="m", tables=[
        _table("a", parts=parts)])), FakeContext())
    return svc


def test_reconcile_drops_a_server_whose_lease_ran_out():
    clock = FakeClock()
    svc = _cluster(clock)
    before = svc.shard_map()
    assert svc.reconcile() == []                         # everyone alive: nothing to do
    acted = []
    for _ in range(6):                                   # a pass a second, as the loop does
        clock.t += 1.0
        for s in ("s0", "s1"):
            svc.Heartbeat(pb.HeartbeatRequest(server_id=s), FakeContext())
        acted += svc.reconcile()
    assert acted == ["s2"]                               # s2 silent for 6 s > lease 5 s
    after = svc.shard_map()
    assert after.version == before.version + 1
    old = {rs.partition: rs for rs in before.partitions}
    for rs in after.partitions:
        prev = old[rs.partition]
        if "s2" in prev.replicas:
            assert list(rs.replicas) == [s for s in prev.replicas if s != "s2"]
            assert rs.epoch == prev.epoch + 1            # fenced: a new epoch
            if prev.replicas[0] == "s2":                 # a new leader from the in-sync rest
                assert rs.replicas[0] == prev.replicas[1]
        else:
            assert list(rs.replicas) == list(prev.replicas) and rs.epoch == prev.epoch
    assert {s.server_id: s.state for s in after.servers}["s2"] == "dead"
    assert svc.reconcile() == []                         # idempotent
    assert svc.shard_map().version == after.version


def test_reconcile_keeps_an_only_replica():
    clock = FakeClock()
    svc = _cluster(clock, servers=("s0", "s1"), replication=1)
    before = {rs.partition: (list(rs.replicas), rs.epoch) for rs in svc.shard_map().partitions}
    for _ in range(6):
        clock.t += 1.0
        svc.Heartbeat(pb.HeartbeatRequest(server_id="s0"), FakeContext())
        assert svc.reconcile() == []                     # s1's data lives nowhere else
    assert {rs.partition: (list(rs.replicas), rs.epoch)
            for rs in svc.shard_map().partitions} == before


def test_report_failure_drops_the_replica_from_named_partitions_only():
    clock = FakeClock()
    svc = _cluster(clock)
    m = svc.shard_map()
    # Partitions where s1 follows s0: s0, their leader, reports s1.
    mine = sorted(rs.partition for rs in m.partitions if list(rs.replicas) == ["s0", "s1"])
    assert len(mine) >= 2
    uid = m.partitions[0].table_uid
    reply = svc.ReportFailure(pb.ReportFailureRequest(
        server_id="s1", reporter="s0", table_uid=uid, partitions=mine[:1],
        reason="connection refused"), FakeContext())
    after = {rs.partition: rs for rs in svc.shard_map().partitions}
    assert reply.map_version == m.version + 1
    assert list(after[mine[0]].replicas) == ["s0"]
    assert after[mine[0]].epoch == {rs.partition: rs for rs in m.partitions}[mine[0]].epoch + 1
    assert all("s1" in after[p].replicas for p in mine[1:])
    # Reporting again changes nothing.
    again = svc.ReportFailure(pb.ReportFailureRequest(
        server_id="s1", reporter="s0", table_uid=uid, partitions=mine[:1]), FakeContext())
    assert again.map_version == reply.map_version
    # Only the partition's live leader may report: a follower, or anyone else, is refused.
    ctx = FakeContext()
    with pytest.raises(Aborted):
        svc.ReportFailure(pb.ReportFailureRequest(
            server_id="s0", reporter="s1", table_uid=uid, partitions=mine[1:2]), ctx)
    assert ctx.code == grpc.StatusCode.FAILED_PRECONDITION and "does not lead" in ctx.details
    ctx = FakeContext()
    with pytest.raises(Aborted):
        svc.ReportFailure(pb.ReportFailureRequest(
            server_id="s1", reporter="router", table_uid=uid, partitions=mine[1:2]), ctx)
    assert ctx.code == grpc.StatusCode.FAILED_PRECONDITION and "not a live server" in ctx.details
    assert svc.shard_map().version == reply.map_version


# ================================================================ hedging and retry budget

def test_latency_tracker_and_hedge_delay():
    from router.hedging import Hedger, LatencyTracker, RetryBudget

    tracker = LatencyTracker(window=100, percentile=95, every=1)
    hedger = Hedger(True, factor=1.0, min_delay_s=0.002, min_samples=20,
                    budget=RetryBudget(0.1, 10.0, clock=FakeClock()), tracker=tracker)
    assert hedger.delay(0) is None                       # too few samples: no hedging yet
    for i in range(100):
        tracker.observe(0, 0.010 + i * 1e-5)             # fast server: ~10-11 ms
        tracker.observe(1, 0.200)                        # a server 200 ms slow
    assert tracker.percentile(0, 20) == pytest.approx(np.percentile(
        [0.010 + i * 1e-5 for i in range(100)], 95))
    # Hedge after the fastest server's p95, whichever server was asked.
    assert hedger.delay(1) == pytest.approx(tracker.percentile(0, 20))
    assert hedger.slow(probe=False) == frozenset({1})
    assert hedger.slow(probe=True) == frozenset()        # probes still reach it
    assert Hedger(False, 1.0, 0.002, 20, hedger.budget, tracker).delay(0) is None
    floor = Hedger(True, 1.0, 0.5, 20, hedger.budget, tracker)
    assert floor.delay(0) == 0.5


def test_retry_budget_caps_hedges_and_retries():
    from router.hedging import RetryBudget

    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, min_per_s=10.0, cap=100.0, clock=clock)
    spent = 0
    while budget.withdraw():                             # the initial tokens (cap / 10)
        spent += 1
    assert spent == 10
    for _ in range(50):
        budget.deposit()                                 # 50 requests -> 5 tokens
    assert sum(budget.withdraw() for _ in range(10)) == 5
    clock.t += 0.5                                       # 0.5 s -> 5 tokens
    assert sum(budget.withdraw() for _ in range(10)) == 5
    clock.t += 1000.0                                    # never more than the cap
    assert sum(budget.withdraw() for _ in range(200)) == 100


def test_reconcile_does_not_blame_servers_for_its_own_stall():
    clock = FakeClock()
    svc = _cluster(clock)
    before = svc.shard_map().version
    assert svc.reconcile() == []
    clock.t += 30.0                     # the coordinator was paused; no pass, no heartbeats
    assert svc.reconcile() == []        # leases extended by the stall, nobody dropped
    assert svc.shard_map().version == before
    clock.t += 1.0
    for s in ("s0", "s1"):
        svc.Heartbeat(pb.HeartbeatRequest(server_id=s), FakeContext())
    for _ in range(6):                  # passes keep running; s2 stays silent past its lease
        clock.t += 1.0
        svc.reconcile()
    assert "s2" not in {r for rs in svc.shard_map().partitions for r in rs.replicas}


def test_reconcile_does_nothing_when_every_server_is_silent():
    clock = FakeClock()
    svc = _cluster(clock)
    before = svc.shard_map().version
    for _ in range(10):                 # regular passes, but no server heartbeats at all
        clock.t += 1.0
        svc.reconcile()
    assert svc.shard_map().version == before


def test_rebuild_adds_learners_then_promotes_them():
    clock = FakeClock()
    asked = []
    svc = _cluster(clock, servers=("s0", "s1", "s2", "s3"), builds=2,
                   build_replica=lambda addr, req: asked.append((addr, req)))
    first = {rs.partition: rs for rs in svc.shard_map().partitions}
    assert svc.reconcile() == [] and asked == []         # fully replicated: nothing to build
    for _ in range(6):                                   # s3 goes silent
        clock.t += 1.0
        for s in ("s0", "s1", "s2"):
            svc.Heartbeat(pb.HeartbeatRequest(server_id=s), FakeContext())
        svc.reconcile()
    m = svc.shard_map()
    lost = sorted(p for p, rs in first.items() if "s3" in rs.replicas)
    assert lost
    building = collections.Counter()
    for rs in m.partitions:
        assert "s3" not in rs.replicas and "s3" not in rs.learners
        if rs.partition in lost:
            assert len(rs.replicas) == 1 and len(rs.learners) == 1
            assert rs.learners[0] not in rs.replicas
            building[rs.learners[0]] += 1
        else:
            assert not rs.learners
    assert all(n <= 2 for n in building.values())        # the per-server cap
    # Each learner was asked once, with a live replica as its source.
    assert sorted((req.partition, addr) for addr, req in asked) == sorted(
        (rs.partition, f"h:{rs.learners[0]}") for rs in m.partitions if rs.learners)
    now = {rs.partition: rs for rs in m.partitions}
    for _, req in asked:                                 # the source is the partition's leader
        assert req.source_address == f"h:{now[req.partition].replicas[0]}"
        assert req.source_id == now[req.partition].replicas[0]
    svc.reconcile()
    assert len(asked) == len(lost)                       # not re-asked before build_resend_s
    # A learner reports: it becomes a replica, epoch + 1; a stranger's report changes nothing.
    rs = next(rs for rs in m.partitions if rs.learners)
    svc.ReplicaReady(pb.ReplicaReadyRequest(server_id="s9", table_uid=rs.table_uid,
                                            partition=rs.partition), FakeContext())
    # Caught up with a server that does not lead the partition: not promoted.
    svc.ReplicaReady(pb.ReplicaReadyRequest(
        server_id=rs.learners[0], table_uid=rs.table_uid, partition=rs.partition,
        epoch=rs.epoch, rows=10, leader="s3"), FakeContext())
    assert svc.shard_map().version == m.version
    reply = svc.ReplicaReady(pb.ReplicaReadyRequest(
        server_id=rs.learners[0], table_uid=rs.table_uid, partition=rs.partition,
        epoch=rs.epoch, rows=10, leader=rs.replicas[0]), FakeContext())
    done = {x.partition: x for x in svc.shard_map().partitions}[rs.partition]
    assert list(done.replicas) == list(rs.replicas) + [rs.learners[0]]
    assert not done.learners and done.epoch == rs.epoch + 1
    assert reply.map_version == svc.shard_map().version


@pytest.mark.parametrize("huge", [False, True])
def test_arena_pages_are_small_unless_asked(huge):
    """The arena's mapping is advised for 4 KiB pages (or huge ones), as the kernel reports it
    in /proc/self/smaps; it starts zeroed and maps pages only when written."""
    import pathlib
    arena = TableArena(1 << 16, 64, torch.float32, 4, huge_pages=huge)   # 16 MiB
    assert float(arena.weight.abs().sum()) == 0.0
    start = arena.weight.data_ptr()
    smaps = pathlib.Path("/proc/self/smaps")
    if not smaps.exists():
        pytest.skip("no /proc/self/smaps here")
    import re
    fields, inside = {}, False
    for ln in smaps.read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", ln)
        if m:
            inside = int(m.group(1), 16) <= start < int(m.group(2), 16)
        elif inside:
            k, _, v = ln.partition(":")
            fields[k] = v.strip()
    flags = fields["VmFlags"].split()
    assert ("nh" in flags) != huge and ("hg" in flags) == huge, flags
    assert int(fields["Rss"].split()[0]) < 1024        # KiB: nothing written yet


def test_a_catching_up_copy_reports_its_lag_in_entries():
    """``shoal_replication_lag_entries``: after each catch-up call that does not reach the
    leader's head, the entries between the copy's position and the head the leader named;
    the series goes when the build ends."""
    from shards.replication import ReplicaBuilder
    from shoal.metrics import REPLICATION_LAG_ENTRIES

    class Svc:                                  # the copy's position after each call
        server_id, positions = "s9", iter([(4, 1), (9, 1)])

        def apply_caught_up(self, uid, entries):
            return len(entries), True

        def position(self, uid, p):
            return next(self.positions)

    seen = []

    class Stub:                                 # the leader: head 10, then 12, then attached
        replies = iter([pb.CatchUpReply(head_seq=10), pb.CatchUpReply(head_seq=12),
                        pb.CatchUpReply(attached=True, head_seq=12)])

        def CatchUp(self, request, timeout):    # noqa: N802
            if seen:
                seen.append(REPLICATION_LAG_ENTRIES.labels("77", "3")._value.get())
            else:
                seen.append(None)
            return next(self.replies)

    b = ReplicaBuilder(Svc(), report=lambda r: None, mib_per_s=1e9)
    req = pb.BuildReplicaRequest(table_uid=77, partition=3, map_version=1)
    assert b._catch_up(Stub(), req, (0, 0)) == 0
    assert seen == [None, 10 - 4, 12 - 9]


def test_merge_of_alike_queries_equals_the_general_merge():
    """A predict batch's queries (same keys, a table each, no weights) are merged with a few
    array operations; the works and slots equal the general per-query, per-key merge."""
    import router.pooled as pooled
    from router.routing import ModelRoute, TableRoute
    tables, features = {}, {}
    for i, n in enumerate(["t2", "t0", "t1"]):
        spec = TableSpec(n, 1000, 4, feature_names=(f"f{n}",), num_partitions=4,
                         table_uid=i + 1)
        tables[n] = TableRoute(spec, np.zeros((4, 1), np.int32), np.ones(4, np.int64),
                               np.zeros((4, 1), np.int32))
        features[f"f{n}"] = (n, i)
    model = ModelRoute("m", 1, tables, features)
    rng = np.random.default_rng(0)
    queries = []
    for B, dtype in ((3, np.int32), (5, np.int64), (0, np.int32), (1, np.int32)):
        lengths = rng.integers(0, 4, size=3 * B).astype(np.int64)
        values = rng.integers(0, 1000, size=int(lengths.sum())).astype(dtype)
        queries.append(pooled.Query(model, ["ft1", "ft2", "ft0"], values, lengths, None, B))
    fast, fast_slots = pooled.merge(queries)
    plan = queries[0].plan
    object.__setattr__(plan, "distinct_tables", False)     # the general path
    try:
        slow, slow_slots = pooled.merge(queries)
    finally:
        object.__setattr__(plan, "distinct_tables", True)
    assert list(fast) == list(slow) and fast_slots == slow_slots
    for t in fast:
        np.testing.assert_array_equal(fast[t].ids, slow[t].ids)
        np.testing.assert_array_equal(fast[t].lengths, slow[t].lengths)


def test_failpoints_pause_until_lifted_sleep_and_cost_nothing_when_off(tmp_path):
    import threading
    import time

    from shards.failpoints import Failpoints, arm

    off = Failpoints(None)
    arm(tmp_path, {"map.apply": "pause"})
    t0 = time.monotonic()
    off.hit("map.apply")                              # off: never reads the file
    assert time.monotonic() - t0 < 0.05
    on = Failpoints(tmp_path)
    on.hit("other.point")                             # not named: passes
    threading.Timer(0.3, lambda: arm(tmp_path, {})).start()
    t0 = time.monotonic()
    on.hit("map.apply")                               # held until the test lifts it
    assert 0.25 < time.monotonic() - t0 < 5
    arm(tmp_path, {"map.apply": "sleep:0.2"})
    t0 = time.monotonic()
    on.hit("map.apply")
    assert 0.15 < time.monotonic() - t0 < 5
    (tmp_path / "failpoints.json").write_text("{half")  # a torn file reads as off
    on.hit("map.apply")
