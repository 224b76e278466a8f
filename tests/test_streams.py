"""Predict calls on one stream (``Router.PredictStream``, the client's ``predict``): each
answer comes back under its call's id with the call's own status, valid calls score like the
local DLRM beside failing ones, each call is counted like an RPC, and a client's stream threads
end when it closes."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import torch

import shoal
from shoal.dense_part import DensePart
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import channel
from shoal.wire import pack, unpack
from tests.test_predict import TABLES, batch, make_dlrm


def _request(dense, kjt, **kw) -> pb.PredictRequest:
    return pb.PredictRequest(
        sparse=pb.FeatureBatch(model=kw.pop("model", "dlrm"), version=kw.pop("version", 0),
                               keys=kjt.keys(), values=pack(kjt.values()),
                               lengths=pack(kjt.lengths()), batch_size=kjt.stride()),
        dense=pack(dense, "float32"), **kw)


def test_calls_on_one_stream_are_answered_by_id_with_their_own_status(tmp_path):
    model, path = make_dlrm(str(tmp_path / "ckpt"), 21)
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        client.load(path, model="dlrm", dense_part=DensePart.dlrm([n for n, _ in TABLES]))
        good = [batch(s) for s in (1, 2, 3)]
        d, kjt = good[0]
        calls = [pb.PredictCall(id=100 + i, timeout_s=30, request=_request(dd, kk))
                 for i, (dd, kk) in enumerate(good)]
        calls += [
            pb.PredictCall(id=7, timeout_s=30, request=_request(d[:, :3], kjt)),
            pb.PredictCall(id=8, timeout_s=30, request=_request(d, kjt, version=9)),
            pb.PredictCall(id=9, timeout_s=30, request=_request(d, kjt, top_k=5)),
        ]
        from tests.test_metrics import scrape, value
        metrics = client.status().router.metrics_address
        before = value(scrape(metrics), "shoal_rpc_requests_total", role="router",
                       method="Predict", code="OK")
        ch = channel(cluster.router_address)
        answers = list(pbg.RouterStub(ch).PredictStream(iter(calls), timeout=60))
        ch.close()
        by_id = {a.id: a for a in answers}
        assert sorted(by_id) == sorted(c.id for c in calls) and len(answers) == len(calls)
        for i, (dd, kk) in enumerate(good):
            a = by_id[100 + i]
            assert a.code == 0
            with torch.no_grad():
                want = model(dd, kk)[:, 0]
            torch.testing.assert_close(torch.from_numpy(unpack(a.reply.scores, "s").copy()),
                                       want, rtol=1e-5, atol=1e-5)
        assert by_id[7].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "dense: shape [64, 3]" in by_id[7].message
        assert by_id[8].code == grpc.StatusCode.NOT_FOUND.value[0]
        assert "no version 9" in by_id[8].message
        with torch.no_grad():
            best = torch.topk(model(d, kjt)[:, 0], 5)
        np.testing.assert_array_equal(unpack(by_id[9].reply.indices, "i"), best.indices.numpy())
        # Each call on the stream is counted like a Predict RPC.
        after = value(scrape(metrics), "shoal_rpc_requests_total", role="router",
                      method="Predict", code="OK")
        assert after - before == 4
        client.close()


def test_a_clients_stream_threads_end_when_it_closes(tmp_path):
    model, path = make_dlrm(str(tmp_path / "ckpt"), 22)
    with shoal.LocalCluster(servers=1, replication=1, data_dir=str(tmp_path / "c")) as cluster:
        setup = cluster.client(timeout=60)
        setup.load(path, model="dlrm", dense_part=DensePart.dlrm([n for n, _ in TABLES]))
        setup.close()
        client = shoal.connect(cluster.router_address, timeout=30)
        d, kjt = batch(5)
        got = []
        threads = [threading.Thread(target=lambda: got.append(
            client.predict("dlrm", d, kjt).scores)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        with torch.no_grad():
            want = model(d, kjt)[:, 0]
        assert len(got) == 6 and all(torch.allclose(g, want, atol=1e-5) for g in got)
        assert any(t.name == "shoal-stream" for t in threading.enumerate())
        client.close()
        deadline = time.monotonic() + 10
        while any(t.name == "shoal-stream" for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the stream's reader did not end"
            time.sleep(0.05)


def test_a_router_without_the_streams_gets_unary_calls_every_time():
    """A client of a router that has no ``PredictStream`` / ``MoeForwardStream`` (an older
    one: a real gRPC server here that implements only the unary calls) falls back to unary
    calls on the first UNIMPLEMENTED and keeps using them: every call is answered."""
    from concurrent import futures

    from shoal.wire import to_torch

    class UnaryOnly(pbg.RouterServicer):
        def MoeForward(self, request, context):
            x = to_torch(request.hidden, "hidden", "float32", 2)
            return pb.MoeForwardReply(out=pack(x * 2), version=1)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pbg.add_RouterServicer_to_server(UnaryOnly(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = shoal.connect(f"127.0.0.1:{port}", timeout=10)
        for i in range(3):
            x = torch.full((2, 4), float(i + 1))
            assert torch.equal(client.moe_forward("m", "l", x), x * 2)
        assert client._no_stream == {"MoeForward"}
        client.close()
    finally:
        server.stop(0)
