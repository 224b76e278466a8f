"""The rebalancer on synthetic clusters (pure: no servers)."""
from __future__ import annotations

import grpc
import pytest

from coordinator.placement import PartitionLoad, ServerLoad, place
from coordinator.rebalance import ServerSpec, plan_moves
from shoal.errors import ShoalError

MIB = 2**20


def cluster(n_servers: int, n_parts: int, replication: int = 2, size: int = 64 * MIB):
    servers = [f"s{i:02d}" for i in range(n_servers)]
    parts = [PartitionLoad(1, p, size) for p in range(n_parts)]
    replicas = place(parts, [ServerLoad(s) for s in servers], replication)
    return replicas, {k: size for k in replicas}, servers


def check(plan, replicas):
    """Apply the plan: replicas stay distinct, every move's source held the partition."""
    now = {k: list(r) for k, r in replicas.items()}
    for m in plan.moves:
        assert m.source in now[m.key] and m.target not in now[m.key]
        now[m.key] = [m.target if r == m.source else r for r in now[m.key]]
    return now


def test_adding_one_server_to_ten_moves_about_one_eleventh():
    replicas, sizes, servers = cluster(10, 220)              # 440 replicas, 44 per server
    plan = plan_moves(replicas, sizes, [ServerSpec(s) for s in servers + ["s10"]])
    check(plan, replicas)
    assert all(m.target == "s10" for m in plan.moves)
    assert 38 <= len(plan.moves) <= 42                       # 440 / 11 = 40
    assert plan.spread("after") <= 0.05 + 1 / 40


def test_balanced_cluster_needs_no_moves():
    replicas, sizes, servers = cluster(4, 64)
    assert plan_moves(replicas, sizes, [ServerSpec(s) for s in servers]).moves == []


def test_draining_empties_the_server_and_spreads_its_partitions():
    replicas, sizes, servers = cluster(4, 32)
    specs = [ServerSpec(s, draining=(s == "s03")) for s in servers]
    plan = plan_moves(replicas, sizes, specs)
    now = check(plan, replicas)
    assert not any("s03" in r for r in now.values())
    drained = [m for m in plan.moves if m.source == "s03"]
    assert len(drained) == sum("s03" in r for r in replicas.values())
    # Placement pairs servers, so s03's partitions cannot all land evenly: a few more moves
    # even out the rest, no more than the drain itself.
    assert len(plan.moves) - len(drained) <= len(drained) // 2
    assert plan.spread("after") <= 0.1
    assert set(plan.after) == {"s00", "s01", "s02"}


def test_disk_capacities_are_respected_and_too_little_room_is_a_clear_error():
    replicas, sizes, servers = cluster(3, 12, size=10 * MIB)     # 24 replicas, 240 MiB
    small = [ServerSpec("s00", 100 * MIB), ServerSpec("s01", 100 * MIB),
             ServerSpec("s02", 100 * MIB), ServerSpec("s03", 30 * MIB)]
    plan = plan_moves(replicas, sizes, small)
    now = check(plan, replicas)
    on = {s.server_id: sum(sizes[k] for k, r in now.items() if s.server_id in r) for s in small}
    assert on["s03"] <= 30 * MIB and all(on[s] <= 100 * MIB for s in on)
    with pytest.raises(ShoalError) as e:
        plan_moves(replicas, sizes, [ServerSpec("s00", 100 * MIB), ServerSpec("s01", 100 * MIB),
                                     ServerSpec("s02", 100 * MIB, draining=True)])
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "240.0 MiB" in e.value.message and "200.0 MiB" in e.value.message


def test_a_partition_with_nowhere_to_go_is_a_clear_error():
    replicas, sizes, servers = cluster(2, 4)                      # every server holds every one
    with pytest.raises(ShoalError) as e:
        plan_moves(replicas, sizes, [ServerSpec("s00"), ServerSpec("s01", draining=True)])
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "fits on no other server" in e.value.message


