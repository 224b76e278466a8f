"""Loading sharded checkpoints into a real cluster as verified model versions: a TorchRec DLRM
sharded by DistributedModelParallel over 2 gloo processes (table-, column- and row-wise) and
saved with DCP, loaded into 3 servers; every row equals the model's, pooled lookups equal a
torchrec EmbeddingBagCollection with those weights; a second load is a new version that is
invisible until verified, then current."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import shoal
from tests.ckpt_fixtures import (DMP_DIM, DMP_TABLES, EBC_PREFIX, write_dmp_checkpoints,
                                 write_safetensors)


@pytest.fixture(scope="module")
def dmp(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dmp"))
    paths = write_dmp_checkpoints(out)
    return paths, torch.load(paths["ref.pt"], weights_only=True)


def oracle_ebc(ref):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=n, embedding_dim=DMP_DIM, num_embeddings=r, feature_names=[n])
        for n, r in DMP_TABLES.items()], device=torch.device("cpu"))
    with torch.no_grad():
        for n in DMP_TABLES:
            ebc.embedding_bags[n].weight.copy_(ref[f"{EBC_PREFIX}{n}.weight"])
    return ebc


def test_load_dcp_checkpoint_as_versions(dmp, tmp_path):
    from embeddings.synthetic import random_kjt

    paths, ref = dmp
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        seen = []
        res = client.load(paths["dmp"], model="dlrm", chunk_bytes=32 << 10,
                          progress=lambda p: seen.append((p.rows_done, p.bytes_done)))
        assert res.version == 1 and res.tables == DMP_TABLES
        assert any(k.startswith("over_arch.") for k in res.dense)
        dense = client.dense("dlrm")
        assert set(dense) == set(res.dense)
        for k, v in dense.items():                    # stored with the version, exactly
            torch.testing.assert_close(v, ref[k].to(v.dtype), rtol=0, atol=0)
        assert len(seen) > 8 and seen[-1][0] == sum(DMP_TABLES.values())
        (md,) = client.models()
        assert md.state == "ready" and md.current
        for name, rows in DMP_TABLES.items():
            got = client.lookup_rows("dlrm", name, torch.arange(rows))
            torch.testing.assert_close(got, ref[f"{EBC_PREFIX}{name}.weight"], rtol=0, atol=0)
        ebc = oracle_ebc(ref)
        rng = np.random.default_rng(3)
        kjt = random_kjt(rng, list(DMP_TABLES), list(DMP_TABLES.values()), 32, 8)
        with torch.no_grad():
            want = ebc(kjt)
        got = client.lookup("dlrm", kjt)
        torch.testing.assert_close(got.values(), want.values(), rtol=1e-5, atol=1e-5)

        # Version 2 from the same model saved in DCP's safetensors format, with t_cat_1
        # changed: while it loads, queries get version 1 and version 2 is refused.
        v1_rows = client.lookup_rows("dlrm", "t_cat_0", torch.arange(5))
        during = []

        def check_during(p):
            if not during:
                during.append(client.lookup_rows("dlrm", "t_cat_0", torch.arange(5)))
                with pytest.raises(shoal.ShoalError) as e:
                    client.lookup_rows("dlrm", "t_cat_0", torch.arange(5), version=2)
                assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION

        res2 = client.load(paths["dmp_safetensors"], model="dlrm", chunk_bytes=32 << 10,
                           progress=check_during)
        assert res2.version == 2 and during
        torch.testing.assert_close(during[0], v1_rows, rtol=0, atol=0)
        assert [(m.version, m.state, m.current) for m in client.models()] == \
            [(1, "ready", False), (2, "ready", True)]
        assert client.models()[1].dense_tensors == len(res2.dense) > 0
        client.update_version("dlrm", 1, drop=True)          # its dense parameters go too
        with pytest.raises(shoal.ShoalError) as e:
            client.dense("dlrm", 1)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        got = client.lookup("dlrm", kjt)                      # the same weights: same answers
        torch.testing.assert_close(got.values(), want.values(), rtol=1e-5, atol=1e-5)
        client.close()


def test_load_safetensors_and_clear_errors(tmp_path):
    w = {"m.embedding_bags.a.weight": torch.randn(700, 8),
         "m.embedding_bags.b.weight": torch.randn(300, 4).to(torch.float16),
         "dense.weight": torch.randn(3, 3)}
    path = write_safetensors(str(tmp_path / "model.safetensors"), w)
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        res = client.load(path, model="st")
        assert res.tables == {"a": 700, "b": 300} and res.dense == ["dense.weight"]
        torch.testing.assert_close(client.dense("st")["dense.weight"], w["dense.weight"])
        torch.testing.assert_close(client.lookup_rows("st", "a", torch.arange(700)),
                                   w["m.embedding_bags.a.weight"], rtol=0, atol=0)
        got_b = client.lookup_rows("st", "b", torch.arange(300))
        assert got_b.dtype == torch.float16
        torch.testing.assert_close(got_b, w["m.embedding_bags.b.weight"], rtol=0, atol=0)
        # A dim that conflicts with the model: refused before anything is written.
        bad = write_safetensors(str(tmp_path / "bad.safetensors"),
                                {"m.embedding_bags.a.weight": torch.randn(700, 6)})
        with pytest.raises(shoal.ShoalError) as e:
            client.load(bad, model="st")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "bad.safetensors" in e.value.message and "m.embedding_bags.a.weight" in \
            e.value.message and "dim 6" in e.value.message and "dim 8" in e.value.message
        assert [m.version for m in client.models()] == [1]
        client.close()


def test_per_rank_torch_save_and_a_failed_load_then_resume(dmp, tmp_path):
    """Per-rank torch.save files (row shards with offsets, column shards) load into a model.
    A DCP checkpoint whose last table's chunk is corrupt fails mid-load, naming the file and
    the tensor: its version stays loading, invisible (queries keep the current version), and a
    resume from a good copy finishes it, rewriting only the table that was not complete."""
    import shutil

    from embeddings.checkpoint import open_checkpoint

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(1200, 8, generator=g), torch.randn(90, 6, generator=g)
    torch.save({"e.embedding_bags.a.weight": {"tensor": a[:500].clone(), "offsets": [0, 0],
                                             "global_shape": [1200, 8]},
                "e.embedding_bags.b.weight": {"tensor": b[:, :4].clone(), "offsets": [0, 0]}},
               tmp_path / "rank_0.pt")
    torch.save({"e.embedding_bags.a.weight": {"tensor": a[500:].clone(), "offsets": [500, 0],
                                             "global_shape": [1200, 8]},
                "e.embedding_bags.b.weight": {"tensor": b[:, 4:].clone(), "offsets": [0, 4]}},
               tmp_path / "rank_1.pt")
    for f in ("rank_0.pt", "rank_1.pt"):
        (tmp_path / "ranks").mkdir(exist_ok=True)
        shutil.move(str(tmp_path / f), str(tmp_path / "ranks" / f))
    paths, ref = dmp
    bad = tmp_path / "bad"
    shutil.copytree(paths["dmp"], bad)
    with open_checkpoint(str(bad)) as r:                # the chunk file of the last table
        key = f"{EBC_PREFIX}t_cat_3.weight"
        victim = sorted(r.tensors()[key].files)[-1]
    raw = bytearray(open(victim, "rb").read())
    cd = raw.rfind(b"PK\x01\x02")                     # a zip directory entry of its last chunk
    assert cd > 0
    raw[cd:cd + 4] = b"XXXX"                            # same size, a broken archive
    open(victim, "wb").write(bytes(raw))
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        res = client.load(str(tmp_path / "ranks"), model="ts")
        torch.testing.assert_close(client.lookup_rows("ts", "a", torch.arange(1200)), a,
                                   rtol=0, atol=0)
        torch.testing.assert_close(client.lookup_rows("ts", "b", torch.arange(90)), b,
                                   rtol=0, atol=0)
        assert res.version == 1
        with pytest.raises(shoal.ShoalError) as e:
            client.load(str(bad), model="dl", chunk_bytes=16 << 10)
        msg = e.value.message
        assert victim.rsplit("/", 1)[-1] in msg or str(bad) in msg, msg
        (md,) = [m for m in client.models() if m.name == "dl"]
        assert md.state == "loading" and not md.current
        with pytest.raises(shoal.ShoalError) as e:          # nothing of it is visible
            client.lookup_rows("dl", "t_cat_0", torch.arange(3))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        res = client.load(paths["dmp"], model="dl", resume=True)
        assert res.version == 1
        (md,) = [m for m in client.models() if m.name == "dl"]
        assert md.state == "ready" and md.current
        # The resume kept the tables streamed before the corrupt one and rewrote only it.
        done = [t for t in md.tables if t.name != "t_cat_3"]
        assert res.skipped_partitions == sum(t.num_partitions for t in done)
        (last,) = [t for t in md.tables if t.name == "t_cat_3"]
        assert res.bytes == last.num_embeddings * last.dim * 4
        for name, rows in DMP_TABLES.items():
            torch.testing.assert_close(client.lookup_rows("dl", name, torch.arange(rows)),
                                       ref[f"{EBC_PREFIX}{name}.weight"], rtol=0, atol=0)
        client.close()


def v1_reader(cluster, ref, stop, failures: list, answered: list):
    """A loop for a thread: query version 1 (the current one) until ``stop``, counting the
    answers equal to the model's rows and keeping every error or wrong answer."""
    want = ref[f"{EBC_PREFIX}t_cat_1.weight"]

    def reader():
        c = cluster.client(timeout=30)
        while not stop.is_set():
            try:
                got = c.lookup_rows("dlrm", "t_cat_1", torch.arange(1500), version=1)
                torch.testing.assert_close(got, want, rtol=0, atol=0)
                answered[0] += 1
            except Exception as e:          # any error or wrong answer
                failures.append(repr(e))
        c.close()
    return reader


