"""The router's hot-row cache (``router.row_cache_rows``): bounded set-associative LRU; with it
on, pooled lookups still equal a local torchrec EmbeddingBagCollection; an update acknowledged
through one router is seen at once through another whose cache held the old row; a version
switch answers from the new version's rows; concurrent updates and cached queries never give a
row mixed from old and new values."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import shoal
from embeddings.specs import TableSpec
from router.rowcache import TableCache
from tests.traffic import WholeRowReaders, Workers

DIM = 8


# ---------------------------------------------------------------- the cache alone

def test_table_cache_is_a_bounded_lru_per_set_and_drops_moved_partitions():
    spec = TableSpec("t", 10_000, 2, num_partitions=4)
    c = TableCache(spec, capacity=16, ways=4)            # 4 sets of 4 slots
    ids = np.arange(1000, dtype=np.int64)
    sets = c._set_of(ids)
    one = ids[sets == sets[0]][:6]                        # six ids that share a set
    rows = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    c.revalidate(np.arange(4), np.zeros(4, np.int64), np.zeros(4, np.int64))
    c.insert(one[:4], rows[:4])
    slots = c.find(one[:4])
    assert (slots >= 0).all()
    torch.testing.assert_close(c.rows[torch.from_numpy(slots)], rows[:4])
    c.find(one[[0, 2, 3]])                                # one[1] is now the least recent
    c.insert(one[4:5], rows[4:5])
    assert c.find(one[1:2])[0] == -1                      # evicted
    assert (c.find(one[[0, 2, 3, 4]]) >= 0).all()
    # Never more than capacity rows, however many go in.
    c.insert(ids[100:400], torch.zeros(300, 2))
    assert int((c.keys >= 0).sum()) <= 16
    # A moved partition drops exactly its rows; the others stay.
    c2 = TableCache(spec, capacity=64, ways=4)
    c2.revalidate(np.arange(4), np.zeros(4, np.int64), np.zeros(4, np.int64))
    few = np.array([0, 1, 2, 3, 4, 5, 6, 7], dtype=np.int64)
    c2.insert(few, torch.ones(8, 2))
    held = c2.find(few) >= 0
    gone = c2.revalidate(np.array([1, 2]), np.array([5, 0]), np.array([0, 0]))
    assert gone.tolist() == [1]
    after = c2.find(few) >= 0
    assert (after == (held & (few % 4 != 1))).all() and not after[few % 4 == 1].any()
    assert c2.seq[1] == 5


# ---------------------------------------------------------------- on a cluster

def _ebc(seed: int, tables):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    torch.manual_seed(seed)
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=rows, feature_names=[n],
                           pooling=PoolingType.MEAN if mean else PoolingType.SUM)
        for n, rows, mean in tables])


TABLES = [("hot", 3000, False), ("avg", 500, True)]


def _kjt(seed: int, size: int = 48):
    """Zipf-ish ids (a hot head, a long tail) for both features."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    g = np.random.default_rng(seed)
    lengths = g.integers(0, 4, (len(TABLES), size))
    values = np.concatenate([np.minimum(g.zipf(1.3, int(lengths[i].sum())) - 1, rows - 1)
                             for i, (_, rows, _) in enumerate(TABLES)])
    return KeyedJaggedTensor.from_lengths_sync(
        [n for n, _, _ in TABLES], torch.from_numpy(values), torch.from_numpy(lengths.reshape(-1)))


def _specs():
    return [TableSpec(n, rows, DIM, feature_names=(n,), pooling="mean" if mean else "sum",
                      num_partitions=4) for n, rows, mean in TABLES]


def _fill(client, model, ebc, version: int = 0):
    with torch.no_grad():
        for name, m in ebc.embedding_bags.items():
            client.write_rows(model, name, torch.arange(m.weight.shape[0]), m.weight.detach(),
                              version=version)


def _same(kt, want) -> None:
    for k in want.keys():
        torch.testing.assert_close(kt[k], want[k], rtol=1e-5, atol=1e-5)


