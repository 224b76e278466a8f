"""A load's spooled SST files (shards.spool): written once by the loader, checked and linked in
by every replica on the host; refused, naming the file, when they are not exactly the rows'
file; and the loader sends rows instead when a replica refuses them."""
from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
import torch

import shoal
from embeddings.checksum import partition_checksums
from shards.sst import read_sst_values, write_sst
from shards.storage import key_array
from tests.ckpt_fixtures import write_safetensors
from tests.test_ingest import _code_and_message as _call
from tests.test_ingest import _ingest_stub as _stub

KEY = "m.embedding_bags.a.weight"


@pytest.mark.parametrize("n, vlen", [(1, 32), (16, 32), (1000, 256), (40, 20000)])
def test_read_sst_values_takes_exactly_the_file_write_sst_wrote(tmp_path, n, vlen):
    rng = np.random.default_rng(n)
    ids = np.arange(5, 5 + 4 * n, 4)
    keys = key_array(9, 1, ids)
    values = rng.integers(0, 256, (n, vlen), dtype=np.uint8)
    path = str(tmp_path / "f.sst")
    write_sst(path, [(keys, values)])
    buf = np.fromfile(path, np.uint8)
    out = np.zeros((n, vlen), np.uint8)
    read_sst_values(buf, keys, out)
    np.testing.assert_array_equal(out, values)
    # Every single flipped bit is caught: a key, a value (its block's checksum), a restart
    # offset, the index, the properties, the footer.
    for pos in np.unique(np.linspace(0, len(buf) - 1, 97).astype(int)).tolist():
        bad = buf.copy()
        bad[pos] ^= 0x10
        with pytest.raises(ValueError):
            read_sst_values(bad, keys, out)
    with pytest.raises(ValueError, match="bytes"):
        read_sst_values(buf[:-1], keys, out)
    with pytest.raises(ValueError, match="bytes"):
        read_sst_values(np.concatenate([buf, [0]]).astype(np.uint8), keys, out)
    with pytest.raises(ValueError):                           # another partition's keys
        read_sst_values(buf, key_array(9, 2, ids), out)
    with pytest.raises(ValueError):                           # other ids
        read_sst_values(buf, key_array(9, 1, ids + 1), out)


