"""Tables larger than memory (issue 22): the servers' memory budget is an eighth of the rows
they hold, so most rows live only in RocksDB and the hottest in each server's row cache. Every
answer is checked against an independent oracle (a local torchrec EmbeddingBagCollection, or
the rows written), and the servers' own counters show the cache and RocksDB both served."""
from __future__ import annotations

import pathlib
import threading
import time

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import shoal
from shards import tiers
from tests.oracle import fill_from_oracle
from tests.test_lookup_oracle import FP16_TOL, assert_matches, bag_config, kjt, \
    model_feature_order, oracle

from torchrec.modules.embedding_configs import DataType, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

BUDGET = 8 << 20          # per server: RocksDB's share (~4 MiB) and ~4 MiB for rows
CONFIGS = [bag_config("big", 100_000, 64, features=["f_big", "f_big2"]),
           bag_config("mid", 30_000, 32, pooling=PoolingType.MEAN),
           bag_config("small16", 40_000, 32, dtype=DataType.FP16)]
HELD = sum(c.num_embeddings * c.embedding_dim * (2 if c.data_type == DataType.FP16 else 4)
           for c in CONFIGS)


def zipf_ids(rng, n: int, size: int, a: float = 1.1) -> np.ndarray:
    """Zipf-distributed ids in [0, n), the hottest scattered over the table (a fixed
    permutation), so hot rows fall in every partition."""
    ranks = np.minimum(rng.zipf(a, size) - 1, n - 1)
    return np.random.default_rng(n).permutation(n)[ranks]


def zipf_kjt(rng, batch: int, bag: int):
    keys = [f for c in CONFIGS for f in c.feature_names]
    rows = [c.num_embeddings for c in CONFIGS for _ in c.feature_names]
    lengths = [rng.integers(0, bag + 1, batch) for _ in keys]
    values = [zipf_ids(rng, n, int(ls.sum())) for n, ls in zip(rows, lengths)]
    return kjt(keys, np.concatenate(lengths), np.concatenate(values))


def table_stats(client, name: str):
    """Per server, the heartbeat-reported counters of table ``name``'s current version."""
    m = client.status().map
    uids = {t.table_uid for md in m.models for t in md.tables if t.name == name}
    return {s.server_id: [tl for tl in s.stats.table_loads if tl.table_uid in uids]
            for s in m.servers}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = shoal.ShoalConfig().replace(server__memory_budget_bytes=BUDGET,
                                      server__heartbeat_interval_s=0.25, router__hedge=False)
    with shoal.LocalCluster(servers=2, replication=2, config=cfg,
                            data_dir=str(tmp_path_factory.mktemp("tiered"))) as c:
        yield c


@pytest.fixture(scope="module")
def model(cluster):
    client = cluster.client()
    torch.manual_seed(7)
    ebc = EmbeddingBagCollection(tables=CONFIGS, device=torch.device("cpu"))
    client.create_model("tiered", tables=CONFIGS)
    fill_from_oracle(client, "tiered", ebc)
    yield client, ebc
    client.close()


def test_memory_plan_gives_rows_what_rocksdb_leaves():
    mem = tiers.store_memory(BUDGET, 64 << 20)
    assert mem.block_cache == BUDGET // 8 and mem.memtable == 1 << 20
    assert tiers.rows_budget(BUDGET, mem) == BUDGET - BUDGET // 8 - 3 * (1 << 20)
    with_log = tiers.store_memory(BUDGET, 64 << 20, log=64 << 20)    # the log: 1/8 at most
    assert with_log.log == BUDGET // 8 and with_log.total == mem.total + BUDGET // 8
    needs = {1: tiers.TableNeed(3000, 100), 2: tiers.TableNeed(1000, 50),
             3: tiers.TableNeed(2000, 10, expert=True, partitions=[(5, 900), (2, 600), (7, 600)])}
    assert all(p.resident_all for p in tiers.plan(6000, needs).values())
    plan = tiers.plan(3000, needs)       # half of what is held: shares by bytes held
    assert [plan[u].share for u in (1, 2, 3)] == [1500, 500, 1000]
    assert plan[1].cache_rows == 1500 // (100 + tiers.SLOT_OVERHEAD)
    assert plan[2].cache_rows == 500 // (50 + tiers.SLOT_OVERHEAD)
    assert plan[3].resident == [5] and plan[3].cache_rows == 0   # the most used first, whole