def test_model_quotas_are_respected():
    replicas, sizes, servers = cluster(2, 8, replication=1, size=10 * MIB)
    quota_of = {k: "m" for k in replicas}
    plan = plan_moves(replicas, sizes, [ServerSpec(s) for s in servers + ["s02"]],
                      quota_of=quota_of, quotas={"m": 20 * MIB})
    now = check(plan, replicas)
    assert sum(10 * MIB for r in now.values() if "s02" in r) <= 20 * MIB


def test_load_moves_hot_partitions_off_a_hot_server():
    replicas, sizes, servers = cluster(2, 8, replication=1)
    hot = [k for k, r in replicas.items() if r[0] == "s00"]
    load = {k: (100.0 if k in hot else 1.0) for k in replicas}
    plan = plan_moves(replicas, sizes, [ServerSpec(s) for s in servers], load=load)
    now = check(plan, replicas)
    hot_on = {s: sum(1 for k in hot if now[k][0] == s) for s in servers}
    assert abs(hot_on["s00"] - hot_on["s01"]) <= 1


# ---------------------------------------------------------------- moves in the coordinator
# (a CoordinatorService with a fake clock; learners "finish" by calling ReplicaReady)

def _coordinator(servers, parts=8):
    from coordinator.service import CoordinatorService
    from coordinator.store import MemoryStateStore
    from shoal.config import CoordinatorConfig
    from shoal.proto import shoal_pb2 as pb
    from tests.test_units import FakeClock, FakeContext, _table

    clock = FakeClock()
    svc = CoordinatorService(MemoryStateStore(), CoordinatorConfig(max_builds_per_server=2),
                             default_replication=2, clock=clock)
    for s in servers:
        svc.Register(pb.RegisterRequest(server_id=s, address=f"h:{s}"), FakeContext())
    svc.CreateModel(pb.CreateModelRequest(spec=pb.ModelSpec(name="m", tables=[
        _table("a", n=8000, parts=parts)])), FakeContext())
    return svc, clock


def _finish_copies(svc):
    """Every learner reports its copy done, as its leader attached it."""
    from shoal.proto import shoal_pb2 as pb
    from tests.test_units import FakeContext

    for rs in svc.shard_map().partitions:
        for learner in rs.learners:
            svc.ReplicaReady(pb.ReplicaReadyRequest(
                server_id=learner, table_uid=rs.table_uid, partition=rs.partition,
                epoch=rs.epoch, leader=rs.replicas[0]), FakeContext())


def test_moves_run_learner_then_promote_then_drop_with_a_cap_per_server():
    import grpc

    from shoal.proto import shoal_pb2 as pb
    from tests.test_units import Aborted, FakeContext

    svc, clock = _coordinator(["s0", "s1", "s2"])
    svc.Register(pb.RegisterRequest(server_id="s3", address="h:s3"), FakeContext())
    before = {rs.partition: list(rs.replicas) for rs in svc.shard_map().partitions}
    dry = svc.Rebalance(pb.RebalanceRequest(dry_run=True), FakeContext())
    assert dry.moves and not svc.shard_map().moves             # a dry run changes nothing
    reply = svc.Rebalance(pb.RebalanceRequest(), FakeContext())
    assert [(m.partition, m.target) for m in reply.moves] == \
        [(m.partition, m.target) for m in dry.moves]
    assert all(m.target == "s3" for m in reply.moves) and len(reply.moves) == 4   # 16 / 4
    ctx = FakeContext()
    with pytest.raises(Aborted):                                # one rebalance at a time
        svc.Rebalance(pb.RebalanceRequest(), ctx)
    assert ctx.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "4 moves of an earlier rebalance are in flight" in ctx.details, ctx.details
    for _ in range(10):
        clock.t += 1.0
        for s in ("s0", "s1", "s2", "s3"):
            svc.Heartbeat(pb.HeartbeatRequest(server_id=s), FakeContext())
        svc.reconcile()
        m = svc.shard_map()
        assert sum("s3" in rs.learners for rs in m.partitions) <= 2     # the cap
        for rs in m.partitions:                   # a partition never has fewer than 2 replicas
            assert len(rs.replicas) >= 2
        _finish_copies(svc)
    m = svc.shard_map()
    assert not m.moves
    assert sum("s3" in rs.replicas for rs in m.partitions) == 4
    assert all(len(rs.replicas) == 2 and not rs.learners for rs in m.partitions)
    moved = {mv.partition: mv.source for mv in reply.moves}
    for rs in m.partitions:
        if rs.partition in moved:
            assert moved[rs.partition] not in rs.replicas
        else:
            assert list(rs.replicas) == before[rs.partition]


