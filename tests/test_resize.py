"""Resizing a live cluster on real processes: servers are added and drained while 4 clients
query (every answer checked against torchrec) and 1 writes."""
from __future__ import annotations

import time

import numpy as np
import pytest

import shoal
from tests.oracle import fill_from_oracle
from tests.test_failover import DIM, ROWS, Load, check_replicas, coordinator_map, fo_tables


def bytes_per_server(m) -> dict[str, int]:
    sizes = {t.table_uid: -(-t.num_embeddings // t.num_partitions) * t.dim * 4
             for md in m.models for t in md.tables}
    out = {s.server_id: 0 for s in m.servers}
    for rs in m.partitions:
        for r in rs.replicas:
            out[r] += sizes[rs.table_uid]
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("memory", ["all", "eighth"])
def test_resize_2_4_3_2_under_load(tmp_path, memory):
    """``eighth``: the servers' memory holds an eighth of the rows each holds at 2 servers
    (tiers: disk is the capacity, memory a row cache), so queries read RocksDB throughout."""
    from shards import tiers
    read_cfg, write_cfg, oracle = fo_tables(seed=21)
    conf = shoal.ShoalConfig().replace(server__heartbeat_interval_s=0.25,
                                       server__rebuild_mib_per_s=32.0)
    if memory == "eighth":
        held = 2 * ROWS * DIM * 4                 # both tables, every row, on each of 2
        conf = conf.replace(server__memory_budget_bytes=tiers.budget_for_rows(held // 8))
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path),
                            config=conf) as cluster:
        client = cluster.client()
        client.create_model("fo", [read_cfg, write_cfg])
        fill_from_oracle(client, "fo", oracle)
        removed = []
        with Load(cluster, oracle) as load:
            time.sleep(0.5)
            cluster.resize(4)
            m = coordinator_map(cluster)
            assert len(m.servers) == 4 and not m.moves
            on = bytes_per_server(m)
            assert all(on[s] > 0 for s in on)                # the new servers took data
            cluster.resize(3)
            removed.append("s3")
            cluster.resize(2)
            removed.append("s2")
            time.sleep(0.5)
        assert load.failures == []
        if memory == "eighth":
            time.sleep(0.6)                                  # the servers' last counters
            for s in client.status().map.servers:
                tq = [tl for tl in s.stats.table_loads if tl.ids]
                assert tq and all(tl.cache_rows > 0 and tl.misses > 0 for tl in tq), s.stats
                assert s.stats.resident_bytes + s.stats.store_memory_bytes <= \
                    conf.server.memory_budget_bytes
        assert load.answered > 20 and len(load.acked) > 5
        m = coordinator_map(cluster)
        assert sorted(s.server_id for s in m.servers) == ["s0", "s1"]
        on = bytes_per_server(m)
        assert max(on.values()) <= 1.1 * min(on.values())   # balanced within 10% by bytes
        check_replicas(m, load.acked)                        # every acked write, everywhere
        for sid in removed:                                  # nothing left on removed servers
            assert not (tmp_path / sid / "rocksdb").exists()
        client.close()


def test_remove_server_reports_it_stored_nothing(tmp_path):
    read_cfg, write_cfg, oracle = fo_tables(seed=22)
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path)) as cluster:
        client = cluster.client()
        client.create_model("fo", [read_cfg, write_cfg])
        fill_from_oracle(client, "fo", oracle)
        ids = np.arange(0, 2000, 3)
        before = client.lookup_rows("fo", "tq", ids).numpy()
        with cluster.admin() as admin:
            assert admin.drain("s2", dry_run=True).moves          # a plan, nothing started
            assert not admin.shard_map().moves
        last = cluster.remove_server("s2")
        assert last.stored_partitions == 0 and last.partitions == 0
        assert last.dropped_partitions > 0                    # it deleted its copies itself
        m = coordinator_map(cluster)
        assert "s2" not in {s.server_id for s in m.servers}
        assert all(len(rs.replicas) == 2 and "s2" not in rs.replicas for rs in m.partitions)
        np.testing.assert_array_equal(client.lookup_rows("fo", "tq", ids).numpy(), before)
        client.close()


@pytest.mark.parametrize("victim", ["target", "source"])
def test_killing_a_move_end_during_the_copy_loses_nothing(tmp_path, victim):
    """SIGKILL the target (or the source) of moves while they copy: the moves roll back (target)
    or turn into re-replication (source); every partition ends fully replicated, with its rows."""
    import os
    import signal

    read_cfg, write_cfg, oracle = fo_tables(seed=23)
    conf = shoal.ShoalConfig().replace(coordinator__lease_s=2.0,
                                       server__heartbeat_interval_s=0.25,
                                       server__rebuild_mib_per_s=0.25)   # a slow copy
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path),
                            config=conf) as cluster:
        client = cluster.client()
        client.create_model("fo", [read_cfg, write_cfg])
        fill_from_oracle(client, "fo", oracle)
        new = cluster.add_server()
        with cluster.admin() as admin:
            plan = admin.rebalance()
            assert plan.moves
            deadline = time.monotonic() + 30
            while not any(mv.phase == "copying" for mv in admin.shard_map().moves):
                assert time.monotonic() < deadline, "no move started copying"
                time.sleep(0.05)
            moving = next(mv for mv in admin.shard_map().moves if mv.phase == "copying")
            dead = new if victim == "target" else cluster.server(moving.source)
            os.kill(dead.pid, signal.SIGKILL)
            m = admin.wait_for_moves(
                timeout=180, until=lambda m: all(len(rs.replicas) == 2 and
                                                 dead.server_id not in rs.replicas
                                                 for rs in m.partitions))
        assert not m.moves
        check_replicas(m, [])                       # equal rows on every replica
        ids = np.arange(0, 20_000, 7)
        with torch_no_grad():
            want = oracle.embedding_bags["tq"].weight[ids].numpy()
        np.testing.assert_array_equal(client.lookup_rows("fo", "tq", ids).numpy(), want)
        client.close()


def torch_no_grad():
    import torch
    return torch.no_grad()