def test_spooled_load_equals_rows_load_and_bad_files_are_refused(tmp_path):
    from shoal.admin import server_checksums
    from shoal.proto import shoal_pb2 as pb
    from shoal.wire import pack

    g = torch.Generator().manual_seed(5)
    w = torch.randn(3000, 16, generator=g)
    path = write_safetensors(str(tmp_path / "m.safetensors"), {KEY: w})
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        res = client.load(path, model="files", chunk_bytes=32 << 10)     # 6 chunks
        rows = client.load(path, model="rows", chunk_bytes=32 << 10, transfer="rows")
        m = client.status().map
        tables = {md.name: md.tables[0] for md in m.models}
        P = tables["files"].num_partitions
        # Every chunk's every partition went as one file, linked in by both replicas.
        assert res.spooled_files == 2 * 6 * P and rows.spooled_files == 0
        for model in ("files", "rows"):
            torch.testing.assert_close(client.lookup_rows(model, "a", torch.arange(3000)), w,
                                       rtol=0, atol=0)
            t = tables[model]
            for s in ("s0", "s1"):
                addr = cluster.server(s).address
                sums, n, scanned = server_checksums(addr, t.table_uid, list(range(P)),
                                                    recorded=True, scanned=True)
                full, full_n = server_checksums(addr, t.table_uid, list(range(P)))
                assert not scanned.any() and int(n.sum()) == 3000
                np.testing.assert_array_equal(sums, full)
                np.testing.assert_array_equal(n, full_n)
        spool = os.path.join(str(tmp_path / "c"), "spool")
        assert os.listdir(spool) == []                    # the load's files are gone

        # Ingest's files form, by hand, into a loading version on s0.
        v2 = client.create_version("files")
        m2 = client.status().map
        t2 = v2.tables[0]
        sets = sorted((rs for rs in m2.partitions if rs.table_uid == t2.table_uid),
                      key=lambda rs: rs.partition)
        routed = pb.PartitionEpochs(partitions=pack(np.array([1], np.int32)),
                                    epochs=pack(np.array([sets[1].epoch], np.int64)))
        ids = np.arange(1, 64, P)                         # partition 1's ids in [0, 64)
        vals = np.arange(len(ids) * 16, dtype=np.float32).reshape(len(ids), 16)
        raw = vals.view(np.uint8)

        def ingest(file_path):
            return stub.Ingest(pb.IngestRequest(
                map_version=m2.version, table_uid=t2.table_uid, routed=routed, lo=0, hi=64,
                files=[pb.IngestFile(partition=1, path=file_path)]), timeout=10)

        ch, stub = _stub(cluster, "s0")
        outside = str(tmp_path / "outside.sst")
        write_sst(outside, [(key_array(t2.table_uid, 1, ids), raw)])
        code, msg = _call(lambda: ingest(outside))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "files[0]" in msg and "spool directory" in msg and "outside.sst" in msg
        code, msg = _call(lambda: ingest(os.path.join(spool, "missing.sst")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "cannot open" in msg
        wrong = os.path.join(spool, "wrong.sst")          # partition 2's keys, not 1's
        write_sst(wrong, [(key_array(t2.table_uid, 2, ids + 1), raw)])
        code, msg = _call(lambda: ingest(wrong))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not the SST file" in msg
        flipped = os.path.join(spool, "flipped.sst")
        write_sst(flipped, [(key_array(t2.table_uid, 1, ids), raw)])
        data = bytearray(open(flipped, "rb").read())
        data[40] ^= 1                                     # a value byte: its block's checksum
        open(flipped, "wb").write(bytes(data))
        code, msg = _call(lambda: ingest(flipped))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "checksum" in msg
        addr = cluster.server("s0").address
        _, n = server_checksums(addr, t2.table_uid, [1])
        assert n.tolist() == [0]                          # nothing was stored
        good = os.path.join(spool, "good.sst")
        write_sst(good, [(key_array(t2.table_uid, 1, ids), raw)])
        assert ingest(good).rows == len(ids)
        sums, n, scanned = server_checksums(addr, t2.table_uid, [1], recorded=True,
                                            scanned=True)
        want, want_n = partition_checksums(ids, vals, np.ones(len(ids), np.int64), P)
        assert n.tolist() == [len(ids)] and not scanned.any()
        assert sums.tolist() == [want[1]]
        full, _ = server_checksums(addr, t2.table_uid, [1])
        assert full.tolist() == [want[1]]
        ch.close()
        client.close()


def test_replicas_that_refuse_the_files_get_rows(tmp_path, monkeypatch, caplog):
    """Files the servers refuse (here: every spooled file has a flipped value byte): each
    chunk so refused goes through the write path instead, and the rest of the load as rows
    (the chunks 2000 x 32 B / 16 KiB = 4);
    the version holds exactly the checkpoint's rows."""
    import shards.spool as spool

    real = spool.write_chunk_files

    def corrupt(*args, **kw):
        paths = real(*args, **kw)
        for p in (paths or {}).values():
            data = bytearray(open(p, "rb").read())
            data[40] ^= 1
            open(p, "wb").write(bytes(data))
        return paths

    monkeypatch.setattr(spool, "write_chunk_files", corrupt)
    w = torch.randn(2000, 8, generator=torch.Generator().manual_seed(6))
    path = write_safetensors(str(tmp_path / "m.safetensors"), {KEY: w})
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        with caplog.at_level("WARNING", logger="shoal.loader"):
            res = client.load(path, model="m", chunk_bytes=16 << 10)
        assert res.spooled_files == 0
        refused = [r.getMessage() for r in caplog.records if "does not take spooled" in
                   r.getMessage()]
        from shoal.loader import Sink
        by = [r.split()[0] for r in refused]
        assert set(by) == {"s0", "s1"}        # then rows: only the chunks then in flight
        assert all(1 <= by.count(s) <= Sink.IN_FLIGHT + 1 for s in ("s0", "s1"))
        assert all("checksum" in r for r in refused)
        torch.testing.assert_close(client.lookup_rows("m", "a", torch.arange(2000)), w,
                                   rtol=0, atol=0)
        client.close()
