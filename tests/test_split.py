"""Splitting a table's partitions live: the split state machine in the coordinator (fake
clock), and a split on real processes under load (4 query clients checking every answer
against torchrec, 1 writer)."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

import shoal
from shoal.proto import shoal_pb2 as pb
from tests.oracle import fill_from_oracle
from tests.test_failover import DIM, ROWS, Load, check_replicas, coordinator_map, fo_tables


# ---------------------------------------------------------------- coordinator (no servers)

def _heartbeat(svc, server, progress):
    from tests.test_units import FakeContext
    svc.Heartbeat(pb.HeartbeatRequest(server_id=server, stats=pb.ServerStats(
        splits=progress)), FakeContext())


def _report_all(svc, uid, built, seq, skip=(), version=None):
    """Every replica of every old partition reports (built_seq, seq)."""
    m = svc.shard_map()
    per: dict[str, list] = {s.server_id: [] for s in m.servers}
    for rs in m.partitions:
        if rs.table_uid != uid:
            continue
        for r in rs.replicas:
            if (r, rs.partition) in skip:
                continue
            per[r].append(pb.SplitProgress(table_uid=uid, partition=rs.partition,
                                           built_seq=built, seq=seq,
                                           map_version=version or m.version))
    for s, prs in per.items():
        _heartbeat(svc, s, prs)


def test_split_state_machine_freezes_then_cuts_over():
    from tests.test_rebalance import _coordinator
    from tests.test_units import Aborted, FakeContext

    svc, clock = _coordinator(["s0", "s1", "s2"], parts=4)
    m = svc.shard_map()
    uid = m.models[0].tables[0].table_uid
    before = {rs.partition: (tuple(rs.replicas), rs.epoch) for rs in m.partitions}
    for bad, code in (("nope", grpc.StatusCode.NOT_FOUND),):
        ctx = FakeContext()
        with pytest.raises(Aborted):
            svc.SplitTable(pb.SplitTableRequest(model="m", table=bad), ctx)
        assert ctx.code == code and "no table 'nope'" in ctx.details
    reply = svc.SplitTable(pb.SplitTableRequest(model="m", table="a"), FakeContext())
    sp = reply.split
    assert sp.table_uid == uid and sp.new_table.num_partitions == 8
    new_uid = sp.new_table.table_uid
    ctx = FakeContext()
    with pytest.raises(Aborted):                          # one split of a table at a time
        svc.SplitTable(pb.SplitTableRequest(model="m", table="a"), ctx)
    assert ctx.code == grpc.StatusCode.ALREADY_EXISTS
    ctx = FakeContext()
    with pytest.raises(Aborted):                          # no moves while it runs
        svc.Rebalance(pb.RebalanceRequest(), ctx)
    assert ctx.code == grpc.StatusCode.FAILED_PRECONDITION and "split" in ctx.details
    # Copies still copying, or behind: no freeze.
    _report_all(svc, uid, -1, 5)
    _report_all(svc, uid, 4, 5)
    assert not svc.shard_map().splits[0].frozen
    # One replica has not reported: no freeze.
    first = next(iter(before[0][0]))
    _report_all(svc, uid, 5, 5, skip={(first, 0)})
    svc.reconcile()
    assert not svc.shard_map().splits[0].frozen
    _report_all(svc, uid, 5, 5)
    m = svc.shard_map()
    assert m.splits[0].frozen
    # Reports made before the freeze's map version do not count for the cut-over.
    _report_all(svc, uid, 7, 7, version=m.version - 1)
    assert svc.shard_map().splits
    # At the current version: every copy at the leader's final position -> cut over.
    _report_all(svc, uid, 7, 7)
    m = svc.shard_map()
    assert not m.splits
    t = m.models[0].tables[0]
    assert t.table_uid == new_uid and t.num_partitions == 8
    sets = {rs.partition: rs for rs in m.partitions}
    assert sorted(sets) == list(range(8)) and all(rs.table_uid == new_uid for rs in sets.values())
    for p, (replicas, epoch) in before.items():
        for q in (p, p + 4):
            assert tuple(sets[q].replicas) == replicas and sets[q].epoch == epoch + 1


def test_split_leaves_a_laggard_out_and_gives_up_a_freeze_that_lasts_too_long():
    from tests.test_rebalance import _coordinator
    from tests.test_units import FakeContext

    svc, clock = _coordinator(["s0", "s1", "s2"], parts=4)
    uid = svc.shard_map().models[0].tables[0].table_uid
    svc.SplitTable(pb.SplitTableRequest(model="m", table="a"), FakeContext())
    _report_all(svc, uid, 3, 3)
    assert svc.shard_map().splits[0].frozen
    # Frozen too long (a leader never reports at the current version): writes resume.
    clock.t += svc._cfg.split_freeze_s + 1
    for s in ("s0", "s1", "s2"):
        _heartbeat(svc, s, [])
    svc.reconcile()
    assert not svc.shard_map().splits[0].frozen
    # Freeze again; partition 0's follower stays one write behind the leader.
    _report_all(svc, uid, 3, 3)
    m = svc.shard_map()
    assert m.splits[0].frozen
    rs0 = next(rs for rs in m.partitions if rs.partition == 0)
    leader, follower = rs0.replicas
    _report_all(svc, uid, 4, 4, skip={(follower, 0)})
    _heartbeat(svc, follower, [pb.SplitProgress(table_uid=uid, partition=p, built_seq=4,
                                                seq=4, map_version=m.version)
                               for p in range(4) if p != 0 and follower in next(
                                   r for r in m.partitions if r.partition == p).replicas] +
               [pb.SplitProgress(table_uid=uid, partition=0, built_seq=3, seq=3,
                                 map_version=m.version)])
    assert svc.shard_map().splits                     # waits for the laggard a while
    clock.t += 2.5
    _report_all(svc, uid, 4, 4, skip={(follower, 0)})
    m = svc.shard_map()
    assert not m.splits
    half = {rs.partition: list(rs.replicas) for rs in m.partitions}
    assert half[0] == half[4] == [leader]             # rebuilt afterwards by re-replication


# ---------------------------------------------------------------- real processes

@pytest.mark.timeout(300)
def test_split_under_load_changes_no_answer(tmp_path):
    """Both tables split under 4 query clients and a writer, with memory for an eighth of the
    rows each server holds (8x more data than memory: a row cache, RocksDB behind it; the
    all-resident case is ``test_split_survives_losing_a_server_midway``)."""
    from shards import tiers
    read_cfg, write_cfg, oracle = fo_tables(seed=31)
    held = 2 * ROWS * DIM * 4 * 2 // 3            # both tables, replication 2 on 3 servers
    conf = shoal.ShoalConfig().replace(server__heartbeat_interval_s=0.25,
                                       server__rebuild_mib_per_s=32.0,
                                       server__memory_budget_bytes=tiers.budget_for_rows(
                                           held // 8))
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path),
                            config=conf) as cluster:
        client = cluster.client()
        client.create_model("fo", [read_cfg, write_cfg])
        fill_from_oracle(client, "fo", oracle)
        m0 = coordinator_map(cluster)
        old = {t.name: t for t in m0.models[0].tables}
        with Load(cluster, oracle) as load, cluster.admin() as admin:
            time.sleep(0.5)
            acked_before = len(load.acked)
            for table in ("tq", "tw"):
                sp = admin.split_table("fo", table, timeout=120)
                assert sp.new_table.num_partitions == 2 * old[table].num_partitions
            time.sleep(1.0)
            acked_after = len(load.acked)
        assert load.failures == []
        assert load.answered > 20 and acked_after > acked_before
        for srv in client.status().map.servers:     # a row cache, and reads of RocksDB
            loads = [tl for tl in srv.stats.table_loads if tl.ids]
            assert loads and all(tl.cache_rows > 0 for tl in loads), srv.stats
            assert srv.stats.cold_ids > 0, srv.stats
        m = coordinator_map(cluster)
        new = {t.name: t for t in m.models[0].tables}
        for table in ("tq", "tw"):
            assert new[table].num_partitions == 2 * old[table].num_partitions
            assert new[table].table_uid != old[table].table_uid
        uids = {rs.table_uid for rs in m.partitions}
        assert uids == {new["tq"].table_uid, new["tw"].table_uid}
        check_replicas(m, load.acked)               # equal replicas, every acked write there
        ids = np.arange(0, 20_000, 7)
        import torch
        with torch.no_grad():
            want = oracle.embedding_bags["tq"].weight[ids].numpy()
        np.testing.assert_array_equal(client.lookup_rows("fo", "tq", ids).numpy(), want)
        # The old tables' rows are deleted everywhere: each server stores only new partitions.
        from shoal.admin import server_stats
        deadline = time.monotonic() + 30
        while True:
            held = {s.server_id: sum(s.server_id in rs.replicas for rs in m.partitions)
                    for s in m.servers}
            stored = {s.server_id: server_stats(s.address).stored_partitions for s in m.servers}
            if stored == held:
                break
            assert time.monotonic() < deadline, (stored, held)
            time.sleep(0.25)
        client.close()


@pytest.mark.timeout(300)
def test_split_survives_losing_a_server_midway(tmp_path):
    """SIGKILL a server while the split's copies are being built: the failure detector drops
    it, re-replication gives its partitions new replicas, which build their split copies too,
    and the split completes with every answer unchanged and every acknowledged write kept."""
    import os
    import signal

    from tests.test_failover import fast_failover_config

    read_cfg, write_cfg, oracle = fo_tables(seed=32)
    conf = fast_failover_config().replace(server__rebuild_mib_per_s=2.0)   # a slow split
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path),
                            config=conf) as cluster:
        client = cluster.client()
        client.create_model("fo", [read_cfg, write_cfg])
        fill_from_oracle(client, "fo", oracle)
        old = {t.name: t for t in coordinator_map(cluster).models[0].tables}
        with Load(cluster, oracle) as load, cluster.admin() as admin:
            time.sleep(0.3)
            sp = admin.split_table("fo", "tq", wait=False)
            time.sleep(0.5)
            assert coordinator_map(cluster).splits               # still building
            victim = cluster.server("s1")
            os.kill(victim.pid, signal.SIGKILL)
            deadline = time.monotonic() + 180
            while True:
                m = coordinator_map(cluster)
                if not m.splits and all(len(rs.replicas) == 2 and "s1" not in rs.replicas
                                        and not rs.learners for rs in m.partitions):
                    break
                assert time.monotonic() < deadline, "split or repair not done in time"
                time.sleep(0.25)
            time.sleep(0.5)
        assert load.failures == []
        new = {t.name: t for t in m.models[0].tables}
        assert new["tq"].table_uid == sp.new_table.table_uid
        assert new["tq"].num_partitions == 2 * old["tq"].num_partitions
        check_replicas(m, load.acked)
        ids = np.arange(0, 20_000, 3)
        import torch
        with torch.no_grad():
            want = oracle.embedding_bags["tq"].weight[ids].numpy()
        np.testing.assert_array_equal(client.lookup_rows("fo", "tq", ids).numpy(), want)
        client.close()