def test_pooled_lookups_equal_torchrec_with_an_eighth_in_memory(model):
    client, ebc = model
    assert HELD >= 7 * (BUDGET - tiers.store_memory(BUDGET, 64 << 20).total)
    rng = np.random.default_rng(3)
    keys = model_feature_order(ebc)
    for i in range(60):
        features = zipf_kjt(rng, 64, 12 if i % 2 else 30)
        assert_matches(client.lookup("tiered", features), oracle(ebc, features), keys, FP16_TOL)
    time.sleep(0.8)                                      # two heartbeats: the counters arrive
    stats = table_stats(client, "big")
    for server, loads in stats.items():
        (tl,) = loads
        assert tl.cache_rows > 1000, (server, tl)        # a row cache, not whole partitions
        assert tl.cache_bytes <= BUDGET, (server, tl)
        assert tl.held_bytes == 100_000 * 64 * 4
        assert tl.misses > 0 and tl.miss_reads > 0, (server, tl)
        # The row cache, not RocksDB, served most reads of the hot rows once warm.
        assert tl.ids - tl.misses > 0.3 * tl.ids, (server, tl)
    m = client.status().map
    for s in m.servers:
        assert s.stats.store_memory_bytes + s.stats.resident_bytes <= BUDGET, s.stats
        assert s.stats.disk_bytes > 0 and s.stats.disk_capacity_bytes >= s.stats.disk_bytes


def test_rows_served_from_rocksdb_equal_what_was_written(model):
    """Unpooled lookups of rows that were never read before (cold, every one from RocksDB),
    then the same again (some now cached), each equal to the oracle's weights, repeated and
    shuffled ids included."""
    client, ebc = model
    rng = np.random.default_rng(11)
    for name in ("big", "small16", "mid"):
        w = ebc.embedding_bags[name].weight.detach()
        n = w.shape[0]
        ids = rng.permutation(n)[:3000]
        ids = np.concatenate([ids, ids[:500]])            # repeats within one request
        for _ in range(2):
            got = client.lookup_rows("tiered", name, torch.from_numpy(ids))
            assert_close(got, w[torch.from_numpy(ids)], rtol=0, atol=0)


def test_metrics_show_each_tables_cache_and_disk(model):
    """Every server's /metrics carries its tables' reads, misses, cache and disk bytes, equal
    to its own Stats at that moment (no traffic in between)."""
    from shoal.proto import shoal_pb2 as pb
    from shoal.proto import shoal_pb2_grpc as pbg
    from shoal.serving import channel
    from tests.test_metrics import scrape, value
    client, _ = model
    m = client.status().map
    uid = next(t.table_uid for md in m.models if md.name == "tiered" for t in md.tables
               if t.name == "big")
    for s in m.servers:
        ch = channel(s.address)
        try:
            stats = pbg.ShardServerStub(ch).Stats(pb.StatsRequest(), timeout=10)
        finally:
            ch.close()
        samples = scrape(s.metrics_address)
        (tl,) = [t for t in stats.table_loads if t.table_uid == uid]
        assert tl.ids > tl.misses > 0
        for name in ("ids", "misses", "miss_reads"):
            assert value(samples, f"shoal_table_{name}_total", table_uid=str(uid)) == \
                getattr(tl, name), name
        for name in ("cache_bytes", "cache_rows", "held_bytes"):
            assert value(samples, f"shoal_table_{name}", table_uid=str(uid)) == \
                getattr(tl, name), name
        assert value(samples, "shoal_server_memory_budget_bytes") == BUDGET
        assert value(samples, "shoal_server_disk_bytes") > 0
        assert value(samples, "shoal_server_row_cache_bytes") == stats.cache_bytes > 0