def test_drain_then_remove_and_cancel():
    from shoal.proto import shoal_pb2 as pb
    from tests.test_units import Aborted, FakeContext

    svc, clock = _coordinator(["s0", "s1", "s2", "s3"])
    ctx = FakeContext()
    with pytest.raises(Aborted):
        svc.RemoveServer(pb.RemoveServerRequest(server_id="s3"), ctx)
    assert ctx.code == grpc.StatusCode.FAILED_PRECONDITION and "drain it first" in ctx.details
    reply = svc.Drain(pb.DrainRequest(server_id="s3"), FakeContext())
    assert reply.moves and {m.source for m in reply.moves} >= {"s3"}
    assert {s.server_id: s.draining for s in svc.shard_map().servers}["s3"]
    # Cancel: learners dropped, every partition keeps its replicas.
    clock.t += 1.0
    svc.reconcile()
    assert any(rs.learners for rs in svc.shard_map().partitions)
    assert svc.CancelMoves(pb.CancelMovesRequest(), FakeContext()).cancelled == len(reply.moves)
    m = svc.shard_map()
    assert not m.moves and not any(rs.learners for rs in m.partitions)
    assert all(len(rs.replicas) == 2 for rs in m.partitions)
    # Drain again and let it finish: s3 ends holding nothing, then it can be removed.
    svc.Drain(pb.DrainRequest(server_id="s3"), FakeContext())
    for _ in range(12):
        clock.t += 1.0
        for s in ("s0", "s1", "s2", "s3"):
            svc.Heartbeat(pb.HeartbeatRequest(server_id=s), FakeContext())
        svc.reconcile()
        _finish_copies(svc)
    m = svc.shard_map()
    assert not m.moves and not any("s3" in rs.replicas or "s3" in rs.learners
                                   for rs in m.partitions)
    svc.RemoveServer(pb.RemoveServerRequest(server_id="s3"), FakeContext())
    assert "s3" not in {s.server_id for s in svc.shard_map().servers}
    # A new model is never placed on a draining server.
    svc.Drain(pb.DrainRequest(server_id="s2"), FakeContext())
    svc.CancelMoves(pb.CancelMovesRequest(), FakeContext())
    from tests.test_units import _table
    svc.CreateModel(pb.CreateModelRequest(spec=pb.ModelSpec(name="m2", tables=[
        _table("b", parts=8)])), FakeContext())
    uid = next(t.table_uid for md in svc.shard_map().models if md.name == "m2"
               for t in md.tables)
    assert not any("s2" in rs.replicas for rs in svc.shard_map().partitions
                   if rs.table_uid == uid)


# ---------------------------------------------------------------- several models, quotas, load

def test_placement_spreads_each_model_even_when_servers_are_unequal():
    # s00 already holds 1 GiB of another model: a new model still lands on every server.
    servers = [ServerLoad("s00", 1024 * MIB), ServerLoad("s01"), ServerLoad("s02")]
    parts = [PartitionLoad(2, p, 8 * MIB) for p in range(12)]
    replicas = place(parts, servers, 2)
    per = {s.server_id: sum(s.server_id in r for r in replicas.values()) for s in servers}
    assert per == {"s00": 8, "s01": 8, "s02": 8}


def test_server_quota_in_placement_and_a_clear_error_when_it_cannot_fit():
    servers = [ServerLoad(f"s{i:02d}") for i in range(4)]
    parts = [PartitionLoad(1, p, 10 * MIB) for p in range(8)]        # 160 MiB of replicas
    replicas = place(parts, servers, 2, server_quota=40 * MIB)
    assert all(sum(s.server_id in r for r in replicas.values()) * 10 * MIB <= 40 * MIB
               for s in servers)
    with pytest.raises(ShoalError) as e:
        place(parts, servers, 2, server_quota=30 * MIB)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "30.0 MiB" in e.value.message and "160.0 MiB" in e.value.message


