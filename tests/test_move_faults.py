"""Killing an end of a move after its copy: in the catch-up, promote and drop phases.

Real processes (``shoal.LocalCluster``) and a real SIGKILL. Each case starts 3 servers
(replication 2), fills two small tables, adds a 4th server and rebalances: every move copies
one replica of one partition onto the new server (the *target*) from the replica it replaces
(the *source*). While 4 clients query (every answer checked against torchrec), one writer
writes table ``tw`` (``Load``) and one rewrites rows of table ``tq`` with their own values
(``Churn``: the moved partitions get log entries, so a learner has log to catch up), one move is
watched and one of its ends is SIGKILLed in the phase under test. Then, for every case: the move
completes or rolls back, no move is left, every partition has 2 replicas and none on the dead
server, every replica of every partition holds the same rows, every acknowledged write is there,
no query or write failed, and ``tq`` reads exactly as the oracle.

The phases are brief (the catch-up is one ``CatchUp`` RPC, and the coordinator promotes the
target and drops the source in the same step), too brief to land a kill by polling alone. So
the trigger watches the target's own ``Stats`` (its ``builds`` entry for the partition, live,
not a heartbeat late) and uses SIGSTOP to hold a process where the phase needs it:

- **catch-up** (a move whose source leads the partition): when the target's build shows the
  whole snapshot received (``bytes_done == bytes_total``; it then waits out the copy's pacing,
  stores the rows and asks the leader for the log since the snapshot), the writers go on for
  half that pacing (log to replay), then the source is SIGSTOPped and left stopped for longer
  than the rest: the target is then inside its ``CatchUp`` call to the stopped leader, the
  snapshot installed, not promoted (checked in the map). The victim is
  SIGKILLed (the stopped source itself, or the target; then the source is resumed). Checked
  after: a killed target's disk holds the complete snapshot (position set, every row); when the
  source was killed, the target finished by catching its installed copy up from the new
  leader (``builds_caught_up``), not by copying again.
- **promote** (a move whose source follows): the source is SIGSTOPped as the snapshot arrives,
  and the target's build is awaited: it ends when the coordinator has promoted the target and
  dropped the source (checked in the map) while the source, stopped, cannot have applied that
  map. The victim is SIGKILLed then (the source: its disk still holds its copy, checked; or the
  target, then the source is resumed and applies the map, deleting its copy while the promoted
  target is already dead).
- **drop** (a move whose source leads): after the promotion, once the source's ``Stats`` show
  it applied the map that dropped it (so it deleted its copy; a range delete, too brief to
  land a signal inside), the victim is SIGKILLed at once: the source (its disk no longer holds
  the partition, checked), or the target, the only new home of the data the source just
  deleted (the partition's remaining replica must carry it).

Checked as well: the watched move rolled back (target killed in catch-up: the partition keeps
its replicas) or completed (source killed: the target holds it with the other replica).

Two product bugs were found with these tests, and are fixed: a move whose source led deposed
it in the step that promoted the target, and the target, not yet holding that map, stored the
deposed leader's next write (refused by the new leader, never acknowledged): its copy forked
and was dropped as diverged, leaving one replica (now a promoted learner applies the promoting
map before it takes entries again; the last test forces that race). And the router retried a
read whose server failed for free only in a request's first round, so a read redirected once
and then meeting a dead server could fail on a retry budget spent by hedges.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import torch

import shoal
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import channel
from shoal.wire import pack
from tests.oracle import fill_from_oracle
from tests.test_failover import (
    ROWS,
    Load,
    check_replicas,
    coordinator_map,
    fo_tables,
    read_direct,
)

REBUILD_MIB_PER_S = 0.25     # one partition (5000 rows of 64 B) copies in ~1.2 s
SNAPSHOT_S = (ROWS // 4) * 16 * 4 / (REBUILD_MIB_PER_S * 2**20)
LEASE_S = 3.0                # a process stopped for ~1-2 s is not declared dead meanwhile


def move_fault_config():
    return shoal.ShoalConfig().replace(coordinator__lease_s=LEASE_S,
                                       server__heartbeat_interval_s=0.25,
                                       server__rebuild_mib_per_s=REBUILD_MIB_PER_S)


class Churn:
    """Rewrites random rows of table ``tq`` with the values they already have (the oracle's),
    so the moved partitions get log entries while queries keep checking against the oracle."""

    def __init__(self, cluster, oracle):
        with torch.no_grad():
            self.weight = oracle.embedding_bags["tq"].weight.detach().clone()
        self.cluster = cluster
        self.stop = threading.Event()
        self.failures, self.acked = [], 0
        self._thread = threading.Thread(target=self._run)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self._thread.join(60)

    def _run(self):
        rng = np.random.default_rng(5)
        c = self.cluster.client(timeout=30)
        while not self.stop.is_set():
            ids = np.sort(rng.choice(ROWS, 256, replace=False))
            try:
                c.write_rows("fo", "tq", torch.from_numpy(ids), self.weight[ids])
                self.acked += 1
            except shoal.ShoalError as e:
                self.failures.append(f"tq write: {e}")
            time.sleep(0.05)
        c.close()


class StatsProbe:
    """A server's live ``Stats`` over one channel (the map has them a heartbeat late)."""

    def __init__(self, address: str):
        self._ch = channel(address)
        self._stub = pbg.ShardServerStub(self._ch)

    def __call__(self) -> pb.ServerStats:
        return self._stub.Stats(pb.StatsRequest(), timeout=5)

    def build(self, key):
        return next((b for b in self().builds if (b.table_uid, b.partition) == key), None)

    def close(self):
        self._ch.close()


def poll(fn, timeout: float, what: str, interval: float = 0.01):
    """Call ``fn`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(interval)


def replica_set(m: pb.ShardMap, key) -> pb.ReplicaSet:
    return next(rs for rs in m.partitions if (rs.table_uid, rs.partition) == key)


def disk_copy(data_dir, server_id: str, table_uid: int, partition: int, num_partitions: int):
    """(position seq, rows stored) of a partition on a dead server's disk, read from its RocksDB
    opened read-only (a position of 0 means none is stored)."""
    from shards.storage import RocksRowStore
    store = RocksRowStore(data_dir / f"readonly-{server_id}", 8 << 20,
                          read_only_db=str(data_dir / server_id / "rocksdb"))
    try:
        seq, _ = store.read_positions(table_uid, num_partitions)
        ids, _ = store.scan_partition(table_uid, partition)
        return int(seq[partition]), len(ids)
    finally:
        store.close()


def lead_or_follow(admin, cluster, source_leads: bool) -> tuple[int, int]:
    """Make the source of the first move a rebalance would plan lead its partition
    (``source_leads``) or follow in it, by reordering that replica set (SetReplicas; done
    before writes start: a leader change under writes can leave the old leader with an
    unacknowledged entry, and so a diverged copy to rebuild). Returns the partition's key and
    the map version that made the change."""
    planned = admin.rebalance(dry_run=True).moves
    assert planned, "adding a server planned no moves"
    mv = planned[0]
    rs = replica_set(admin.shard_map(), (mv.table_uid, mv.partition))
    others = [s for s in rs.replicas if s != mv.source]
    order = [mv.source] + others if source_leads else others + [mv.source]
    ch = channel(cluster.coordinator_address)
    try:
        version = pbg.CoordinatorStub(ch).SetReplicas(pb.SetReplicasRequest(
            table_uid=mv.table_uid, partition=mv.partition, replicas=order),
            timeout=10).map_version
    finally:
        ch.close()
    return (mv.table_uid, mv.partition), version


def start_moves(admin, key: tuple[int, int], source_leads: bool) -> pb.Move:
    """Start the rebalance; the move to watch: the one of ``key`` if its source still leads
    (or follows) as wanted, else any that does."""
    plan = admin.rebalance().moves
    m = admin.shard_map()

    def fits(x):
        return (replica_set(m, (x.table_uid, x.partition)).replicas[0] == x.source) == \
            source_leads

    same = [x for x in plan if (x.table_uid, x.partition) == key and fits(x)]
    pick = same[0] if same else next((x for x in plan if fits(x)), None)
    assert pick is not None, \
        f"no planned move whose source {'leads' if source_leads else 'follows'}: {plan}"
    return pick


def describe(m: pb.ShardMap) -> str:
    return "; ".join([f"{rs.table_uid}/{rs.partition}: {list(rs.replicas)} "
                      f"learners {list(rs.learners)}" for rs in m.partitions] +
                     [f"move {mv.table_uid}/{mv.partition} {mv.source}->{mv.target} {mv.phase}"
                      for mv in m.moves] +
                     [f"{s.server_id} {s.state}" for s in m.servers])


def prepare(cluster, client, source_leads: bool) -> tuple[int, int]:
    """``lead_or_follow``, then wait until the router and every server have that map: a server
    that still thought it led would take the first write (fenced, never acknowledged) into its
    copy, which then differs from the new leader's and is rebuilt."""
    with cluster.admin() as admin:
        chosen, version = lead_or_follow(admin, cluster, source_leads)
        poll(lambda: client.status().router.map_version >= version and
             all(s.stats.map_version >= version for s in admin.shard_map().servers),
             30, f"map version {version} everywhere", interval=0.1)
    return chosen


CASES = [(phase, victim) for phase in ("catch_up", "promote", "drop")
         for victim in ("target", "source")]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("phase,victim", CASES, ids=[f"{p}-{v}" for p, v in CASES])
def test_killing_a_move_end_after_the_copy_loses_nothing(tmp_path, phase, victim):
    read_cfg, write_cfg, oracle = fo_tables(seed=41)
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path),
                            config=move_fault_config()) as cluster:
        client = cluster.client()
        client.create_model("fo", [read_cfg, write_cfg])
        fill_from_oracle(client, "fo", oracle)
        cluster.add_server()
        source_leads = phase != "promote"
        chosen = prepare(cluster, client, source_leads)
        stopped = []                            # pids SIGSTOPped (resumed in `finally`)
        with cluster.admin() as admin, Load(cluster, oracle) as load, \
                Churn(cluster, oracle) as churn:
            try:
                time.sleep(0.3)                 # writes and queries in flight
                mv = start_moves(admin, chosen, source_leads)
                key = (mv.table_uid, mv.partition)
                source, target = cluster.server(mv.source), cluster.server(mv.target)
                started = admin.shard_map()
                spec = next(t for md in started.models for t in md.tables
                            if t.table_uid == mv.table_uid)
                original = sorted(replica_set(started, key).replicas)
                other = next(s for s in original if s != source.server_id)
                probe = StatsProbe(target.address)
                try:
                    # The target has received the whole snapshot (it is pacing, then stores it).
                    poll(lambda: (b := probe.build(key)) is not None and
                         0 < b.bytes_total == b.bytes_done, 60,
                         f"the snapshot of partition {key} to reach {target.server_id}")
                    if phase == "catch_up":
                        time.sleep(SNAPSHOT_S / 2)      # writes after the snapshot: log to replay
                    if phase in ("catch_up", "promote"):
                        os.kill(source.pid, signal.SIGSTOP)
                        stopped.append(source.pid)
                    if phase == "catch_up":
                        # Past the copy's pacing plus storing the rows: the target now waits in
                        # CatchUp on its stopped leader.
                        time.sleep(SNAPSHOT_S / 2 + 0.6)
                        rs = replica_set(admin.shard_map(), key)
                        assert target.server_id in rs.learners, "promoted before the kill"
                        assert rs.replicas[0] == source.server_id
                    else:
                        # The build ends once ReplicaReady is answered: promoted, source dropped.
                        poll(lambda: probe.build(key) is None,
                             5 if phase == "promote" else 30,
                             f"{target.server_id}'s build of {key} to end")
                        promoted = admin.shard_map()
                        rs = replica_set(promoted, key)
                        assert target.server_id in rs.replicas, \
                            f"the build ended without a promotion: {rs}"
                        assert source.server_id not in rs.replicas
                        if phase == "drop":
                            src = StatsProbe(source.address)
                            try:
                                applied = poll(lambda: (s := src()).map_version >=
                                               promoted.version and s, 10,
                                               f"{source.server_id} to apply the drop")
                            finally:
                                src.close()
                            assert applied.dropped_partitions > 0
                finally:
                    probe.close()
                dead = target if victim == "target" else source
                os.kill(dead.pid, signal.SIGKILL)
            finally:
                for pid in stopped:
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass

            try:
                m = admin.wait_for_moves(
                    timeout=60,
                    until=lambda m: all(len(rs.replicas) == 2 and dead.server_id not in
                                        rs.replicas for rs in m.partitions))
            except shoal.ShoalError:
                pytest.fail(f"not repaired after killing {dead.server_id}: "
                            f"{describe(admin.shard_map())}")
            repaired = len(load.acked)
            time.sleep(0.3)                     # writes and queries on the final map
        assert not m.moves
        assert load.failures == [] and churn.failures == []
        assert load.answered > 20 and len(load.acked) > repaired > 5 and churn.acked > 5
        m = coordinator_map(cluster)
        check_replicas(m, load.acked)           # equal rows on every replica, acked writes too
        ids = np.arange(ROWS)
        with torch.no_grad():
            want = oracle.embedding_bags["tq"].weight[ids].numpy()
        np.testing.assert_array_equal(client.lookup_rows("fo", "tq", ids).numpy(), want)
        # The move rolled back (a target killed before its promotion) or completed.
        final = sorted(replica_set(m, key).replicas)
        if victim == "source":
            assert final == sorted([other, target.server_id])
        elif phase == "catch_up":
            assert final == original
        else:
            assert other in final
        # What the kill hit.
        P = spec.num_partitions
        if phase == "catch_up" and victim == "target":     # its snapshot was installed
            seq, rows = disk_copy(tmp_path, dead.server_id, *key, P)
            assert seq > 0 and rows == ROWS // P
        if phase == "catch_up" and victim == "source":     # the target reused its snapshot
            survivor = next(s for s in m.servers if s.server_id == target.server_id)
            assert survivor.stats.builds_caught_up >= 1
        if phase == "promote" and victim == "source":      # it died still holding its copy
            seq, rows = disk_copy(tmp_path, dead.server_id, *key, P)
            assert seq > 0 and rows == ROWS // P
        if phase == "drop" and victim == "source":         # it died after deleting its copy
            assert disk_copy(tmp_path, dead.server_id, *key, P) == (0, 0)
        client.close()


