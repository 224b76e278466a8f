"""Restarts and redirects on real local clusters: a shard server restarted on its data folder
serves the same rows; a restarted coordinator serves the same shard map; a router holding an old
map is redirected by the servers, refreshes and answers correctly.

Rows are checked against an independent torchrec oracle, and, where a replica could mask a
fault, by asking one shard server directly over gRPC with the routing taken from the
coordinator's map."""
from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest
import torch
from torch.testing import assert_close

import shoal
from shoal.errors import from_rpc_error
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import channel
from shoal.wire import pack
from tests.oracle import fill_from_oracle

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

TOL = dict(rtol=1e-5, atol=1e-5)
WAIT_S = 20.0


# ---------------------------------------------------------------- helpers

class Coordinator:
    """The coordinator's admin RPCs, errors raised as ShoalError."""

    def __init__(self, address: str):
        self._channel = channel(address)
        self._stub = pbg.CoordinatorStub(self._channel)

    def _call(self, method, request):
        try:
            return method(request, timeout=10)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def shard_map(self) -> pb.ShardMap:
        return self._call(self._stub.GetShardMap, pb.GetShardMapRequest()).map

    def set_replicas(self, table_uid: int, partition: int, replicas) -> pb.SetReplicasReply:
        return self._call(self._stub.SetReplicas, pb.SetReplicasRequest(
            table_uid=table_uid, partition=partition, replicas=list(replicas)))

    def close(self):
        self._channel.close()


