"""Online updates of a serving version: once acknowledged, every replica answers with the
new rows (read from each server directly); updates streamed while clients query never show a
row mixed from old and new values; a stream applies each id's rows in order."""
from __future__ import annotations


import numpy as np
import torch

import shoal
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.wire import pack, unpack
from tests.traffic import WholeRowReaders

ROWS, DIM = 1024, 16


def replica_rows(cluster, client, server_id: str, ids: np.ndarray) -> np.ndarray:
    """Rows of table "t" of model "m" as one server holds them (its LookupRows)."""
    from embeddings.partition import partition_of
    from shoal.serving import channel

    m = client.status().map
    (md,) = [x for x in m.models if x.name == "m" and x.current]
    t = md.tables[0]
    sets = {rs.partition: rs for rs in m.partitions if rs.table_uid == t.table_uid}
    parts = partition_of(ids, t.num_partitions)
    mine = np.unique(parts).astype(np.int32)
    assert all(server_id in sets[int(p)].replicas for p in mine)
    routed = pb.PartitionEpochs(partitions=pack(mine),
                                epochs=pack(np.array([sets[int(p)].epoch for p in mine])))
    ch = channel(cluster.server(server_id).address)
    try:
        reply = pbg.ShardServerStub(ch).LookupRows(pb.LookupRowsRequest(
            map_version=m.version, segments=[pb.RowsSegment(table_uid=t.table_uid,
                                                            ids=pack(ids), routed=routed)]),
            timeout=10)
    finally:
        ch.close()
    return unpack(reply.rows[0], "rows", "float32", 2).copy()


def test_updates_reach_every_replica_and_never_mix(tmp_path):
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        client.create_model("m", [shoal.TableSpec("t", ROWS, DIM, feature_names=("f",))])
        client.write_rows("m", "t", np.arange(ROWS), np.zeros((ROWS, DIM), np.float32))

        # An acknowledged update: both replicas answer with the new rows.
        ids = np.array([3, 500, 1023])
        new = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM) + 1
        assert client.update("m", "t", ids, new) == 3
        for s in ("s0", "s1"):
            np.testing.assert_array_equal(replica_rows(cluster, client, s, ids), new)

        # A stream of updates while 3 clients query: each row is all one value (never half
        # one write, half another), and values per row never go back once a write of them
        # was acknowledged.
        hot = np.arange(600, 856)                      # rows the first update did not touch
        readers = WholeRowReaders(lambda: cluster.client(timeout=30),
                                  lambda c: c.lookup_rows("m", "t", torch.from_numpy(hot)).numpy(),
                                  n=3)
        with readers:
            for v in range(1, 21):
                batches = [(hot[i:i + 64], np.full((64, DIM), v, np.float32))
                           for i in range(0, len(hot), 64)]
                assert client.update_stream("m", "t", batches, in_flight=4) == len(hot)
                readers.acked = v
        assert not readers.errors, repr(readers.errors[0])
        assert readers.reads > 0
        for s in ("s0", "s1"):
            np.testing.assert_array_equal(replica_rows(cluster, client, s, hot),
                                          np.full((len(hot), DIM), 20, np.float32))

        # A stream that updates the same ids twice applies them in order.
        same = [(np.array([7, 8]), np.full((2, DIM), 1.0, np.float32)),
                (np.array([8, 9]), np.full((2, DIM), 2.0, np.float32)),
                (np.array([7]), np.full((1, DIM), 3.0, np.float32))]
        assert client.update_stream("m", "t", same * 5, in_flight=4) == 25
        got = client.lookup_rows("m", "t", torch.tensor([7, 8, 9])).numpy()[:, 0]
        assert got.tolist() == [3.0, 2.0, 2.0]
        client.close()