@pytest.mark.timeout(120)
def test_a_deposed_source_cannot_fork_the_promoted_target(tmp_path):
    """The race behind the fork bug (it showed up unforced in the drop case above, where it
    stranded a partition), forced with failpoints (``shards.failpoints``): a move whose source
    S leads partition K. While T copies K, S and T are held from applying any newer map
    (``map.apply`` paused). T's build ends: the coordinator promotes T, drops S, and the other
    replica F leads (epoch + 1); F is made to apply that map (a read routed at it). Then a write
    routed at the map S still has is sent to S, which still thinks it leads: S takes it and
    sends it to F, which refuses it, and to T, which has reported its copy ready but not yet
    applied the map that promoted it. Half a second later the failpoints are lifted. The write
    must be refused (never acknowledged), T must never hold nor serve it, and K must keep both
    replicas through the next write. Checked as well: the race was set up (S and T were behind
    the promoting map when the write was sent)."""
    from shards.failpoints import arm
    read_cfg, write_cfg, oracle = fo_tables(seed=43)
    with torch.no_grad():
        weight = oracle.embedding_bags["tq"].weight.detach().numpy().copy()
    conf = move_fault_config().replace(server__failpoints=True)
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path),
                            config=conf) as cluster:
        client = cluster.client()
        client.create_model("fo", [read_cfg, write_cfg])
        fill_from_oracle(client, "fo", oracle)
        cluster.add_server()
        chosen = prepare(cluster, client, source_leads=True)
        with cluster.admin() as admin:
            mv = start_moves(admin, chosen, source_leads=True)
            key = (mv.table_uid, mv.partition)
            before = admin.shard_map()                  # S leads K here
            spec = next(t for md in before.models for t in md.tables
                        if t.table_uid == mv.table_uid)
            source, target = cluster.server(mv.source), cluster.server(mv.target)
            other = next(s for s in replica_set(before, key).replicas if s != mv.source)
            held = [tmp_path / source.server_id, tmp_path / target.server_id]
            P = spec.num_partitions
            mine = np.arange(ROWS)[(np.arange(ROWS) & (P - 1)) == key[1]]
            stale_ids, later_ids = mine[:3], mine[3:6]
            probe = StatsProbe(target.address)
            to_source = channel(source.address)             # connected ahead of time
            stub = pbg.ShardServerStub(to_source)
            release = threading.Timer(0.5, lambda: [arm(d, {}) for d in held])
            try:
                poll(lambda: probe.build(key) is not None, 60, f"the build of {key}")
                for d in held:
                    arm(d, {"map.apply": "pause"})
                learning = admin.shard_map()                    # S leads, T learns
                assert target.server_id in replica_set(learning, key).learners
                after = poll(lambda: (m := admin.shard_map()) and list(replica_set(
                    m, key).replicas) == [other, target.server_id] and m, 60,
                    f"T's promotion and S's drop in {key}")
                read_direct(after, other, spec, stale_ids)      # F takes the new map
                s_version = stub.Stats(pb.StatsRequest(), timeout=10).map_version
                t_version = probe().map_version
                assert s_version < after.version and t_version < after.version, \
                    (s_version, t_version, after.version)       # the race is set up
                parts = np.array([key[1]], np.int32)
                epochs = np.array([replica_set(learning, key).epoch], np.int64)
                release.start()
                with pytest.raises(grpc.RpcError) as refused:   # at S's own map version
                    stub.WriteRows(pb.WriteRowsRequest(
                        map_version=min(learning.version, s_version), table_uid=key[0],
                        ids=pack(stale_ids),
                        rows=pack(weight[stale_ids] - 7),
                        routed=pb.PartitionEpochs(partitions=pack(parts), epochs=pack(epochs))),
                        timeout=15)
            finally:
                release.cancel()
                for d in held:
                    arm(d, {})
                probe.close()
                to_source.close()
            print(f"stale write to {mv.source}: {refused.value.code()} "
                  f"{refused.value.details()}")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            m = poll(lambda: (m := admin.shard_map()) and all(
                s.stats.map_version >= after.version for s in m.servers
                if s.server_id in (other, target.server_id)) and m, 10, "the new map applied")
            rs = replica_set(m, key)
            assert target.server_id in rs.replicas, f"target dropped: {describe(m)}"
            for server in rs.replicas:                      # never an unacknowledged row
                np.testing.assert_array_equal(read_direct(m, server, spec, stale_ids),
                                              weight[stale_ids])
            client.write_rows("fo", "tq", torch.from_numpy(later_ids),
                              torch.from_numpy(weight[later_ids]))
            time.sleep(1.0)                                 # a diverged peer is reported by now
            m = admin.shard_map()
            rs = replica_set(m, key)
            assert sorted(rs.replicas) == sorted([other, target.server_id]), describe(m)
            for server in rs.replicas:
                np.testing.assert_array_equal(read_direct(m, server, spec, later_ids),
                                              weight[later_ids])
        client.close()