def wait_until(predicate, what: str, timeout: float = WAIT_S, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_servers_current(coord: Coordinator, timeout: float = WAIT_S) -> pb.ShardMap:
    """Wait until every server is alive and reports (by heartbeat) the coordinator's version."""
    def ready():
        m = coord.shard_map()
        ok = all(s.state == "alive" and s.stats.map_version == m.version for s in m.servers)
        return m if ok else None
    return wait_until(ready, "every shard server to report the current map version", timeout)


def make_model(client, name: str, rows: int = 1000, dim: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    cfg = EmbeddingBagConfig(name=f"{name}_t", num_embeddings=rows, embedding_dim=dim,
                             feature_names=[f"{name}_f"], pooling=PoolingType.SUM)
    ebc = EmbeddingBagCollection(tables=[cfg], device=torch.device("cpu"))
    client.create_model(name, tables=[cfg])
    fill_from_oracle(client, name, ebc)
    return ebc, cfg


def weight(ebc, cfg) -> torch.Tensor:
    return ebc.embedding_bags[cfg.name].weight.detach()


def table_of(m: pb.ShardMap, model: str, table: str) -> pb.TableSpec:
    md = next(md for md in m.models if md.name == model)
    return next(t for t in md.tables if t.name == table)


def replica_sets(m: pb.ShardMap, table_uid: int) -> dict[int, pb.ReplicaSet]:
    return {rs.partition: rs for rs in m.partitions if rs.table_uid == table_uid}


def address_of(m: pb.ShardMap, server_id: str) -> str:
    return next(s.address for s in m.servers if s.server_id == server_id)


def ids_in_partitions(spec: pb.TableSpec, partitions) -> np.ndarray:
    ids = np.arange(spec.num_embeddings, dtype=np.int64)
    return ids[np.isin(ids & (spec.num_partitions - 1), list(partitions))]


def direct_lookup_rows(m: pb.ShardMap, server_id: str, spec: pb.TableSpec,
                       ids: np.ndarray, holder: bool = True) -> torch.Tensor:
    """Ask one shard server for rows, routed exactly as the map ``m`` says (its version, and
    each partition's epoch), so no other replica can answer in its place. ``holder``: check
    that ``m`` names it a replica of every partition asked."""
    sets = replica_sets(m, spec.table_uid)
    parts = np.unique(ids & (spec.num_partitions - 1)).astype(np.int32)
    assert not holder or all(server_id in sets[int(p)].replicas for p in parts), \
        f"{server_id} does not hold every partition of {parts.tolist()}"
    epochs = np.array([sets[int(p)].epoch for p in parts], dtype=np.int64)
    req = pb.LookupRowsRequest(map_version=m.version, segments=[pb.RowsSegment(
        table_uid=spec.table_uid, ids=pack(ids.astype(np.int64)),
        routed=pb.PartitionEpochs(partitions=pack(parts), epochs=pack(epochs)))])
    ch = channel(address_of(m, server_id))
    try:
        reply = pbg.ShardServerStub(ch).LookupRows(req, timeout=10)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    finally:
        ch.close()
    t = reply.rows[0]
    return torch.from_numpy(np.frombuffer(t.data, t.dtype).reshape(tuple(t.shape)).copy())


def pooled_kjt(key: str, ids: np.ndarray, bag: int = 3) -> KeyedJaggedTensor:
    n = len(ids) - len(ids) % bag
    return KeyedJaggedTensor(keys=[key], values=torch.from_numpy(ids[:n].astype(np.int64)),
                             lengths=torch.full((n // bag,), bag, dtype=torch.int32))


def assert_pooled_equal(client, model: str, ebc, features: KeyedJaggedTensor):
    with torch.no_grad():
        expected = ebc(features)
    got = client.lookup(model, features)
    assert got.keys() == expected.keys()
    assert_close(got.values(), expected.values(), **TOL)


# ---------------------------------------------------------------- (a) shard server restart

@pytest.mark.parametrize("replication,servers", [(1, 2), (2, 3)])
def test_restarted_server_serves_the_same_rows(tmp_path, replication, servers):
    with shoal.LocalCluster(servers=servers, replication=replication,
                            data_dir=str(tmp_path)) as cluster, cluster.client() as client:
        coord = Coordinator(cluster.coordinator_address)
        ebc, cfg = make_model(client, "restart_rows", rows=1000, dim=8, seed=1)
        w = weight(ebc, cfg)
        m = coord.shard_map()
        spec = table_of(m, "restart_rows", cfg.name)
        sid = "s0"
        mine = [p for p, rs in replica_sets(m, spec.table_uid).items() if sid in rs.replicas]
        assert mine, f"{sid} holds no partition"
        if replication == 1:
            assert all(len(rs.replicas) == 1 for rs in replica_sets(m, spec.table_uid).values())
        ids = ids_in_partitions(spec, mine)
        assert_close(direct_lookup_rows(m, sid, spec, ids), w[ids], rtol=0, atol=0)

        old_pid = cluster.server(sid).pid
        cluster.kill(sid)
        cluster.restart(sid)
        assert cluster.server(sid).pid != old_pid
        m2 = coord.shard_map()
        assert m2.version == m.version                 # same address: the map did not change
        assert address_of(m2, sid) == address_of(m, sid)
        # the restarted server itself, at the same epochs, from its own RocksDB
        assert_close(direct_lookup_rows(m2, sid, spec, ids), w[ids], rtol=0, atol=0)
        # and through the router (with replication 1 only the restarted server can answer)
        all_ids = torch.from_numpy(np.random.default_rng(1).permutation(cfg.num_embeddings))
        assert_close(client.lookup_rows("restart_rows", cfg.name, all_ids), w[all_ids],
                     rtol=0, atol=0)
        assert_pooled_equal(client, "restart_rows", ebc, pooled_kjt(cfg.feature_names[0], ids))
        assert_pooled_equal(client, "restart_rows", ebc,
                            pooled_kjt(cfg.feature_names[0], all_ids.numpy(), bag=7))
        # a write after the restart lands on the restarted server too
        new = torch.full((len(ids), cfg.embedding_dim), 0.5)
        client.write_rows("restart_rows", cfg.name, ids, new)
        assert_close(direct_lookup_rows(m2, sid, spec, ids), new, rtol=0, atol=0)
        coord.close()


# ---------------------------------------------------------------- (b) coordinator restart

def map_essentials(m: pb.ShardMap):
    """What a coordinator restart must preserve: version, models, replica sets and epochs,
    members (liveness and stats are soft state and excluded)."""
    return (m.version,
            sorted(md.SerializeToString(deterministic=True) for md in m.models),
            sorted((rs.table_uid, rs.partition, tuple(rs.replicas), rs.epoch)
                   for rs in m.partitions),
            sorted((s.server_id, s.address, s.memory_budget_bytes) for s in m.servers),
            m.default_replication)


def test_restarted_coordinator_keeps_the_map(tmp_path):
    with shoal.LocalCluster(servers=3, replication=2,
                            data_dir=str(tmp_path)) as cluster, cluster.client() as client:
        coord = Coordinator(cluster.coordinator_address)
        ebc, cfg = make_model(client, "coord_a", rows=700, dim=4, seed=2)
        # a changed epoch must survive too
        spec = table_of(coord.shard_map(), "coord_a", cfg.name)
        rs = replica_sets(coord.shard_map(), spec.table_uid)[1]
        coord.set_replicas(spec.table_uid, 1, list(reversed(rs.replicas)))
        before = coord.shard_map()
        assert replica_sets(before, spec.table_uid)[1].epoch == rs.epoch + 1

        cluster.restart_coordinator()
        coord.close()
        coord = Coordinator(cluster.coordinator_address)
        after = coord.shard_map()
        assert map_essentials(after) == map_essentials(before)

        # lookups keep working through the router (it is not on the coordinator)
        w = weight(ebc, cfg)
        ids = torch.arange(cfg.num_embeddings)
        assert_close(client.lookup_rows("coord_a", cfg.name, ids), w, rtol=0, atol=0)
        assert_pooled_equal(client, "coord_a", ebc,
                            pooled_kjt(cfg.feature_names[0], ids.numpy(), bag=5))

        # the servers come back as alive by their heartbeats; then a new model can be created
        wait_servers_current(coord)
        ebc_b, cfg_b = make_model(client, "coord_b", rows=300, dim=8, seed=3)
        m = coord.shard_map()
        assert m.version == before.version + 1
        assert {md.name for md in m.models} == {"coord_a", "coord_b"}
        uids = [t.table_uid for md in m.models for t in md.tables]
        assert len(set(uids)) == len(uids)             # the uid counter survived the restart
        w_b = weight(ebc_b, cfg_b)
        ids_b = torch.arange(cfg_b.num_embeddings)
        assert_close(client.lookup_rows("coord_b", cfg_b.name, ids_b), w_b, rtol=0, atol=0)
        assert_pooled_equal(client, "coord_b", ebc_b,
                            pooled_kjt(cfg_b.feature_names[0], ids_b.numpy()))
        # the old model is unchanged
        assert_close(client.lookup_rows("coord_a", cfg.name, ids), w, rtol=0, atol=0)
        # and a name already taken before the restart is still taken
        with pytest.raises(shoal.ShoalError) as e:
            client.create_model("coord_a", tables=[cfg])
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
        coord.close()


# ---------------------------------------------------------------- (c) redirects

NO_POLL = shoal.ShoalConfig().replace(router__map_poll_interval_s=3600)


def reorder_all(coord: Coordinator, spec: pb.TableSpec, partitions) -> int:
    """Rotate the replica list of each partition (a new leader; same holders); returns the
    coordinator's map version afterwards."""
    m = coord.shard_map()
    sets = replica_sets(m, spec.table_uid)
    version = m.version
    for p in partitions:
        old = list(sets[p].replicas)
        reply = coord.set_replicas(spec.table_uid, p, old[1:] + old[:1])
        assert list(reply.partition.replicas) == old[1:] + old[:1]
        assert reply.partition.epoch == sets[p].epoch + 1
        assert reply.map_version > version
        version = reply.map_version
    return version


def test_router_with_old_map_is_redirected(tmp_path):
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path),
                            config=NO_POLL) as cluster, cluster.client() as client:
        coord = Coordinator(cluster.coordinator_address)
        ebc, cfg = make_model(client, "redirect", rows=2000, dim=8, seed=4)
        w = weight(ebc, cfg)
        key = cfg.feature_names[0]
        m0 = coord.shard_map()
        spec = table_of(m0, "redirect", cfg.name)
        assert spec.num_partitions >= 2
        all_ids = np.arange(cfg.num_embeddings, dtype=np.int64)
        assert_pooled_equal(client, "redirect", ebc, pooled_kjt(key, all_ids, bag=4))
        st = client.status().router
        assert st.map_version == m0.version
        redirects0 = st.redirects

        # -------- pooled lookup after a reorder of two partitions
        moved = [0, 1]
        version = reorder_all(coord, spec, moved)
        m1 = wait_servers_current(coord)
        assert m1.version == version
        assert client.status().router.map_version == m0.version   # the router has not polled
        ids = ids_in_partitions(spec, moved)
        # Reads routed with the old epochs are answered by the same holders without a redirect:
        # a replica still in the set has every acknowledged write.
        assert_pooled_equal(client, "redirect", ebc, pooled_kjt(key, ids, bag=3))
        st = client.status().router
        assert st.redirects == redirects0
        redirects1 = st.redirects

        # -------- lookup_rows after another reorder
        moved = list(range(spec.num_partitions))
        version = reorder_all(coord, spec, moved)
        wait_servers_current(coord)
        assert client.status().router.map_version < version
        shuffled = np.random.default_rng(4).permutation(all_ids)
        assert_close(client.lookup_rows("redirect", cfg.name, shuffled), w[shuffled],
                     rtol=0, atol=0)
        st = client.status().router
        assert st.redirects == redirects1
        redirects2 = st.redirects

        # -------- write_rows after another reorder: a write must reach the new leader at the
        # new epoch, so it is redirected; then read every replica directly
        moved = [spec.num_partitions - 1]
        version = reorder_all(coord, spec, moved)
        m3 = wait_servers_current(coord)
        assert client.status().router.map_version < version
        ids = ids_in_partitions(spec, moved)
        new = torch.from_numpy(np.random.default_rng(5).standard_normal(
            (len(ids), cfg.embedding_dim)).astype(np.float32))
        assert client.write_rows("redirect", cfg.name, ids, new) == len(ids)
        st = client.status().router
        assert st.redirects >= redirects2 + 1
        assert st.map_version == coord.shard_map().version
        holders = replica_sets(m3, spec.table_uid)[moved[0]].replicas
        assert len(holders) == 2
        for sid in holders:
            assert_close(direct_lookup_rows(m3, sid, spec, ids), new, rtol=0, atol=0)
        with torch.no_grad():
            weight(ebc, cfg)[torch.from_numpy(ids)] = new   # the oracle takes the same write
        assert_close(client.lookup_rows("redirect", cfg.name, ids), new, rtol=0, atol=0)
        assert_close(client.lookup_rows("redirect", cfg.name, all_ids), weight(ebc, cfg),
                     rtol=0, atol=0)
        assert_pooled_equal(client, "redirect", ebc, pooled_kjt(key, all_ids, bag=5))

        # a holder asked at an older epoch answers; a server that does not hold the partition
        # answers with a redirect
        assert_close(direct_lookup_rows(m0, holders[0], spec, ids), new, rtol=0, atol=0)
        other = next(s.server_id for s in m3.servers if s.server_id not in holders)
        with pytest.raises(shoal.ShoalError) as e:
            direct_lookup_rows(m0, other, spec, ids, holder=False)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        coord.close()


def test_set_replicas_must_be_a_reordering(tmp_path):
    with shoal.LocalCluster(servers=3, replication=2,
                            data_dir=str(tmp_path)) as cluster, cluster.client() as client:
        coord = Coordinator(cluster.coordinator_address)
        make_model(client, "reorder_only", rows=100, dim=4, seed=6)
        m = coord.shard_map()
        spec = table_of(m, "reorder_only", "reorder_only_t")
        rs = replica_sets(m, spec.table_uid)[0]
        holders = list(rs.replicas)
        other = next(s.server_id for s in m.servers if s.server_id not in holders)
        bad = [[holders[0], other],                   # a server that does not hold the data
               [holders[0]],                          # fewer replicas
               [holders[0], holders[0]],              # a duplicate
               holders + [other],                     # more replicas
               [holders[0], holders[1], holders[1]],  # duplicate on top of the set
               [],
               [holders[0], "no_such_server"]]
        for replicas in bad:
            with pytest.raises(shoal.ShoalError) as e:
                coord.set_replicas(spec.table_uid, 0, replicas)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, replicas
        with pytest.raises(shoal.ShoalError) as e:
            coord.set_replicas(spec.table_uid, spec.num_partitions, holders)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        # nothing changed
        after = coord.shard_map()
        assert after.version == m.version
        assert replica_sets(after, spec.table_uid)[0].epoch == rs.epoch
        assert list(replica_sets(after, spec.table_uid)[0].replicas) == holders
        # a real reordering is accepted and raises the epoch
        reply = coord.set_replicas(spec.table_uid, 0, list(reversed(holders)))
        assert reply.partition.epoch == rs.epoch + 1
        assert reply.map_version == m.version + 1
        coord.close()


# ---------------------------------------------------------------- reads survive a dead replica

@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_reads_fall_back_to_another_replica(tmp_path, sig):
    """A replica that is killed (connection refused) or stopped (no answer until the deadline)
    costs a retry on the other replica, never a failed or wrong answer."""
    import signal as signals

    cfg = shoal.ShoalConfig().replace(router__rpc_timeout_s=1.0)
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path),
                            config=cfg) as cluster:
        client = cluster.client()
        ebc, tcfg = make_model(client, "fb", rows=4000, dim=8, seed=3)
        key = tcfg.feature_names[0]
        ids = np.random.default_rng(0).integers(0, 4000, 3000)
        assert_pooled_equal(client, "fb", ebc, pooled_kjt(key, ids))
        before = client.status().router.replica_retries
        victim = cluster.servers[0]
        os.kill(victim.pid, getattr(signals, sig))
        try:
            for round_ in range(6):      # both replicas are preferred in turn: hit the dead one
                sub = ids[round_ * 500:(round_ + 1) * 500]
                assert_pooled_equal(client, "fb", ebc, pooled_kjt(key, sub))
                assert_close(client.lookup_rows("fb", tcfg.name, sub),
                             weight(ebc, tcfg)[torch.from_numpy(sub)], **TOL)
            assert client.status().router.replica_retries > before
        finally:
            if sig == "SIGSTOP":
                os.kill(victim.pid, signals.SIGCONT)
        client.close()