@pytest.mark.timeout(300)
def test_losing_a_server_during_a_load(dmp, tmp_path):
    """SIGKILL a shard server while version 2 loads: the load finishes on the other replicas
    (writes fail over) and is verified; queries of the current version 1 never fail; after the
    server restarts and the replication factor is back, every replica's checksums agree."""
    import os
    import signal
    import threading
    import time

    from shoal.admin import server_checksums
    from tests.test_failover import fast_failover_config

    paths, ref = dmp
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path / "c"),
                            config=fast_failover_config()) as cluster:
        client = cluster.client(timeout=60)
        client.load(paths["dmp"], model="dlrm")
        failures, answered, stop = [], [0], threading.Event()
        reader = v1_reader(cluster, ref, stop, failures, answered)

        killed = []

        def kill_once(p):
            if not killed and p.rows_done > p.rows_total // 4:
                victim = cluster.server("s1")
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(time.monotonic())

        t = threading.Thread(target=reader)
        t.start()
        try:
            res = client.load(paths["dmp_safetensors"], model="dlrm", chunk_bytes=8 << 10,
                              progress=kill_once)
        finally:
            stop.set()
            t.join(60)
        assert killed and res.version == 2
        assert failures == [] and answered[0] > 5
        assert [(m.version, m.current) for m in client.models()] == [(1, False), (2, True)]
        for name, rows in DMP_TABLES.items():
            torch.testing.assert_close(client.lookup_rows("dlrm", name, torch.arange(rows)),
                                       ref[f"{EBC_PREFIX}{name}.weight"], rtol=0, atol=0)
        cluster.restart("s1")
        deadline = time.monotonic() + 120
        while True:
            m = client.status().map
            if all(len(rs.replicas) == 2 and not rs.learners for rs in m.partitions):
                break
            assert time.monotonic() < deadline, "replication factor not restored"
            time.sleep(0.5)
        addr = {s.server_id: s.address for s in m.servers}
        for rs in m.partitions:
            sums = [server_checksums(addr[s], rs.table_uid, [rs.partition]) for s in rs.replicas]
            assert all(int(x[1][0]) > 0 for x in sums)
            assert len({(int(x[0][0]), int(x[1][0])) for x in sums}) == 1, rs
        client.close()