def test_rebalance_spreads_each_model_and_keeps_quotas():
    # Two models, each placed alone on its own pair of servers; a rebalance must leave every
    # model spread over all four servers, the bytes still even, and model b within its quota.
    replicas = {(1, p): ("s00", "s01") for p in range(8)}
    replicas.update({(2, p): ("s02", "s03") for p in range(8)})
    sizes = {k: 10 * MIB for k in replicas}
    quota_of = {k: ("a" if k[0] == 1 else "b") for k in replicas}
    plan = plan_moves(replicas, sizes, [ServerSpec(f"s{i:02d}") for i in range(4)],
                      quota_of=quota_of, quotas={"b": 60 * MIB})
    now = check(plan, replicas)
    for m in ("a", "b"):
        per = [sum(sizes[k] for k, r in now.items() if quota_of[k] == m and s in r)
               for s in ("s00", "s01", "s02", "s03")]
        assert min(per) > 0 and max(per) - min(per) <= 10 * MIB, (m, per)
        if m == "b":
            assert max(per) <= 60 * MIB
    assert plan.spread("after") <= 0.05
    # The fewest that can do it: half of each model's 16 replicas change sides (swaps).
    assert len(plan.moves) == 16


def test_memory_quota_of_a_model_is_checked_when_it_is_created():
    from coordinator.state import ClusterState
    from shoal.config import CoordinatorConfig
    from shoal.proto import shoal_pb2 as pb
    from tests.test_units import _table

    s = ClusterState()
    for i in range(3):
        s = s.with_server(f"s{i}", f"h:{i}", 0)
    spec = pb.ModelSpec(name="m", tables=[_table("a", n=1024, dim=8)],   # 32 KiB, x2 replicas
                        memory_quota_bytes=48 << 10)
    with pytest.raises(ShoalError) as e:
        s.with_model(spec, ["s0", "s1", "s2"], CoordinatorConfig(), 2)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "0.1 MiB" in e.value.message and "memory_quota_bytes" in e.value.message
    spec.memory_quota_bytes = 64 << 10
    _, model = s.with_model(spec, ["s0", "s1", "s2"], CoordinatorConfig(), 2)
    assert model.memory_quota_bytes == 64 << 10


def test_load_tracker_turns_counters_into_rates():
    import numpy as np

    from coordinator.loadstats import LoadTracker
    from shoal.proto import shoal_pb2 as pb
    from shoal.wire import pack

    def tl(counts):
        return [pb.TableLoad(table_uid=7, ids_looked_up=pack(np.array(counts, np.int64)))]

    lt = LoadTracker(time_constant_s=1e-9)          # no smoothing: the last interval's rate
    lt.observe("a", 0.0, tl([0, 0, 0, 0]))
    lt.observe("b", 0.0, tl([0, 0, 0, 0]))
    assert lt.partition_load() == {}
    lt.observe("a", 2.0, tl([200, 0, 20, 0]))
    lt.observe("b", 2.0, tl([100, 0, 0, 0]))
    assert lt.partition_load() == {(7, 0): 150.0, (7, 2): 10.0}
    assert lt.server_load() == {"a": 110.0, "b": 50.0}
    lt.observe("a", 3.0, tl([0, 0, 0, 0]))          # a restarted: counters went back; skipped
    assert lt.server_load()["a"] == 110.0
    lt.forget("b")
    assert lt.partition_load() == {(7, 0): 100.0, (7, 2): 10.0}


