"""Shard servers run the experts they hold (ExpertForward): an expert layer written as a table
(``experts.layout``) on a real 3-server cluster, each server asked for its experts' outputs,
which equal the grouped expert FFN computed locally, from the memory tier and from RocksDB
alone; bad requests get INVALID_ARGUMENT naming the field, stale routing a redirect."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import shoal
from experts.compute import expert_ffn
from experts.layout import expert_row_ids, pack_expert, table_for
from experts.specs import ExpertLayerSpec
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import channel
from shoal.wire import pack, unpack


def _setup(cluster, spec, g):
    client = cluster.client(timeout=60)
    table = table_for(spec)
    (placed,) = client.create_model("moe", [table])
    w1 = torch.randn(spec.num_experts, spec.d_ff, spec.d_model, generator=g) * 0.1
    w2 = torch.randn(spec.num_experts, spec.d_model, spec.d_ff, generator=g) * 0.1
    w3 = torch.randn(spec.num_experts, spec.d_ff, spec.d_model, generator=g) * 0.1 \
        if spec.gated else None
    ids = np.concatenate([expert_row_ids(spec, e) for e in range(spec.num_experts)])
    rows = torch.cat([pack_expert(w1[e], w2[e], w3[e] if w3 is not None else None)
                      for e in range(spec.num_experts)])
    client.write_rows("moe", table.name, ids, rows)
    return client, placed, (w1, w2, w3)


def _request(m, uid, experts, counts, x, spec, epoch_shift=0):
    sets = {rs.partition: rs for rs in m.partitions if rs.table_uid == uid}
    parts = np.array(experts, np.int32)
    return pb.ExpertForwardRequest(
        map_version=m.version, table_uid=uid,
        routed=pb.PartitionEpochs(partitions=pack(parts), epochs=pack(np.array(
            [sets[e].epoch + epoch_shift for e in experts], np.int64))),
        experts=pack(parts), counts=pack(np.array(counts, np.int64)), hidden=pack(x.numpy()),
        d_ff=spec.d_ff, gated=spec.gated)


def _half_of_four_experts() -> int:
    """A budget whose rows share holds about half of the 4 experts a server holds here
    (6 experts of 144 rows x 32 floats, 2 replicas on 3 servers): the rest read from disk."""
    from shards.tiers import budget_for_rows
    return budget_for_rows(2 * 144 * 32 * 4)


@pytest.mark.parametrize("budget", [8 << 30, 0, _half_of_four_experts()],
                         ids=["memory-tier", "rocksdb", "partly-cold"])
def test_servers_run_their_experts(tmp_path, budget):
    spec = ExpertLayerSpec("l0", num_experts=6, d_model=32, d_ff=48, top_k=2).validate()
    g = torch.Generator().manual_seed(4)
    cfg = shoal.ShoalConfig().replace(server__memory_budget_bytes=budget)
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path / "c"),
                            config=cfg) as cluster:
        client, placed, (w1, w2, w3) = _setup(cluster, spec, g)
        m = client.status().map
        addr = {s.server_id: s.address for s in m.servers}
        held: dict[str, list[int]] = {}
        for rs in m.partitions:
            if rs.table_uid == placed.table_uid and rs.partition < spec.num_experts:
                for s in rs.replicas:
                    held.setdefault(s, []).append(rs.partition)
        assert sorted({e for es in held.values() for e in es}) == list(range(6))
        for s, experts in sorted(held.items()):
            experts = sorted(experts)
            counts = [(3 * e + 1) % 5 for e in experts]          # some experts get 0 tokens
            x = torch.randn(sum(counts), spec.d_model, generator=g)
            ch = channel(addr[s])
            try:
                reply = pbg.ShardServerStub(ch).ExpertForward(
                    _request(m, placed.table_uid, experts, counts, x, spec), timeout=30)
            finally:
                ch.close()
            got = torch.from_numpy(unpack(reply.out, "out", "float32", 2).copy())
            idx = torch.tensor(experts)
            want = expert_ffn(spec, w1[idx], w2[idx], w3[idx], x,
                              torch.tensor(counts, dtype=torch.int64))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if 0 < budget < 8 << 30:             # partly cold: memory and RocksDB both served
            import time
            time.sleep(1.5)                  # the servers' counters, by heartbeat
            for s in client.status().map.servers:
                assert 0 < s.stats.resident_bytes < 4 * 144 * 32 * 4, s.stats
                assert s.stats.cold_ids > 0, s.stats
        client.close()


def test_bad_expert_requests_are_refused_clearly(tmp_path):
    spec = ExpertLayerSpec("l0", num_experts=4, d_model=16, d_ff=8, top_k=1).validate()
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        client, placed, _ = _setup(cluster, spec, torch.Generator().manual_seed(5))
        m = client.status().map
        ch = channel(m.servers[0].address)
        stub = pbg.ShardServerStub(ch)
        x = torch.randn(3, 16)

        def refused(req):
            with pytest.raises(grpc.RpcError) as e:
                stub.ExpertForward(req, timeout=10)
            return e.value.code(), e.value.details()

        uid = placed.table_uid
        code, msg = refused(_request(m, uid, [0, 1], [1, 1], x, spec))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "counts" in msg and "3 rows" in msg
        code, msg = refused(_request(m, uid, [0], [3], torch.randn(3, 12), spec))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "d_model 16" in msg
        nan = x.clone()
        nan[1, 2] = float("nan")
        code, msg = refused(_request(m, uid, [0], [3], nan, spec))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "finite" in msg
        big = ExpertLayerSpec("l0", num_experts=4, d_model=16, d_ff=9, top_k=1)
        code, msg = refused(_request(m, uid, [0], [3], x, big))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "d_ff: 9" in msg
        code, msg = refused(_request(m, uid, [0, 0], [1, 2], x, spec))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "distinct" in msg
        req = _request(m, uid, [0], [3], x, spec)
        req.experts.CopyFrom(pack(np.array([9], np.int32)))          # beyond the 4 partitions
        code, msg = refused(req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "expert 9 is not in [0, 4)" in msg
        code, msg = refused(_request(m, uid, [0], [3], x, spec, epoch_shift=5))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "epoch" in msg
        assert stub.ExpertForward(_request(m, uid, [0, 2], [2, 1], x, spec), timeout=10).out.shape
        ch.close()
        client.close()