def _config(rows: int = 256):
    return shoal.ShoalConfig().replace(router__row_cache_rows=rows, router__hedge=False)


def test_cached_lookups_equal_torchrec_and_see_updates_made_through_another_router(tmp_path):
    ebc = _ebc(3, TABLES)
    with shoal.LocalCluster(servers=2, replication=2, routers=2, config=_config(),
                            data_dir=str(tmp_path / "c")) as cluster:
        a = shoal.connect(cluster.router_addresses[0], timeout=60)
        b = shoal.connect(cluster.router_addresses[1], timeout=60)
        a.create_model("m", _specs())
        _fill(a, "m", ebc)
        kjts = [_kjt(s) for s in range(6)]
        for _ in range(2):                               # cold, then mostly from the cache
            for kjt in kjts:
                with torch.no_grad():
                    want = ebc(kjt)
                _same(a.lookup("m", kjt), want)
                _same(b.lookup("m", kjt), want)
        st = b.status().router
        assert st.cache_hits > 0 and st.cache_misses > 0
        assert 0 < st.cache_bytes < 2 * 256 * (DIM * 4 + 16) + 1024   # two tables, 256 rows
        before_hits = st.cache_hits

        # Router b holds rows 0..2 of "hot" (the hottest); an update through router a is seen
        # by b's very next query, and b's cache is renewed, not bypassed for good.
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        ids = torch.tensor([0, 1, 2])
        one = KeyedJaggedTensor.from_lengths_sync(["hot", "avg"], torch.tensor([0, 1, 2, 0]),
                                                  torch.tensor([1, 1, 1, 1, 0, 0]))
        b.lookup("m", one)
        new = torch.full((3, DIM), 7.0) + torch.arange(3.0)[:, None]
        assert a.update("m", "hot", ids, new) == 3
        got = b.lookup("m", one)["hot"]
        torch.testing.assert_close(got, new)
        st = b.status().router
        assert st.cache_invalidated >= 1 and st.cache_hits > before_hits
        from tests.test_metrics import scrape, value
        got = scrape(st.metrics_address)
        assert value(got, "shoal_router_row_cache_ids_total", result="hit") == st.cache_hits
        assert value(got, "shoal_router_row_cache_ids_total", result="miss") == st.cache_misses
        assert value(got, "shoal_router_row_cache_invalidations_total") == st.cache_invalidated
        assert value(got, "shoal_router_row_cache_bytes") == st.cache_bytes
        # Batches take the servers in turn: the two replicas served about as many fetches.
        served = [value(scrape(srv.metrics_address), "shoal_server_lookups_total")
                  for srv in b.status().map.servers]
        assert min(served) > 0.3 * max(served), served
        with torch.no_grad():
            ebc.embedding_bags["hot"].weight[:3] = new
        for kjt in kjts:                                 # and everything else still right
            with torch.no_grad():
                want = ebc(kjt)
            _same(b.lookup("m", kjt), want)
            _same(a.lookup("m", kjt), want)
        assert shoal.ShoalConfig().router.row_cache_rows == 0
        a.close()
        b.close()


