"""Node loss on real processes: a shard server is SIGKILLed while clients query and write.

The coordinator's failure detector (heartbeat lease) drops the dead server from its replica
sets, the router fails reads over to another replica and reports replicas that fail writes, so
queries keep succeeding and every acknowledged write is on every replica still in its set; then
new replicas are built and the replication factor comes back."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from torch.testing import assert_close

import shoal
from embeddings.synthetic import random_kjt
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import channel
from shoal.wire import pack
from tests.oracle import fill_from_oracle

from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

ROWS, DIM = 20_000, 16


def fast_failover_config():
    return shoal.ShoalConfig().replace(coordinator__lease_s=2.0,
                                       server__heartbeat_interval_s=0.25,
                                       router__rpc_timeout_s=3.0)


def coordinator_map(cluster) -> pb.ShardMap:
    ch = channel(cluster.coordinator_address)
    try:
        return pbg.CoordinatorStub(ch).GetShardMap(pb.GetShardMapRequest(), timeout=10).map
    finally:
        ch.close()


def read_direct(m: pb.ShardMap, server_id: str, spec: pb.TableSpec, ids: np.ndarray):
    """Rows of ``ids`` as one replica holds them, routed by the map ``m``."""
    P = spec.num_partitions
    sets = {rs.partition: rs for rs in m.partitions if rs.table_uid == spec.table_uid}
    parts = np.unique(ids & (P - 1)).astype(np.int32)
    epochs = np.array([sets[int(p)].epoch for p in parts], np.int64)
    addr = next(s.address for s in m.servers if s.server_id == server_id)
    ch = channel(addr)
    try:
        reply = pbg.ShardServerStub(ch).LookupRows(pb.LookupRowsRequest(
            map_version=m.version, segments=[pb.RowsSegment(
                table_uid=spec.table_uid, ids=pack(ids.astype(np.int64)),
                routed=pb.PartitionEpochs(partitions=pack(parts), epochs=pack(epochs)))]),
            timeout=10)
    finally:
        ch.close()
    t = reply.rows[0]
    return np.frombuffer(t.data, t.dtype).reshape(tuple(t.shape))


def test_kill9_under_load_loses_no_query_and_no_acknowledged_write(tmp_path):
    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    read_cfg = EmbeddingBagConfig(name="tq", embedding_dim=DIM, num_embeddings=ROWS,
                                  feature_names=["fq"])
    write_cfg = EmbeddingBagConfig(name="tw", embedding_dim=DIM, num_embeddings=ROWS,
                                   feature_names=["fw"])
    oracle = EmbeddingBagCollection(tables=[read_cfg])
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path),
                            config=fast_failover_config()) as cluster:
        client = cluster.client()
        client.create_model("fo", [read_cfg, write_cfg])
        fill_from_oracle(client, "fo", oracle)
        stop = threading.Event()
        failures, answered, acked = [], [0], []
        lock = threading.Lock()

        def query(seed):
            r = np.random.default_rng(seed)
            c = cluster.client(timeout=30)
            while not stop.is_set():
                kjt = random_kjt(r, ["fq"], [ROWS], 64, 10)
                try:
                    got = c.lookup("fo", kjt)
                    with torch.no_grad():
                        assert_close(got.values(), oracle(kjt).values(), rtol=1e-5, atol=1e-5)
                    with lock:
                        answered[0] += 1
                except Exception as e:          # any error or wrong answer is a failure
                    with lock:
                        failures.append(repr(e))
            c.close()

        def write():
            c = cluster.client(timeout=30)
            start = 0
            while not stop.is_set() and start + 200 <= ROWS:
                ids = np.arange(start, start + 200)          # each id written once
                rows = (ids[:, None] * 10 + np.arange(DIM)).astype(np.float32)
                try:
                    c.write_rows("fo", "tw", ids, rows)
                    with lock:
                        acked.append(ids)
                except shoal.ShoalError as e:
                    with lock:
                        failures.append(f"write: {e}")
                start += 200
                time.sleep(0.02)
            c.close()

        threads = [threading.Thread(target=query, args=(i,)) for i in range(4)]
        threads.append(threading.Thread(target=write))
        for t in threads:
            t.start()
        time.sleep(1.5)
        victim = cluster.servers[int(rng.integers(0, 3))]
        os.kill(victim.pid, signal.SIGKILL)
        # Run on past the lease so the failure detector acts while load continues.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = coordinator_map(cluster)
            if not any(victim.server_id in rs.replicas for rs in m.partitions):
                break
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(60)
        assert failures == []
        assert answered[0] > 20 and len(acked) > 5
        assert client.status().router.replica_retries > 0     # the dead replica was hit

        # The replication factor comes back: a learner is built for every partition that lost
        # a replica, from a surviving one, and promoted.
        deadline = time.monotonic() + 60
        while True:
            m = coordinator_map(cluster)
            if all(len(rs.replicas) == 2 and not rs.learners for rs in m.partitions):
                break
            assert time.monotonic() < deadline, "replication factor not restored in 60 s"
            time.sleep(0.3)
        assert not any(victim.server_id in rs.replicas for rs in m.partitions)
        assert {s.server_id: s.state for s in m.servers}[victim.server_id] == "dead"
        # Every replica of every partition holds the same rows, of both tables.
        for table in ("tq", "tw"):
            tspec = next(t for md in m.models for t in md.tables if t.name == table)
            all_ids = np.arange(ROWS)
            for rs in (r for r in m.partitions if r.table_uid == tspec.table_uid):
                mine = all_ids[(all_ids & (tspec.num_partitions - 1)) == rs.partition]
                copies = [read_direct(m, s, tspec, mine) for s in rs.replicas]
                for other in copies[1:]:
                    np.testing.assert_array_equal(copies[0], other)
        spec = next(t for md in m.models for t in md.tables if t.name == "tw")
        ids = np.concatenate(acked)
        want = (ids[:, None] * 10 + np.arange(DIM)).astype(np.float32)
        P = spec.num_partitions
        sets = {rs.partition: rs for rs in m.partitions if rs.table_uid == spec.table_uid}
        for server in {s for rs in sets.values() for s in rs.replicas}:
            held = np.array([p for p, rs in sets.items() if server in rs.replicas])
            mine = ids[np.isin(ids & (P - 1), held)]
            np.testing.assert_array_equal(read_direct(m, server, spec, mine),
                                          want[np.isin(ids & (P - 1), held)])
        client.close()


def test_only_replica_lost_fails_unavailable_naming_the_partition(tmp_path):
    cfg = EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=64, feature_names=["f1"])
    with shoal.LocalCluster(servers=2, replication=1, data_dir=str(tmp_path),
                            config=fast_failover_config()) as cluster:
        client = cluster.client()
        placed = client.create_model("r1", [cfg])
        rows = torch.arange(64 * 4, dtype=torch.float32).reshape(64, 4)
        client.write_rows("r1", "t1", torch.arange(64), rows)
        m = coordinator_map(cluster)
        P = placed[0].num_partitions
        owner = {rs.partition: rs.replicas[0] for rs in m.partitions}
        victim = cluster.servers[0]
        dead_parts = sorted(p for p, s in owner.items() if s == victim.server_id)
        live_parts = sorted(p for p, s in owner.items() if s != victim.server_id)
        assert dead_parts and live_parts
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(3.0)                                      # past the lease
        dead_ids = np.array([p + P for p in dead_parts])
        live_ids = np.array([p + P for p in live_parts])
        for _ in range(3):
            with pytest.raises(shoal.ShoalError) as e:
                client.lookup_rows("r1", "t1", dead_ids)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            assert f"partition {dead_parts[0]} of table 't1'" in e.value.message
            np.testing.assert_array_equal(client.lookup_rows("r1", "t1", live_ids).numpy(),
                                          rows[live_ids].numpy())
        # The lost partition's only replica stays in the map: its data lives nowhere else.
        m = coordinator_map(cluster)
        assert {rs.partition: list(rs.replicas) for rs in m.partitions} == \
            {p: [s] for p, s in owner.items()}
        client.close()


def test_slow_replica_is_hedged_and_avoided(tmp_path):
    """One replica's replies are delayed 200 ms by a TCP proxy: hedging and slow-server
    avoidance keep p99 within 2x the healthy p99 with at most 10% extra RPCs."""
    from tests.netutil import DelayProxy

    cfg = EmbeddingBagConfig(name="th", embedding_dim=DIM, num_embeddings=ROWS,
                             feature_names=["fh"])
    torch.manual_seed(11)
    oracle = EmbeddingBagCollection(tables=[cfg])
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path)) as cluster:
        client = cluster.client()
        client.create_model("hd", [cfg])
        fill_from_oracle(client, "hd", oracle)
        rng = np.random.default_rng(3)
        batches = [random_kjt(rng, ["fh"], [ROWS], 32, 8) for _ in range(40)]

        def run(n):
            lat = []
            for i in range(n):
                kjt = batches[i % len(batches)]
                t = time.perf_counter()
                got = client.lookup("hd", kjt)
                lat.append(time.perf_counter() - t)
                with torch.no_grad():
                    assert_close(got.values(), oracle(kjt).values(), rtol=1e-5, atol=1e-5)
            return np.percentile(np.array(lat), 99)

        run(100)                                             # warm up
        healthy_p99 = run(300)
        slow = cluster.servers[1]
        with DelayProxy(slow.address, 0.2) as proxy:
            ch = channel(cluster.coordinator_address)
            coord = pbg.CoordinatorStub(ch)
            version = coord.Register(pb.RegisterRequest(server_id=slow.server_id,
                                                        address=proxy.address),
                                     timeout=10).map_version
            deadline = time.monotonic() + 20
            while client.status().router.map_version < version:
                assert time.monotonic() < deadline, "router never picked up the proxy address"
                time.sleep(0.1)
            run(60)                                          # the router learns s1 is slow
            before = client.status().router
            slow_p99 = run(300)
            after = client.status().router
            ch.close()
        extra = (after.hedges - before.hedges) / (after.batches - before.batches)
        print(f"healthy p99 {healthy_p99 * 1e3:.1f} ms, with a 200 ms replica "
              f"{slow_p99 * 1e3:.1f} ms, extra RPCs {extra:.1%}, hedges won "
              f"{after.hedge_wins - before.hedge_wins}")
        assert after.hedges > 0                              # the slow replica was hedged
        assert slow_p99 <= 2 * healthy_p99
        assert extra <= 0.10
        client.close()