def test_cost_shows_memory_against_disk_and_the_reads_from_disk(model, cluster):
    """``shoal cost`` for a model that does not fit memory: far less in memory than stored,
    and a share of its ids read from RocksDB (its I/O path) while it is queried."""
    from shoal.cost import measure
    client, _ = model
    stop = threading.Event()

    def load():
        c, rng = shoal.connect(cluster.router_address), np.random.default_rng(9)
        while not stop.is_set():
            c.lookup("tiered", zipf_kjt(rng, 32, 10))
        c.close()
    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(0.5)
        costs, uses = measure(client, 2.0)
    finally:
        stop.set()
        t.join(30)
    (c,) = [c for c in costs if c.model == "tiered"]
    assert c.memory_bytes == 2 * HELD                  # every row on both servers' disks
    assert 0 < c.in_memory_bytes < c.memory_bytes / 4
    assert c.miss_share is not None and 0 < c.miss_share < 1
    assert all(0 < u.disk_share < 1 for u in uses)


def test_updates_racing_cold_reads_never_go_back(cluster):
    """A writer writes version k into every row of a set of ids (hot and cold), round after
    round; readers read them all the while. A read begun after a write was acknowledged must
    return at least that version for every id, whether the row came from the cache or from
    RocksDB; afterwards every row holds the last version, however often it is read."""
    client = cluster.client()
    dim, n = 16, 300_000          # 19 MB: more than the rows budget on its own
    client.create_model("race", [shoal.TableSpec("r", n, dim, feature_names=("fr",))])
    client.write_rows("race", "r", torch.arange(n), torch.zeros(n, dim))
    rng = np.random.default_rng(2)
    ids = np.unique(np.concatenate([zipf_ids(rng, n, 4000), rng.integers(0, n, 1500)]))
    acked = [0]
    stop = threading.Event()
    errors: list[str] = []
    reads = [0]

    def reader(seed):
        r = np.random.default_rng(seed)
        c = shoal.connect(cluster.router_address)
        try:
            while not stop.is_set():
                before = acked[0]
                sample = np.concatenate([zipf_ids(r, n, 300), r.choice(ids, 300)])
                got = c.lookup_rows("race", "r", torch.from_numpy(sample)).numpy()
                v = got[:, 0]
                if not (got == v[:, None]).all():
                    errors.append("a row mixes versions")
                written = np.isin(sample, ids)
                if (v[written] < before).any():
                    errors.append(f"read a version {v[written].min()} older than the "
                                  f"acknowledged {before}")
                if (v[~written] != 0).any():
                    errors.append("a row never written changed")
                reads[0] += 1
        except Exception as e:        # noqa: BLE001 - reported below
            errors.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    rounds = 25
    for k in range(1, rounds + 1):
        client.write_rows("race", "r", torch.from_numpy(ids),
                          torch.full((len(ids), dim), float(k)))
        acked[0] = k
        time.sleep(0.05)
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:5]
    assert reads[0] >= 3 * 5
    for _ in range(3):
        got = client.lookup_rows("race", "r", torch.from_numpy(ids)).numpy()
        assert (got == rounds).all()
    time.sleep(0.6)
    for server, (tl,) in table_stats(client, "r").items():
        assert tl.cache_rows > 0 and tl.ids > tl.misses > 0, (server, tl)   # both tiers served
    client.close()


