"""Leader-driven replication on real processes: idempotent resends across a change of leader,
a stalled follower reported by its leader and brought back by catching up from the log."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import shoal
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import channel
from tests.test_failover import (coordinator_map, expected_rows, fast_failover_config,
                                 read_direct)

from torchrec.modules.embedding_configs import EmbeddingBagConfig

ROWS, DIM = 4_000, 16


def table_cfg(name="tr"):
    return EmbeddingBagConfig(name=name, embedding_dim=DIM, num_embeddings=ROWS,
                              feature_names=[f"f_{name}"])


def on_every_replica(m: pb.ShardMap, table: str, ids: np.ndarray) -> list[np.ndarray]:
    """Per replica of every partition ids touch: (rows read there) for those ids."""
    spec = next(t for md in m.models for t in md.tables if t.name == table)
    out = []
    for rs in (r for r in m.partitions if r.table_uid == spec.table_uid):
        mine = ids[(ids & (spec.num_partitions - 1)) == rs.partition]
        if len(mine):
            out += [(mine, read_direct(m, s, spec, mine)) for s in rs.replicas]
    return out


def server_stats(cluster, server) -> pb.ServerStats:
    ch = channel(server.address)
    try:
        return pbg.ShardServerStub(ch).Stats(pb.StatsRequest(), timeout=10)
    finally:
        ch.close()


def test_resent_write_is_applied_once_even_after_a_leader_change(tmp_path):
    """Write A under key k, then B (another writer), then resend A under k, as a client does
    after a lost reply: A must not clobber B, on any replica, also when the resend reaches a
    new leader after the old one died."""
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path),
                            config=fast_failover_config()) as cluster:
        client = cluster.client()
        client.create_model("ik", [table_cfg()])
        ids = np.arange(0, ROWS, 3)
        a, b = expected_rows(ids), expected_rows(ids) + 1000
        assert client.write_rows("ik", "tr", ids, a, request_id="k") == len(ids)
        client.write_rows("ik", "tr", ids, b)
        assert client.write_rows("ik", "tr", ids, a, request_id="k") == len(ids)
        np.testing.assert_array_equal(client.lookup_rows("ik", "tr", ids).numpy(), b)
        for mine, got in on_every_replica(coordinator_map(cluster), "tr", ids):
            np.testing.assert_array_equal(got, b[np.searchsorted(ids, mine)])

        victim = cluster.servers[0]
        before = coordinator_map(cluster)
        led = {rs.partition for rs in before.partitions if rs.replicas[0] == victim.server_id}
        assert led
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(rs.replicas[0] == victim.server_id for rs in coordinator_map(cluster)
                  .partitions):
            assert time.monotonic() < deadline, "no new leaders"
            time.sleep(0.1)
        # The new leaders were followers: the first A is in their logs, so the resend is a
        # duplicate there too.
        assert client.write_rows("ik", "tr", ids, a, request_id="k") == len(ids)
        np.testing.assert_array_equal(client.lookup_rows("ik", "tr", ids).numpy(), b)
        # A different key is a new write.
        c = b + 1
        client.write_rows("ik", "tr", ids, c, request_id="k2")
        np.testing.assert_array_equal(client.lookup_rows("ik", "tr", ids).numpy(), c)
        client.close()


def test_stalled_follower_is_reported_then_rejoins_by_catching_up(tmp_path):
    """SIGSTOP a follower for less than its lease: its leader, unable to replicate a write,
    reports it and acknowledges without it (well before the lease would have run out). After
    SIGCONT it is made a learner again and catches its own copy up from the leader's log,
    copying no snapshot."""
    lease = 6.0
    conf = shoal.ShoalConfig().replace(coordinator__lease_s=lease,
                                       server__heartbeat_interval_s=0.25,
                                       server__replicate_timeout_s=0.5)
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path),
                            config=conf) as cluster:
        client = cluster.client()
        client.create_model("st", [table_cfg()])
        ids = np.arange(ROWS)
        client.write_rows("st", "tr", ids, expected_rows(ids))
        m = coordinator_map(cluster)
        spec = next(t for md in m.models for t in md.tables if t.name == "tr")
        leader, follower = cluster.servers[0], cluster.servers[1]
        led = sorted(rs.partition for rs in m.partitions if rs.replicas[0] == leader.server_id)
        assert led
        mine = ids[np.isin(ids & (spec.num_partitions - 1), led)]
        v2 = expected_rows(mine) + 0.25
        os.kill(follower.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            client.write_rows("st", "tr", mine, v2)
            took = time.monotonic() - t0
        finally:
            os.kill(follower.pid, signal.SIGCONT)
        assert took < lease / 2, f"the write waited {took:.1f}s for a stalled follower"
        after = {rs.partition: rs for rs in coordinator_map(cluster).partitions}
        assert all(after[p].epoch >= 2 for p in led)   # dropped (and maybe re-added) since
        deadline = time.monotonic() + 60
        while True:
            m = coordinator_map(cluster)
            if all(len(rs.replicas) == 2 and not rs.learners for rs in m.partitions):
                break
            assert time.monotonic() < deadline, "the follower never rejoined"
            time.sleep(0.2)
        stats = server_stats(cluster, follower)
        assert stats.builds_caught_up >= len(led) and stats.builds_from_snapshot == 0
        for got_ids, got in on_every_replica(m, "tr", mine):
            np.testing.assert_array_equal(got, v2[np.searchsorted(mine, got_ids)])
        client.close()


def test_rebuild_from_checkpoint_snapshots_under_load(tmp_path):
    """The other snapshot mode (RocksDB checkpoints opened read-only): kill -9 a server while 4
    clients query and 1 writes; replicas rebuilt from checkpoints hold every acknowledged
    write and equal rows."""
    from tests.oracle import fill_from_oracle
    from tests.test_failover import Load, check_replicas, fo_tables, wait_replicated

    read_cfg, write_cfg, oracle = fo_tables(seed=9)
    conf = fast_failover_config().replace(server__snapshot="checkpoint")
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path),
                            config=conf) as cluster:
        client = cluster.client()
        client.create_model("fo", [read_cfg, write_cfg])
        fill_from_oracle(client, "fo", oracle)
        with Load(cluster, oracle) as load:
            time.sleep(0.5)
            victim = cluster.servers[2]
            lost = sum(victim.server_id in rs.replicas
                       for rs in coordinator_map(cluster).partitions)
            os.kill(victim.pid, signal.SIGKILL)
            m = wait_replicated(cluster, without=victim.server_id)
            repaired = len(load.acked)
            time.sleep(0.5)                           # writes go on after the repair
        assert load.failures == [] and load.answered > 10 and len(load.acked) > repaired > 5
        built = sum(server_stats(cluster, s).builds_from_snapshot for s in cluster.servers[:2])
        assert lost and built == lost                 # one snapshot copy per lost replica
        check_replicas(m, load.acked)
        client.close()