@pytest.mark.timeout(300)
def test_a_load_interrupted_by_a_lost_server_is_cleaned_up(dmp, tmp_path):
    """SIGKILL a shard server while version 2 loads, then the load itself stops (the loader
    gives up): version 2 stays loading and unreadable while version 1 answers throughout.
    Dropping it and restarting the server leaves no row of it anywhere: the restarted server,
    which held copies of it when it died, deletes them."""
    import os
    import signal
    import threading
    import time

    from shoal.admin import server_checksums, server_stats
    from tests.test_failover import fast_failover_config

    paths, ref = dmp
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path / "c"),
                            config=fast_failover_config()) as cluster:
        client = cluster.client(timeout=60)
        client.load(paths["dmp"], model="dlrm")
        m = client.status().map
        stored_v1 = {s.server_id: server_stats(s.address).stored_partitions for s in m.servers}
        failures, answered, stop = [], [0], threading.Event()
        reader = v1_reader(cluster, ref, stop, failures, answered)

        class GaveUp(Exception):
            pass

        killed = []

        def kill_then_give_up(p):
            if not killed and p.rows_done > p.rows_total // 4:
                os.kill(cluster.server("s1").pid, signal.SIGKILL)
                killed.append(time.monotonic())
            if killed and p.rows_done > p.rows_total // 2:
                raise GaveUp()

        t = threading.Thread(target=reader)
        t.start()
        try:
            with pytest.raises(GaveUp):
                client.load(paths["dmp_safetensors"], model="dlrm", chunk_bytes=8 << 10,
                            progress=kill_then_give_up)
            versions = {m.version: m for m in client.models() if m.name == "dlrm"}
            assert versions[2].state == "loading" and versions[1].current
            with pytest.raises(shoal.ShoalError) as e:
                client.lookup_rows("dlrm", "t_cat_1", torch.arange(3), version=2)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            v2_uids = [t.table_uid for t in versions[2].tables]
            client.update_version("dlrm", 2, drop=True)
            cluster.restart("s1")
            deadline = time.monotonic() + 120
            while True:
                m = client.status().map
                if len(m.servers) == 3 and all(len(rs.replicas) == 2 and not rs.learners
                                               for rs in m.partitions):
                    break
                assert time.monotonic() < deadline, "replication factor not restored"
                time.sleep(0.5)
            time.sleep(1.0)                      # more queries after the restart
        finally:
            stop.set()
            t.join(60)
        assert failures == [] and answered[0] > 5
        assert [(m.version, m.state) for m in client.models()] == [(1, "ready")]
        addr = {s.server_id: s.address for s in m.servers}
        deadline = time.monotonic() + 30
        while True:                              # the restarted server deletes its copies
            left = {s: sum(int(server_checksums(a, uid, list(range(64)))[1].sum())
                           for uid in v2_uids) for s, a in addr.items()}
            stored = {s: server_stats(a).stored_partitions for s, a in addr.items()}
            if not any(left.values()) and sum(stored.values()) == sum(stored_v1.values()):
                break
            assert time.monotonic() < deadline, (left, stored, stored_v1)
            time.sleep(0.5)
        for name, rows in DMP_TABLES.items():
            torch.testing.assert_close(client.lookup_rows("dlrm", name, torch.arange(rows)),
                                       ref[f"{EBC_PREFIX}{name}.weight"], rtol=0, atol=0)
        client.close()


