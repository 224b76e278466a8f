"""Bulk ingest of a load's chunks: on a real RocksDB (one SST file per partition, ingest
records, the read-back check, drops) and on real shard servers (the Ingest RPC's fencing and
refusals, checksums answered from ingest records and, where other writes touched a partition,
by a scan that agrees)."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import shoal
from embeddings.checksum import partition_checksums
from shards.storage import RocksRowStore, StorageError
from tests.ckpt_fixtures import write_safetensors

P = 4


def chunk(rows: np.ndarray, lo: int, hi: int):
    ids = np.arange(lo, hi, dtype=np.int64)
    return ids & (P - 1), ids, rows[lo:hi]


def test_prepared_ingest_stores_rows_records_and_positions(tmp_path):
    """Two contiguous chunks and one scattered subset: rows read back exactly, each
    partition's records hold its rows and checksums per chunk, the row files sit in the
    bottom level (no compaction), and a drop removes rows and records."""
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((3000, 8)).astype(np.float32)
    store = RocksRowStore(tmp_path / "db")
    positions = (np.arange(P), np.zeros(P, np.int64), np.full(P, 3, np.int64))
    store.prepare_ingest(9, *chunk(rows, 0, 1024), 0, 1024).commit(positions)
    store.prepare_ingest(9, *chunk(rows, 1024, 2048), 1024, 2048).commit(None)
    scattered = np.sort(rng.choice(np.arange(2048, 3000), 500, replace=False))
    prep = store.prepare_ingest(9, scattered & (P - 1), scattered, rows[scattered], 2048, 3000)
    prep.commit(None)
    stored = np.concatenate([np.arange(2048), scattered])
    got = np.frombuffer(store.read_rows(9, stored & (P - 1), stored, 32), np.float32)
    np.testing.assert_array_equal(got.reshape(-1, 8), rows[stored])
    assert store.read_positions(9, P)[1].tolist() == [3] * P
    assert store.stored_partitions() == {(9, p) for p in range(P)}
    want_sums, want_rows = partition_checksums(stored, rows[stored], stored & (P - 1), P)
    for p in range(P):
        rec = store.ingest_records(9, p)
        assert rec["lo"].tolist() == [0, 1024, 2048] and rec["hi"].tolist() == [1024, 2048, 3000]
        assert rec["rows"].tolist()[:2] == [256, 256]
        assert int(rec["rows"].sum()) == int(want_rows[p])
        with np.errstate(over="ignore"):
            assert rec["checksum"].sum(dtype=np.uint64) == want_sums[p]
    row_files = [f for f in store._db.live_files() if f["num_entries"] >= 100]
    assert len(row_files) == 3 * P and {f["level"] for f in row_files} == {6}
    store.drop_partition(9, 2)
    assert len(store.ingest_records(9, 2)) == 0 and len(store.scan_partition(9, 2)[0]) == 0
    assert len(store.scan_partition(9, 1)[0]) == int(want_rows[1])
    assert list((tmp_path / "db" / "sst-tmp").iterdir()) == []       # no files left behind
    prep = store.prepare_ingest(9, *chunk(rows, 0, 100), 0, 100)
    prep.discard()                                                  # never ingested
    assert list((tmp_path / "db" / "sst-tmp").iterdir()) == []
    store.close()


def test_read_back_catches_a_file_that_says_something_else(tmp_path, monkeypatch):
    """If the SST files say other rows than were given (a writer bug), the ingest fails with
    StorageError naming a row."""
    import shards.storage as storage
    real = storage.write_sst

    def wrong(path, runs):
        real(path, [(k, v ^ np.uint8(1)) if v.shape[1] == 32 else (k, v) for k, v in runs])

    monkeypatch.setattr(storage, "write_sst", wrong)
    rows = np.random.default_rng(2).standard_normal((600, 8)).astype(np.float32)
    store = RocksRowStore(tmp_path / "db")
    with pytest.raises(StorageError, match="reads back different"):
        store.prepare_ingest(3, *chunk(rows, 0, 600), 0, 600).commit(None)
    store.close()


def _ingest_stub(cluster, server_id: str):
    from shoal.proto import shoal_pb2_grpc as pbg
    from shoal.serving import channel
    ch = channel(cluster.server(server_id).address)
    return ch, pbg.ShardServerStub(ch)


def _code_and_message(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_checksums_from_records_agree_with_scans_and_ingest_refusals(tmp_path):
    """After a load every replica answers its checksums from ingest records without reading
    a row, and they equal a full scan; a partition that a routed write touched afterwards is
    scanned. Ingest refuses ready versions, stale epochs and ids outside [lo, hi), each with
    a clear error."""
    from shoal.admin import server_checksums
    from shoal.proto import shoal_pb2 as pb
    from shoal.wire import pack

    g = torch.Generator().manual_seed(3)
    w = {"m.embedding_bags.a.weight": torch.randn(5000, 16, generator=g),
         "m.embedding_bags.b.weight": torch.randn(777, 8, generator=g)}
    path = write_safetensors(str(tmp_path / "m.safetensors"), w)
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        res = client.load(path, model="m", chunk_bytes=64 << 10)       # several chunks
        assert res.skipped_partitions == 0
        m = client.status().map
        addr = {s.server_id: s.address for s in m.servers}
        (md,) = [x for x in m.models if x.name == "m"]
        for t in md.tables:
            parts = list(range(t.num_partitions))
            for s in addr:
                sums, rows, scanned = server_checksums(addr[s], t.table_uid, parts,
                                                       recorded=True, scanned=True)
                full, full_rows = server_checksums(addr[s], t.table_uid, parts)
                assert not scanned.any()
                np.testing.assert_array_equal(sums, full)
                np.testing.assert_array_equal(rows, full_rows)
                assert int(rows.sum()) == t.num_embeddings
        # A routed write into partition 1 of table a: its records no longer account for it.
        a = next(t for t in md.tables if t.name == "a")
        new = torch.randn(1, 16, generator=g)
        client.write_rows("m", "a", [1], new, version=md.version)
        for s in addr:
            sums, rows, scanned = server_checksums(addr[s], a.table_uid, [0, 1], recorded=True,
                                                   scanned=True)
            full, _ = server_checksums(addr[s], a.table_uid, [0, 1])
            assert scanned.tolist() == [False, True]
            np.testing.assert_array_equal(sums, full)
        torch.testing.assert_close(client.lookup_rows("m", "a", [0, 1]),
                                   torch.cat([w["m.embedding_bags.a.weight"][:1], new]),
                                   rtol=0, atol=0)

        ch, stub = _ingest_stub(cluster, "s0")
        ids = np.arange(8, dtype=np.int64)
        routed = pb.PartitionEpochs(partitions=pack(np.arange(a.num_partitions, dtype=np.int32)),
                                    epochs=pack(np.array([rs.epoch for rs in sorted(
                                        (rs for rs in m.partitions if rs.table_uid == a.table_uid),
                                        key=lambda rs: rs.partition)], np.int64)))
        req = pb.IngestRequest(map_version=m.version, table_uid=a.table_uid, ids=pack(ids),
                               rows=pack(np.zeros((8, 16), np.float32)), routed=routed)
        code, msg = _code_and_message(lambda: stub.Ingest(req, timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "not of a loading" in msg
        # A loading version of the same model: stale epochs and a bad range are refused.
        v2 = client.create_version("m")
        m2 = client.status().map
        a2 = next(t for t in v2.tables if t.name == "a")
        sets = sorted((rs for rs in m2.partitions if rs.table_uid == a2.table_uid),
                      key=lambda rs: rs.partition)
        epochs = np.array([rs.epoch for rs in sets], np.int64)
        good = pb.PartitionEpochs(partitions=pack(np.arange(len(sets), dtype=np.int32)),
                                  epochs=pack(epochs))
        stale = pb.PartitionEpochs(partitions=pack(np.arange(len(sets), dtype=np.int32)),
                                   epochs=pack(epochs - 1))
        base = dict(map_version=m2.version, table_uid=a2.table_uid, ids=pack(ids),
                    rows=pack(np.ones((8, 16), np.float32)))
        code, msg = _code_and_message(
            lambda: stub.Ingest(pb.IngestRequest(**base, routed=stale), timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "epoch" in msg
        code, msg = _code_and_message(lambda: stub.Ingest(
            pb.IngestRequest(**base, routed=good, lo=2, hi=6), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "lo, hi" in msg and "[2, 6)" in msg
        assert stub.Ingest(pb.IngestRequest(**base, routed=good, lo=0, hi=8),
                           timeout=10).rows == 8
        sums, rows, scanned = server_checksums(addr["s0"], a2.table_uid,
                                               list(range(len(sets))), recorded=True,
                                               scanned=True)
        want_sums, want_rows = partition_checksums(ids, np.ones((8, 16), np.float32),
                                                   ids & (len(sets) - 1), len(sets))
        np.testing.assert_array_equal(sums, want_sums)
        np.testing.assert_array_equal(rows, want_rows)
        assert not scanned.any()
        ch.close()
        client.close()


def test_parse_with_tensor_leaves_rows_in_place_and_refuses_bad_bytes():
    """The servers' Ingest deserializer: every field as protobuf parses it, the rows a view of
    the received bytes; bytes protobuf refuses are refused; a missing or mis-sized tensor is
    INVALID_ARGUMENT naming the field."""
    from google.protobuf.message import DecodeError

    from shoal.errors import InvalidArgument
    from shoal.proto import shoal_pb2 as pb
    from shoal.wire import pack, parse_with_tensor, serialize_with_tensor, unpack

    parse = parse_with_tensor(pb.IngestRequest, 4)
    rows = np.arange(48, dtype=np.float32).reshape(6, 8)
    head = pb.IngestRequest(map_version=7, table_uid=3, ids=pack(np.arange(6)), lo=1, hi=9,
                            routed=pb.PartitionEpochs(partitions=pack(np.arange(2, dtype=np.int32)),
                                                      epochs=pack(np.array([4, 5]))))
    for raw in (serialize_with_tensor(head, 4, rows),          # rows appended last
                pb.IngestRequest(rows=pack(rows), map_version=7, table_uid=3,
                                 ids=pack(np.arange(6)), lo=1, hi=9,
                                 routed=head.routed).SerializeToString()):
        got = parse(raw)
        assert (got.map_version, got.table_uid, got.lo, got.hi) == (7, 3, 1, 9)
        assert unpack(got.routed.epochs, "e").tolist() == [4, 5]
        view = got.tensor("rows", "float32", 2)
        np.testing.assert_array_equal(view, rows)
        assert not view.flags.owndata and not view.flags.writeable       # no copy
    with pytest.raises(InvalidArgument, match="rows: dtype ''"):
        parse(head.SerializeToString()).tensor("rows", "float32", 2)
    bad = pb.IngestRequest(rows=pb.Tensor(dtype="float32", shape=[6, 8],
                                          data=rows.tobytes()[:-4])).SerializeToString()
    with pytest.raises(InvalidArgument, match="rows: 188 bytes do not match shape"):
        parse(bad).tensor("rows", "float32", 2)
    with pytest.raises(DecodeError):
        parse(serialize_with_tensor(head, 4, rows)[:-5])                 # truncated
    twice = serialize_with_tensor(head, 4, rows) + serialize_with_tensor(pb.IngestRequest(), 4,
                                                                          rows)
    with pytest.raises(InvalidArgument, match="rows: given twice"):
        parse(twice).tensor("rows", "float32", 2)


def test_parse_with_tensor_takes_groups_as_protobuf_does():
    """A message with a (deprecated, still valid) group field: the in-place walk does not
    follow groups, so the parse falls back to protobuf's, with the same fields (atheris found
    this: it used to raise ValueError, which gRPC answers INTERNAL)."""
    from shoal.proto import shoal_pb2 as pb
    from shoal.wire import pack, parse_with_tensor

    parse = parse_with_tensor(pb.IngestRequest, 4)
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    group = bytes([(15 << 3) | 3, (15 << 3) | 4])        # an empty group, field 15
    got = parse(pb.IngestRequest(map_version=5, rows=pack(rows)).SerializeToString() + group)
    assert got.map_version == 5 and got.given
    np.testing.assert_array_equal(got.tensor("rows", "float32", 2), rows)
    bare = parse(pb.IngestRequest(map_version=6).SerializeToString() + group)
    assert bare.map_version == 6 and not bare.given