def test_a_version_switch_answers_from_the_new_versions_rows(tmp_path):
    v1, v2 = _ebc(5, TABLES), _ebc(6, TABLES)
    with shoal.LocalCluster(servers=2, replication=2, config=_config(),
                            data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        client.create_model("m", _specs())
        _fill(client, "m", v1)
        kjts = [_kjt(s) for s in range(4)]
        for kjt in kjts * 2:
            with torch.no_grad():
                _same(client.lookup("m", kjt), v1(kjt))
        client.create_version("m")
        _fill(client, "m", v2, version=2)
        client.update_version("m", 2, ready=True, make_current=True)
        for kjt in kjts * 2:
            with torch.no_grad():
                _same(client.lookup("m", kjt), v2(kjt))
        client.update_version("m", 1, make_current=True)     # a rollback is the same switch
        for kjt in kjts:
            with torch.no_grad():
                _same(client.lookup("m", kjt), v1(kjt))
        client.close()


def test_concurrent_updates_and_cached_queries_never_mix_rows(tmp_path):
    """Each update writes one value into every element of rows 0..63; two readers through the
    other router pool single-id bags (so a pooled bag is the row): every row read is one value
    throughout, and never older than the last update acknowledged before the read began."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    hot = np.arange(64)
    with shoal.LocalCluster(servers=2, replication=2, routers=2, config=_config(128),
                            data_dir=str(tmp_path / "c")) as cluster:
        a = shoal.connect(cluster.router_addresses[0], timeout=60)
        a.create_model("m", [TableSpec("t", 1000, DIM, feature_names=("f",),
                                       num_partitions=4)])
        a.write_rows("m", "t", np.arange(1000), np.zeros((1000, DIM), np.float32))
        kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.from_numpy(hot),
                                                  torch.ones(64, dtype=torch.int64))
        readers = WholeRowReaders(
            lambda: shoal.connect(cluster.router_addresses[1], timeout=30),
            lambda c: c.lookup("m", kjt)["f"].numpy())
        with readers:
            for v in range(1, 41):
                a.update("m", "t", hot, np.full((64, DIM), float(v), np.float32))
                readers.acked = float(v)
                time.sleep(0.01)
        assert not readers.errors, repr(readers.errors[0])
        assert readers.reads > 10
        st = shoal.connect(cluster.router_addresses[1]).status().router
        assert st.cache_hits > 0 and st.cache_invalidated > 0
        a.close()


@pytest.mark.parametrize("rows", [0, 256])
def test_predict_through_the_cache_equals_the_local_dlrm(rows, tmp_path):
    from tests.test_predict import batch, make_dlrm
    model, path = make_dlrm(str(tmp_path / "ckpt"), 4)
    with shoal.LocalCluster(servers=2, replication=2, config=_config(rows),
                            data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        client.load(path, model="dlrm", dense_part=shoal.DensePart.dlrm(
            ["t_cat_2", "t_cat_0", "t_cat_10", "t_cat_1"]))
        for seed in (1, 2, 1):
            dense, kjt = batch(seed)
            with torch.no_grad():
                want = model(dense, kjt)[:, 0]
            torch.testing.assert_close(client.predict("dlrm", dense, kjt).scores, want,
                                       rtol=1e-5, atol=1e-5)
        st = client.status().router
        assert (st.cache_hits > 0) == bool(rows)
        client.close()


def test_cached_lookups_survive_a_server_killed_under_load(tmp_path):
    """SIGKILL a shard server while clients query through the cache: no request fails and
    every answer still equals torchrec's (misses go to the dead server's partners)."""
    import os
    import signal
    ebc = _ebc(8, TABLES)
    kjts = [_kjt(s) for s in range(8)]
    with torch.no_grad():
        wants = [ebc(k) for k in kjts]
    with shoal.LocalCluster(servers=3, replication=2, config=_config(64),
                            data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        client.create_model("m", _specs())
        _fill(client, "m", ebc)
        errors, done = [], [0]

        class Readers(Workers):
            def _run(self, i: int) -> None:
                c = cluster.client(timeout=60)
                try:
                    j = i
                    while not self._stop.is_set():
                        _same(c.lookup("m", kjts[j % len(kjts)]), wants[j % len(kjts)])
                        done[0] += 1
                        j += 1
                except Exception as e:                   # noqa: BLE001 - reported below
                    errors.append(e)
                finally:
                    c.close()

        with Readers(2):
            time.sleep(1.0)
            before = done[0]
            os.kill(cluster.server("s1").pid, signal.SIGKILL)
            time.sleep(3.0)
        assert not errors, repr(errors[0])
        assert before > 0 and done[0] > before + 10
        st = client.status().router
        assert st.cache_hits > 0
        client.close()