LOADER_SCRIPT = r"""
import sys, resource
import shoal
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
client = shoal.connect(sys.argv[1])
client.models()                                   # warm up: imports, channels
before = hwm()
res = client.load(sys.argv[2], model="big", chunk_bytes=int(sys.argv[3]))
print(res.bytes, before, hwm())
"""


@pytest.mark.timeout(300)
def test_loader_memory_is_bounded_by_the_chunk_size(tmp_path):
    """A 512 MiB table loaded in 4 MiB chunks, in a fresh process: its peak RSS grows by a
    bounded number of chunks (the rows read, their serialised copies in flight to each
    replica; 7-12 measured) plus a fixed overhead, not by the table: a loader that kept a
    sixth of the table in memory would pass the bound."""
    import os
    import subprocess
    import sys

    mib, chunk = 512, 4 << 20
    table = torch.randn(mib * 2**20 // (64 * 4), 64)
    path = write_safetensors(str(tmp_path / "big.safetensors"),
                             {"x.embedding_bags.big.weight": table})
    del table
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        out = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, cluster.router_address,
                              path, str(chunk)], capture_output=True, text=True, timeout=240,
                             env={**os.environ, "MALLOC_ARENA_MAX": "2"})
        assert out.returncode == 0, out.stderr[-2000:]
        nbytes, before, after = map(int, out.stdout.split()[-3:])
        assert nbytes == mib * 2**20
        growth = after - before
        print(f"loader peak RSS grew {growth / 2**20:.1f} MiB loading {mib} MiB in 4 MiB chunks")
        # glibc's arenas (one per thread that allocates) add memory that varies run to run and
        # says nothing of the loader (46-91 MiB measured with the default, 54-58 with two
        # arenas, under load too): with two, 14 chunks plus a fixed 32 MiB bounds it, a sixth
        # of the table.
        assert growth < 14 * chunk + (32 << 20), growth / 2**20


@pytest.mark.timeout(300)
def test_a_killed_loader_leaves_nothing_visible_and_resumes(tmp_path):
    """SIGKILL the loading process half way: its version stays loading (queries refused, the
    map unchanged otherwise); `resume` finishes it, verified; or the version can be dropped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    table = torch.randn(64 * 2**20 // (64 * 4), 64)           # 64 MiB
    path = write_safetensors(str(tmp_path / "t.safetensors"), {"x.embedding_bags.t.weight": table})
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        proc = subprocess.Popen([sys.executable, "-c", LOADER_SCRIPT, cluster.router_address,
                                 path, str(1 << 20)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not any(m.name == "big" for m in client.models()):
            assert time.monotonic() < deadline and proc.poll() is None, "the load never began"
            time.sleep(0.05)
        time.sleep(0.3)                                      # under way, far from done
        assert proc.poll() is None, "the load finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        (md,) = [m for m in client.models() if m.name == "big"]
        assert md.state == "loading" and not md.current
        with pytest.raises(shoal.ShoalError) as e:
            client.lookup_rows("big", "t", torch.arange(3))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        res = client.load(path, model="big", resume=True)
        assert res.version == md.version
        (md,) = [m for m in client.models() if m.name == "big"]
        assert md.state == "ready" and md.current
        torch.testing.assert_close(client.lookup_rows("big", "t", torch.arange(len(table))),
                                   table, rtol=0, atol=0)
        client.close()