@pytest.fixture
def small_disk(tmp_path):
    """The cluster's folder, with a 24 MiB tmpfs mounted as server s1's (mounting needs root,
    as in CI); s0 keeps the ordinary disk."""
    import os
    import subprocess
    where = tmp_path / "c" / "s1"
    where.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {r.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {r.stderr.strip()}")
    try:
        yield tmp_path / "c"
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_refuses_writes_clearly_and_keeps_serving(small_disk):
    """s1's disk fills. Its own writes are then RESOURCE_EXHAUSTED naming the server and its
    path; a write s0 leads is acknowledged without s1, whose copy missed it: s1 refuses reads of
    those partitions (UNAVAILABLE) even while it still holds the map in which it serves them
    (held with a failpoint), so no read sees the acknowledged write undone. Every acknowledged
    row reads back unchanged; both servers stay up."""
    import os
    import grpc
    from shards.failpoints import arm
    from shoal.proto import shoal_pb2 as pb
    from shoal.proto import shoal_pb2_grpc as pbg
    from shoal.serving import channel
    from shoal.wire import pack
    cfg = shoal.ShoalConfig().replace(server__memory_budget_bytes=16 << 20,
                                      server__disk_capacity_bytes=1 << 30,  # a wrong figure
                                      server__failpoints=True)
    rows = 400_000
    with shoal.LocalCluster(servers=2, replication=2, config=cfg, data_dir=str(small_disk)) as c:
        client = c.client()
        client.create_model("full", [shoal.TableSpec("t", rows, 64, feature_names=("f",))])
        with c.admin() as admin:
            before = admin.shard_map()
        spec = next(t for md in before.models for t in md.tables)
        lead = {rs.partition: rs.replicas[0] for rs in before.partitions}   # leaders
        parts = np.arange(rows) & (spec.num_partitions - 1)
        led_by = {s: np.flatnonzero(np.array([lead[p] for p in range(spec.num_partitions)])
                                    [parts] == s) for s in ("s0", "s1")}
        expect = np.zeros((rows, 64), np.float32)
        ballast = small_disk / "s1" / "ballast"          # room for the failpoint file, later
        ballast.write_bytes(bytes(64 << 10))
        acked, err = [], None
        for chunk in np.array_split(led_by["s1"], 20):      # 2 x 52 MB for s1's 24 MiB
            try:
                client.write_rows("full", "t", torch.from_numpy(chunk),
                                  torch.full((len(chunk), 64), float(chunk[0] + 1)))
            except shoal.ShoalError as e:
                err = e
                break
            expect[chunk] = chunk[0] + 1
            acked.append(chunk)
        assert err is not None and err.code.name == "RESOURCE_EXHAUSTED", err
        assert f"server s1: disk full under {small_disk / 's1'}" in err.message, err.message
        assert len(acked) >= 2

        # s0 leads this write; s1 cannot store it and keeps the map in which it serves it.
        ballast.unlink()
        arm(small_disk / "s1", {"map.apply": "pause"})
        try:
            theirs = led_by["s0"][:20_000]
            client.write_rows("full", "t", torch.from_numpy(theirs),
                              torch.full((len(theirs), 64), 7.0))
            expect[theirs] = 7.0
            acked.append(theirs)
            with c.admin() as admin:
                after = admin.shard_map()
            p0 = int(parts[theirs[0]])
            rs = next(r for r in after.partitions if r.partition == p0)
            assert "s1" not in rs.replicas, rs                 # dropped for the missed write
            ch = channel(c.server("s1").address)
            try:
                with pytest.raises(grpc.RpcError) as refused:   # routed as s1 last knew it
                    pbg.ShardServerStub(ch).LookupRows(pb.LookupRowsRequest(
                        map_version=before.version, segments=[pb.RowsSegment(
                            table_uid=spec.table_uid, ids=pack(theirs[parts[theirs] == p0]),
                            routed=pb.PartitionEpochs(
                                partitions=pack(np.array([p0], np.int32)),
                                epochs=pack(np.array([next(
                                    r.epoch for r in before.partitions if r.partition == p0)],
                                    np.int64))))]), timeout=10)
            finally:
                ch.close()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            assert "failed to store a write" in refused.value.details()
            ids = np.sort(np.concatenate(acked))
            for _ in range(3):                  # through the router, which picks either copy
                got = client.lookup_rows("full", "t", torch.from_numpy(ids)).numpy()
                np.testing.assert_array_equal(got, expect[ids])
        finally:
            arm(small_disk / "s1", {})
        assert all(s.state == "alive" for s in client.status().map.servers)
        for s in c.servers:
            os.kill(s.pid, 0)                            # (raises if the process is gone)
        client.close()


def test_predict_with_an_eighth_of_the_rows_in_memory(tmp_path):
    """A DLRM checkpoint loaded into servers whose memory holds an eighth of its rows:
    predict equals the local DLRM, with rows served from RocksDB."""
    from shoal import DensePart
    from tests.test_predict import TABLES, batch, make_dlrm
    model, path = make_dlrm(str(tmp_path / "ckpt"), 12)
    held = sum(rows for _, rows in TABLES) * 8 * 4          # every row, on both servers
    cfg = shoal.ShoalConfig().replace(server__memory_budget_bytes=tiers.budget_for_rows(
        held // 8), server__heartbeat_interval_s=0.25)
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c"),
                            config=cfg) as cluster:
        client = cluster.client(timeout=60)
        client.load(path, model="dlrm", dense_part=DensePart.dlrm([n for n, _ in TABLES]))
        with torch.no_grad():
            for seed in range(6):
                dense, kjt = batch(seed)
                torch.testing.assert_close(client.predict("dlrm", dense, kjt).scores,
                                           model(dense, kjt)[:, 0], rtol=1e-5, atol=1e-5)
        time.sleep(0.8)
        for s in client.status().map.servers:
            assert s.stats.cold_ids > 0 and s.stats.resident_bytes < held // 4, s.stats
        client.close()


def test_a_server_killed_mid_ingest_or_mid_compaction_restarts_with_every_acked_row(tmp_path):
    """One server, one replica, memory for an eighth of the rows: its disk is all there is.
    SIGKILL it (1) while a bulk write's SST files are written but not yet ingested (held there
    with a failpoint), (2) while RocksDB compacts the ingested files. Each time it restarts with
    every acknowledged row, read back against the values written; the write cut short is
    entirely absent and its files are gone."""
    import os
    import signal
    from shards.failpoints import arm
    rows, chunk, dim = 200_000, 50_000, 64           # 51 MB of rows, 12.8 MB a write
    cfg = shoal.ShoalConfig().replace(
        server__memory_budget_bytes=tiers.budget_for_rows(rows * dim * 4 // 8),
        server__heartbeat_interval_s=0.25, server__failpoints=True)
    expect = np.zeros((rows, dim), np.float32)

    def write(client, lo, value):
        ids = np.arange(lo, lo + chunk)
        client.write_rows("k", "t", torch.from_numpy(ids),
                          torch.full((chunk, dim), value).add_(torch.from_numpy(
                              ids.astype(np.float32))[:, None] * 1e-6))
        expect[ids] = value + ids.astype(np.float32)[:, None] * 1e-6

    def check(client):
        for lo in range(0, rows, 100_000):            # every row
            ids = np.arange(lo, lo + 100_000)
            np.testing.assert_array_equal(
                client.lookup_rows("k", "t", torch.from_numpy(ids)).numpy(), expect[ids])

    with shoal.LocalCluster(servers=1, replication=1, config=cfg,
                            data_dir=str(tmp_path / "c")) as c:
        client = c.client(timeout=60)
        client.create_model("k", [shoal.TableSpec("t", rows, dim, feature_names=("f",))])
        s0 = c.servers[0]
        for i, lo in enumerate(range(0, 100_000, chunk)):
            write(client, lo, float(i + 1))
        # (1) mid-ingest: the next write stops after its SST files are synced.
        arm(s0.data_dir, {"store.ingest": "pause"})
        log = pathlib.Path(s0.data_dir) / "process.log"
        short = c.client(timeout=2)
        cut = threading.Thread(target=lambda: pytest.raises(shoal.ShoalError, write, short,
                                                            100_000, 99.0))
        expect_before = expect.copy()
        cut.start()
        poll(lambda: "failpoint store.ingest: pause" in log.read_text(), 30, "the held ingest")
        tmp = pathlib.Path(s0.data_dir) / "sst-tmp"
        assert list(tmp.glob("*.sst")), "the cut write's SST files"
        os.kill(s0.pid, signal.SIGKILL)
        cut.join(60)
        short.close()
        expect[:] = expect_before                     # the cut write was never acknowledged
        arm(s0.data_dir, {})
        start = len(log.read_text())
        s0 = restart(c, client, "s0")
        assert not list(tmp.glob("*.sst"))
        check(client)
        # (2) mid-compaction: more bulk writes; the server compacts once they stop.
        for i, lo in enumerate(range(100_000, rows, chunk)):
            write(client, lo, float(i + 10))
        write(client, 0, 50.0)                        # an overwrite of ingested rows
        log = pathlib.Path(s0.data_dir) / "process.log"
        start = len(log.read_text())
        since = lambda: log.read_text()[start:]       # after the last write
        poll(lambda: "compacting table_uid" in since(), 30, "the compaction")
        os.kill(s0.pid, signal.SIGKILL)
        assert "compacted bulk-loaded tables" not in since()   # killed mid-way
        s0 = restart(c, client, "s0")
        check(client)
        client.close()


def restart(cluster, client, server_id: str):
    """Restart a killed server and wait until the router reads from it again."""
    h = cluster.restart(server_id)

    def serving():
        try:
            client.lookup_rows("k", "t", torch.arange(64))    # every partition, via the router
            return True
        except shoal.ShoalError:
            return False
    poll(serving, 30, f"{server_id} serving again")
    return h


def poll(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_partitions_made_resident_are_read_outside_the_locks_and_never_older(tmp_path):
    """In-process, on a real RocksDB: a map that leaves more memory to table ``a`` makes its
    partitions resident. Their rows are read while writes go on (one lands between the read
    and the copy into memory, held there with the ``map.fill`` failpoint), and what is served
    from memory afterwards is the newer write, not the rows read before it."""
    from embeddings.specs import TableSpec
    from shards.failpoints import Failpoints, arm
    from shards.service import ShardService
    from shards.storage import RocksRowStore
    from shoal.config import ShardServerConfig
    from shoal.proto import shoal_pb2 as pb
    from shoal.wire import pack, unpack
    P = 8
    a = TableSpec("a", 40_000, 64, num_partitions=P, table_uid=1)          # 10 MB
    b = TableSpec("b", 400_000, 64, num_partitions=P, table_uid=2)         # 100 MB

    def shard_map(version, specs):
        return pb.ShardMap(version=version, models=[pb.ModelSpec(
            name="m", version=1, tables=[s.to_proto() for s in specs])],
            servers=[pb.ServerInfo(server_id="s0", address="127.0.0.1:1", state="alive")],
            partitions=[pb.ReplicaSet(table_uid=s.table_uid, partition=p, epoch=1,
                                      replicas=["s0"]) for s in specs for p in range(P)])
    maps = [shard_map(1, [a, b])]
    reached = threading.Event()

    class Watched(Failpoints):
        def hit(self, name):
            if name == "map.fill":
                reached.set()
            super().hit(name)
    cfg = ShardServerConfig(memory_budget_bytes=tiers.budget_for_rows(12 << 20))
    store = RocksRowStore(tmp_path / "s0", 8 << 20)
    svc = ShardService("s0", store, cfg, lambda known: maps[-1] if maps[-1].version > known
                       else None, failpoints=Watched(tmp_path))
    routed = pb.PartitionEpochs(partitions=pack(np.arange(P, dtype=np.int32)),
                                epochs=pack(np.ones(P, np.int64)))
    ids = np.arange(a.num_embeddings)

    def write(value, request_id):
        svc.lead_write(pb.WriteRowsRequest(
            map_version=1, table_uid=1, ids=pack(ids), routed=routed, request_id=request_id,
            rows=pack(np.full((len(ids), 64), value, np.float32))))
    try:
        svc.refresh_map()
        assert not svc.held(1).arena.resident(0)                # a row cache's share only
        write(1.0, "w1")
        maps.append(shard_map(2, [a]))                          # b is gone: a fits
        arm(tmp_path, {"map.fill": "pause"})
        applying = threading.Thread(target=svc.refresh_map)
        applying.start()
        assert reached.wait(30)
        write(2.0, "w2")                                        # not held up by the map
        arm(tmp_path, {})
        applying.join(30)
        assert svc.map_version == 2 and svc.held(1).arena.resident(0)
        reply = svc.lookup_rows(pb.LookupRowsRequest(map_version=2, segments=[pb.RowsSegment(
            table_uid=1, ids=pack(ids), routed=routed)]))
        got = unpack(reply.rows[0], "rows", "float32", 2)
        np.testing.assert_array_equal(got, np.full((len(ids), 64), 2.0, np.float32))
        assert svc.reader.tables[1].misses == 0                 # all of it from memory
    finally:
        arm(tmp_path, {})
        svc.reader.close()
        store.close()


def test_a_restarted_server_and_a_moved_partition_start_with_the_hot_set(tmp_path):
    """Memory for an eighth of the rows. After Zipf traffic, (1) a server killed with -9 and
    restarted answers its first batch mostly from its row cache (the hot set it saved), and
    (2) partitions moved to a new server arrive with their leader's hot rows: its first batch
    is mostly hits too. A cold cache's first batch of unique ids would be all misses. Every
    answer equals the rows written."""
    import os
    import signal
    from shoal.proto import shoal_pb2 as pb
    from shoal.proto import shoal_pb2_grpc as pbg
    from shoal.serving import channel
    rows, dim = 200_000, 64
    cfg = shoal.ShoalConfig().replace(
        server__memory_budget_bytes=tiers.budget_for_rows(rows * dim * 4 // 2 // 8),
        server__hot_save_interval_s=0.5, server__heartbeat_interval_s=0.25,
        server__rebuild_mib_per_s=64.0)
    weight = np.random.default_rng(5).standard_normal((rows, dim)).astype(np.float32)
    rng = np.random.default_rng(6)

    def batch(client):
        ids = np.unique(zipf_ids(rng, rows, 30_000, a=1.05))
        np.testing.assert_array_equal(
            client.lookup_rows("w", "t", torch.from_numpy(ids)).numpy(), weight[ids])

    def counts(server):
        ch = channel(server.address)
        try:
            s = pbg.ShardServerStub(ch).Stats(pb.StatsRequest(), timeout=10)
            return s.ids_looked_up, s.cold_ids
        finally:
            ch.close()

    def first_batch_hit_rate(client, server):
        (n0, c0), _ = counts(server), batch(client)
        n1, c1 = counts(server)
        assert n1 > n0
        return 1 - (c1 - c0) / (n1 - n0)

    with shoal.LocalCluster(servers=2, replication=1, config=cfg,
                            data_dir=str(tmp_path / "c")) as c:
        client = c.client(timeout=60)
        client.create_model("w", [shoal.TableSpec("t", rows, dim, feature_names=("f",))])
        for lo in range(0, rows, 50_000):
            client.write_rows("w", "t", torch.arange(lo, lo + 50_000),
                              torch.from_numpy(weight[lo:lo + 50_000]))
        for _ in range(12):
            batch(client)
        steady = first_batch_hit_rate(client, c.server("s0"))
        hot = pathlib.Path(c.server("s0").data_dir) / "hot"
        poll(lambda: list(hot.glob("*.npy")), 10, "the saved hot set")
        time.sleep(0.6)                               # saved after the traffic above
        os.kill(c.server("s0").pid, signal.SIGKILL)
        s0 = c.restart("s0")
        log = pathlib.Path(s0.data_dir) / "process.log"
        poll(lambda: "warm start:" in log.read_text(), 30, "the warm start")
        restarted = first_batch_hit_rate(client, s0)
        new = c.add_server()
        c.rebalance(timeout=120)
        moved = first_batch_hit_rate(client, new)
        print(f"first batch hit rate: steady {steady:.2f}, after a restart {restarted:.2f}, "
              f"on a new server {moved:.2f}")
        # (Batches of unique Zipf ids: ~0.5 measured at steady state, where repeats would hit.)
        assert steady > 0.3 and restarted > 0.6 * steady and moved > 0.5 * steady, \
            (steady, restarted, moved)
        assert "hot rows cached" in (pathlib.Path(new.data_dir) / "process.log").read_text()
        client.close()


def test_a_rewrite_that_may_not_fit_the_disk_is_skipped(tmp_path, caplog):
    """``compact_ingested`` rewrites a table that took SST files only while the disk has 1.25x
    the table's bytes free (a full disk would stop RocksDB's writes); otherwise it says so and
    leaves the table readable as it is."""
    import logging
    from embeddings.partition import partition_of
    from shards.storage import RocksRowStore
    store = RocksRowStore(tmp_path / "s", 8 << 20, sst_threshold_rows=1_000)
    try:
        ids = np.arange(5_000)
        rows = np.random.default_rng(0).standard_normal((5_000, 8)).astype(np.float32)
        for uid in (1, 2):
            store.write_rows(uid, partition_of(ids, 4), ids, rows)      # SST + ingest
        store.disk_free = lambda: 1_000_000
        with caplog.at_level(logging.WARNING, logger="shard.storage"):
            done = store.compact_ingested(lambda uid: {1: 10_000_000, 2: 100_000}[uid])
        assert done == [2]
        assert "not compacting table_uid 1: 1 MiB free, its rewrite may take 10 MiB" in caplog.text
        got = np.frombuffer(store.read_rows(1, partition_of(ids, 4), ids, 32), np.float32)
        np.testing.assert_array_equal(got.reshape(-1, 8), rows)
    finally:
        store.close()


def test_a_new_version_starts_with_the_hot_set_of_the_version_before(tmp_path):
    """Two checkpoint loads of a model, memory for an eighth of the rows: once version 2 is
    loaded, its row caches start from version 1's hot set (the same hot ids, version 2's rows):
    its first batch of unique Zipf ids is mostly hits, where an empty cache would hit none, and
    every answer is version 2's row."""
    from shoal.proto import shoal_pb2 as pb
    from shoal.proto import shoal_pb2_grpc as pbg
    from shoal.serving import channel
    from tests.ckpt_fixtures import write_safetensors
    rows, dim = 200_000, 64
    cfg = shoal.ShoalConfig().replace(
        server__memory_budget_bytes=tiers.budget_for_rows(rows * dim * 4 // 2 // 8),
        server__heartbeat_interval_s=0.25)
    weights = [torch.randn(rows, dim, generator=torch.Generator().manual_seed(v))
               for v in (1, 2)]
    paths = [write_safetensors(str(tmp_path / f"v{v}.safetensors"),
                               {"x.embedding_bags.t.weight": w}) for v, w in enumerate(weights)]
    rng = np.random.default_rng(8)

    def batch(client, weight):
        ids = np.unique(zipf_ids(rng, rows, 30_000, a=1.05))
        np.testing.assert_array_equal(
            client.lookup_rows("w", "t", torch.from_numpy(ids)).numpy(), weight[ids].numpy())

    def counts(cluster):
        out = np.zeros(2, np.int64)
        for s in cluster.servers:
            ch = channel(s.address)
            try:
                st = pbg.ShardServerStub(ch).Stats(pb.StatsRequest(), timeout=10)
                out += (st.ids_looked_up, st.cold_ids)
            finally:
                ch.close()
        return out

    with shoal.LocalCluster(servers=2, replication=1, config=cfg,
                            data_dir=str(tmp_path / "c")) as c:
        client = c.client(timeout=60)
        client.load(paths[0], model="w")
        for _ in range(10):
            batch(client, weights[0])
        assert client.load(paths[1], model="w").version == 2
        for s in c.servers:
            log = pathlib.Path(s.data_dir) / "process.log"
            poll(lambda: "admitted from the version before" in log.read_text(), 30,
                 f"{s.server_id}'s warm start of version 2")
        before = counts(c)
        batch(client, weights[1])
        ids, cold = counts(c) - before
        print(f"version 2's first batch: hit rate {1 - cold / ids:.2f}")
        assert ids > 0 and 1 - cold / ids > 0.25, (ids, cold)
        client.close()