def test_rebalance_uses_the_lookup_load_servers_report():
    """Heartbeats carry per-partition counters; a rebalance moves hot partitions apart even
    when bytes are already even."""
    import numpy as np

    from shoal.proto import shoal_pb2 as pb
    from shoal.wire import pack
    from tests.test_units import FakeContext

    svc, clock = _coordinator(["s0", "s1", "s2", "s3"], parts=16)
    m = svc.shard_map()
    uid = m.models[0].tables[0].table_uid
    leaders = {rs.partition: rs.replicas[0] for rs in m.partitions}
    hot_server = leaders[0]
    hot = [p for p, s in leaders.items() if s == hot_server]     # every partition s? leads
    assert svc.Rebalance(pb.RebalanceRequest(dry_run=True), FakeContext()).moves == []
    for t in (0.0, 5.0):
        clock.t += 5.0
        for s in ("s0", "s1", "s2", "s3"):
            counts = np.zeros(16, np.int64)
            if s == hot_server:
                counts[hot] = int(t * 1000)
            svc.Heartbeat(pb.HeartbeatRequest(server_id=s, stats=pb.ServerStats(
                table_loads=[pb.TableLoad(table_uid=uid, ids_looked_up=pack(counts))])),
                FakeContext())
    plan = svc.Rebalance(pb.RebalanceRequest(dry_run=True), FakeContext())
    out = [mv.partition for mv in plan.moves if mv.source == hot_server]
    back = [mv.partition for mv in plan.moves if mv.target == hot_server]
    assert out and all(p in hot for p in out)            # hot partitions leave the hot server
    assert not any(p in hot for p in back)               # cold ones come back (swaps)
    assert plan.bytes_after[hot_server] == plan.bytes_before[hot_server]


def test_removing_a_server_drops_the_moves_queued_onto_it():
    """Found by fuzzing the orders: a server removed while a rebalance's moves onto it were
    still queued (no copy begun, so it held nothing) left moves naming a server the map no
    longer had until the next reconcile pass."""
    from shoal.proto import shoal_pb2 as pb
    from tests.test_units import FakeContext

    svc, _ = _coordinator(["s0", "s1", "s2"])
    svc.Register(pb.RegisterRequest(server_id="s3", address="h:s3"), FakeContext())
    planned = svc.Rebalance(pb.RebalanceRequest(), FakeContext()).moves
    assert planned and all(m.target == "s3" for m in planned)
    before = svc.shard_map()
    assert len(before.moves) == len(planned) and not any(rs.learners for rs in before.partitions)
    svc.RemoveServer(pb.RemoveServerRequest(server_id="s3"), FakeContext())
    m = svc.shard_map()
    assert [s.server_id for s in m.servers] == ["s0", "s1", "s2"]
    assert list(m.moves) == [] and m.version == before.version + 1
    assert m.partitions == before.partitions


def test_disk_capacity_bounds_placement_and_a_full_cluster_is_resource_exhausted():
    """Capacity is disk (tiers): a server is given partitions only while its disk holds them,
    whatever its memory; a model that fits no more is RESOURCE_EXHAUSTED with the numbers."""
    servers = [ServerLoad("s00", 0, capacity=120 * MIB), ServerLoad("s01", 0, capacity=120 * MIB),
               ServerLoad("s02", 50 * MIB, capacity=60 * MIB)]
    parts = [PartitionLoad(1, p, 10 * MIB) for p in range(12)]        # 240 MiB of replicas
    placed = place(parts, servers, 2)
    on = {s.server_id: sum(10 * MIB for r in placed.values() if s.server_id in r)
          for s in servers}
    assert on["s02"] == 10 * MIB and sorted([on["s00"], on["s01"]]) == [110 * MIB, 120 * MIB]
    with pytest.raises(ShoalError) as e:
        place([PartitionLoad(1, p, 10 * MIB) for p in range(16)], servers, 2)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "320.0 MiB of replicas" in e.value.message
    assert "disk capacity (250.0 MiB free together)" in e.value.message


def test_rebalance_counts_disk_capacity_not_memory():
    """A cluster holding ten times its memory rebalances and drains within its disk."""
    replicas, sizes, _ = cluster(3, 12, size=10 * MIB)             # 24 replicas, 240 MiB
    disks = [ServerSpec(f"s0{i}", 200 * MIB) for i in range(3)] + [ServerSpec("s03", 200 * MIB)]
    plan = plan_moves(replicas, sizes, disks)
    assert plan.moves and plan.spread("after") <= 0.5
    with pytest.raises(ShoalError) as e:
        plan_moves(replicas, sizes, [ServerSpec("s00", 100 * MIB), ServerSpec("s01", 100 * MIB),
                                     ServerSpec("s02", 100 * MIB, draining=True)])
    assert "disk capacity of 200.0 MiB" in e.value.message
