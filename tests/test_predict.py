"""Predict: a TorchRec DLRM with random weights, saved with torch.distributed.checkpoint,
loaded with its dense part; Shoal's scores equal ``DLRM(dense, kjt)`` computed locally, for
single requests, for many concurrent clients (micro-batched) and with ``top_k``; bad input
gets a clear error naming the field."""
from __future__ import annotations

import threading

import grpc
import pytest
import torch

import shoal
from shoal.dense_part import DensePart
from tests.faults import errors_while_stopped

# EBC order differs from the loader's (sorted) table order: the dense part must follow it.
TABLES = [("t_cat_2", 300), ("t_cat_0", 500), ("t_cat_10", 200), ("t_cat_1", 400)]
DIM, DENSE_IN, B = 8, 5, 64


def make_dlrm(path: str, seed: int):
    """A torchrec DLRM with random weights, saved at ``path`` with DCP: (model, path)."""
    import torch.distributed.checkpoint as dcp
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=rows, feature_names=[n])
        for n, rows in TABLES])
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE_IN,
                 dense_arch_layer_sizes=[16, DIM], over_arch_layer_sizes=[16, 8, 1]).eval()
    dcp.save(model.state_dict(), checkpoint_id=path, no_dist=True)
    return model, path


@pytest.fixture(scope="module")
def dlrm_ckpt(tmp_path_factory):
    return make_dlrm(str(tmp_path_factory.mktemp("dlrm") / "ckpt"), 11)


def batch(seed: int, size: int = B, keys=None):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    g = torch.Generator().manual_seed(seed)
    keys = keys or [n for n, _ in TABLES]
    rows = dict(TABLES)
    lengths = torch.randint(0, 4, (len(keys), size), generator=g)
    values = torch.cat([torch.randint(0, rows[k], (int(lengths[i].sum()),), generator=g)
                        for i, k in enumerate(keys)])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys, values, lengths.reshape(-1))
    return torch.randn(size, DENSE_IN, generator=g), kjt


def test_predict_equals_the_local_dlrm(dlrm_ckpt, tmp_path):
    model, path = dlrm_ckpt
    cfg = shoal.ShoalConfig().replace(router__predict_window_ms=20.0,
                                      router__max_predict_batch=4096)
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c"),
                            config=cfg) as cluster:
        client = cluster.client(timeout=60)
        res = client.load(path, model="dlrm",
                          dense_part=DensePart.dlrm([n for n, _ in TABLES]))
        assert "shoal.dense_part" not in res.dense      # the part is stored apart from them

        with torch.no_grad():
            dense, kjt = batch(1)
            want = model(dense, kjt)[:, 0]
            got = client.predict("dlrm", dense, kjt)
            assert got.version == res.version and got.indices is None
            torch.testing.assert_close(got.scores, want, rtol=1e-5, atol=1e-5)
            # top_k: the local scores sorted.
            top = client.predict("dlrm", dense, kjt, top_k=5)
            order = torch.argsort(want, descending=True)[:5]
            assert top.indices.tolist() == order.tolist()
            torch.testing.assert_close(top.scores, want[order], rtol=1e-5, atol=1e-5)

            # Many concurrent clients: merged into shared batches, each answer its own.
            errors, merged = [], []

            def worker(k: int) -> None:
                c = cluster.client(timeout=60)
                try:
                    for j in range(4):
                        d, s = batch(100 + 10 * k + j, size=8 + k)
                        t = {}
                        p = c.predict("dlrm", d, s, timings=t)
                        merged.append(t["batch_requests"])
                        torch.testing.assert_close(p.scores, model(d, s)[:, 0], rtol=1e-5,
                                                   atol=1e-5)
                except Exception as e:            # noqa: BLE001 - reported below
                    errors.append(e)
                finally:
                    c.close()

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors[0]
            assert len(merged) == 32 and max(merged) >= 2

        # Bad input: each names its field.
        def code(fn):
            with pytest.raises(shoal.ShoalError) as e:
                fn()
            return e.value.code, e.value.message

        dense, kjt = batch(2)
        c, m = code(lambda: client.predict("dlrm", dense[:, :4], kjt))
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "dense" in m and "[64, 5]" in m
        d3, k3 = batch(3, keys=["t_cat_2", "t_cat_0", "t_cat_1"])
        c, m = code(lambda: client.predict("dlrm", d3, k3))
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "sparse.keys" in m and "t_cat_10" in m
        big_d, big_k = batch(4, size=4097)
        c, m = code(lambda: client.predict("dlrm", big_d, big_k))
        assert c == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_predict_batch" in m
        c, m = code(lambda: client.predict("dlrm", dense, kjt, version=7))
        assert c == grpc.StatusCode.NOT_FOUND and "7" in m
        c, m = code(lambda: client.predict("dlrm", dense, kjt, top_k=-1))
        assert c == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in m
        # A model without a dense part.
        client.load(path, model="plain")
        c, m = code(lambda: client.predict("plain", dense, kjt))
        assert c == grpc.StatusCode.FAILED_PRECONDITION and "no dense part" in m
        client.close()


def test_the_dlrm_interaction_equals_torchrecs():
    from torchrec.models.dlrm import InteractionArch

    from shoal.dense_part import _Interaction
    g = torch.Generator().manual_seed(0)
    for F, D, B in ((26, 16, 300), (3, 8, 5), (1, 4, 1)):
        d, s = torch.randn(B, D, generator=g), torch.randn(B, F, D, generator=g)
        assert torch.equal(_Interaction(F)(d, s), InteractionArch(F)(d, s))


def test_dense_part_round_trips_and_torchscript_scores():
    """The stored form reads back; TorchScript and torch.export parts take (dense, pooled)
    and score."""
    part = DensePart.dlrm(["b", "a"])
    assert DensePart.from_params(part.to_params()) == part

    class Tiny(torch.nn.Module):
        def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
            return dense.sum(1) - pooled.sum(1)

    ts = DensePart.torchscript(torch.jit.script(Tiny()), ["a"], dense_in_features=3)
    back = DensePart.from_params({k: torch.from_numpy(v) for k, v in ts.to_params().items()})
    assert back == ts
    scorer = back.build({}, [2])
    d, p = torch.randn(4, 3), torch.randn(4, 2)
    torch.testing.assert_close(scorer.scores(d, p), d.sum(1) - p.sum(1))
    batch_dim = torch.export.Dim("batch", min=1, max=1 << 16)
    ep = torch.export.export(Tiny(), (d, p), dynamic_shapes=({0: batch_dim}, {0: batch_dim}))
    ex = DensePart.exported(ep, ["a"], dense_in_features=3)
    scorer = DensePart.from_params(ex.to_params()).build({}, [2])
    d, p = torch.randn(9, 3), torch.randn(9, 2)          # another batch size than exported
    torch.testing.assert_close(scorer.scores(d, p), d.sum(1) - p.sum(1))
    with pytest.raises(shoal.ShoalError, match="dense_part.kind"):
        DensePart("onnx", ("a",)).check()


def test_a_predict_past_its_deadline_fails_whole(dlrm_ckpt, tmp_path):
    """With the only server stopped (SIGSTOP), a predict (and a lookup_rows) with a 0.5 s
    deadline gets DEADLINE_EXCEEDED from the router in about that time, not a partial answer;
    once the server goes on, the same request is answered correctly."""
    model, path = dlrm_ckpt
    with shoal.LocalCluster(servers=1, replication=1, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        client.load(path, model="dlrm", dense_part=DensePart.dlrm([n for n, _ in TABLES]))
        dense, kjt = batch(5)
        with torch.no_grad():
            want = model(dense, kjt)[:, 0]
        torch.testing.assert_close(client.predict("dlrm", dense, kjt).scores, want,
                                   rtol=1e-5, atol=1e-5)       # the dense part is built
        (e, took), (rows_e, rows_took) = errors_while_stopped(
            cluster.servers[0].pid,
            lambda: client.predict("dlrm", dense, kjt, timeout=0.5),
            lambda: client.lookup_rows("dlrm", TABLES[0][0], [1, 2, 3], timeout=0.5))
        assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline" in e.message and "predict of 64 candidates" in e.message
        assert 0.4 < took < 2.0, took
        assert rows_e.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "lookup_rows of 3 ids" in rows_e.message, rows_e.message
        assert 0.4 < rows_took < 2.0, rows_took
        torch.testing.assert_close(client.predict("dlrm", dense, kjt, timeout=30).scores, want,
                                   rtol=1e-5, atol=1e-5)
        client.close()


def test_a_table_shared_by_two_features_predicts_like_the_local_dlrm(tmp_path):
    """Two features read one table (torchrec ``feature_names=[a, b]``), in another order
    than the loader's: the batch is pooled per query and its columns reordered to the dense
    part's features (the path for keys that share a table), and the scores equal the local
    DLRM's, alone and merged with other requests."""
    import torch.distributed.checkpoint as dcp
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    torch.manual_seed(4)
    keys = ["f_z", "f_b", "f_a"]
    rows = {"f_z": 150, "f_b": 300, "f_a": 300}
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t_z", embedding_dim=DIM, num_embeddings=150,
                           feature_names=["f_z"]),
        EmbeddingBagConfig(name="t_shared", embedding_dim=DIM, num_embeddings=300,
                           feature_names=["f_b", "f_a"])])
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE_IN,
                 dense_arch_layer_sizes=[16, DIM], over_arch_layer_sizes=[16, 1]).eval()
    path = str(tmp_path / "ckpt")
    dcp.save(model.state_dict(), checkpoint_id=path, no_dist=True)

    def request(seed: int, size: int):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(0, 4, (len(keys), size), generator=g)
        values = torch.cat([torch.randint(0, rows[k], (int(lengths[i].sum()),), generator=g)
                            for i, k in enumerate(keys)])
        return torch.randn(size, DENSE_IN, generator=g), \
            KeyedJaggedTensor.from_lengths_sync(keys, values, lengths.reshape(-1))

    cfg = shoal.ShoalConfig().replace(router__predict_window_ms=20.0)
    with shoal.LocalCluster(servers=2, replication=1, data_dir=str(tmp_path / "c"),
                            config=cfg) as cluster:
        client = cluster.client(timeout=60)
        # The checkpoint names tables, not features: the model is made with ebc's configs.
        client.create_model("shared", ebc._embedding_bag_configs, loading=True)
        client.load(path, model="shared", version=1, dense_part=DensePart.dlrm(keys))
        reqs = [request(s, 5 + s) for s in range(6)]
        got: dict[int, torch.Tensor] = {}
        merged: list[float] = []

        def one(i: int) -> None:
            t: dict = {}
            got[i] = client.predict("shared", *reqs[i], timings=t).scores
            merged.append(t["batch_requests"])
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(got) == list(range(len(reqs)))
        with torch.no_grad():
            for i, (d, kjt) in enumerate(reqs):
                torch.testing.assert_close(got[i], model(d, kjt)[:, 0], rtol=1e-5, atol=1e-5)
        assert max(merged) >= 2                                   # some were merged
        client.close()
