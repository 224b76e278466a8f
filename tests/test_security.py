"""Security: TLS on every port and mutual TLS between Shoal's processes, roles by client
certificate or bearer token checked deny-by-default, limits, and malformed or oversized input,
against real local clusters (certificates from ``shoal certs``)."""
from __future__ import annotations

import os
import pathlib
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import torch

import shoal
from embeddings.specs import TableSpec
from shoal import security
from shoal.admin import server_checksums
from shoal.certs import make_certs
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.security import Credentials, make_token, verify_token
from shoal.serving import GRPC_OPTIONS
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

DENIED, UNAUTH = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
EXHAUSTED, INVALID = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT
N, D = 512, 8


def code_of(call) -> tuple[grpc.StatusCode, str]:
    """The status a call ends with (OK if it returns)."""
    try:
        call()
    except shoal.ShoalError as e:
        return e.code, e.message
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def stub(cls, address: str, creds: Credentials | None):
    return cls(security.channel(address, GRPC_OPTIONS, creds))


def key_of(certs: pathlib.Path) -> bytes:
    return bytes.fromhex((certs / "token.key").read_text().strip())


# ================================================================ pure logic
def test_tokens_are_signed_per_cluster_and_expire():
    key, other = os.urandom(32), os.urandom(32)
    tok = make_token(key, "alice", ["query"])
    who = verify_token(key, tok)
    assert (who.name, who.roles) == ("alice", frozenset({"query"}))
    assert who.may("query") and not who.may("write")
    cases = {
        "issued by another cluster": make_token(other, "alice", ["admin"]),
        "signature does not match": tok.split(".")[0] + "." + make_token(
            key, "alice", ["admin"]).split(".")[1] + "." + tok.split(".")[2],
        "expired": make_token(key, "bob", ["query"], ttl_s=-1),
        "not a Shoal token": "Bearer nonsense",
        "malformed": "shoal.!!!.???",
    }
    for why, bad in cases.items():
        with pytest.raises(shoal.ShoalError) as e:
            verify_token(key, bad)
        assert e.value.code == UNAUTH and why in e.value.message, (why, e.value.message)
    with pytest.raises(ValueError, match="roles"):
        make_token(key, "x", ["root"])


def test_every_rpc_has_a_rule_and_roles_nest():
    """Deny by default only works if every real RPC has a rule: each method of each service
    in the proto is named in RULES, and RULES names nothing else."""
    methods = {f"/shoal.v1.{s.name}/{m.name}" for s in pb.DESCRIPTOR.services_by_name.values()
               for m in s.methods}
    assert methods == set(security.RULES)
    admin = security.Identity("a", frozenset({"admin"}), "token")
    assert admin.may("query") and admin.may("write") and not admin.may("cluster")
    assert security.RULES["/shoal.v1.Router/UpdateModel"](pb.UpdateModelRequest(drop=True)) \
        == "admin"


def test_plaintext_is_refused_off_loopback():
    assert security.is_loopback("127.0.0.1") and security.is_loopback("::1")
    assert security.is_loopback("localhost") and not security.is_loopback("0.0.0.0")
    with pytest.raises(security.SecurityError, match="plaintext gRPC is allowed only on "
                                                     "loopback"):
        security.add_port(None, "0.0.0.0", 0, "router")     # refused before it binds


# ================================================================ a cluster with TLS on
@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    certs, other = root / "certs", root / "other"
    make_certs(certs)
    make_certs(other)                          # another cluster: another CA, another key
    cfg = shoal.ShoalConfig.from_json((certs / "security.json").read_text())
    cfg = cfg.replace(security__client_certs=False)    # the router takes tokens alone too
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(root / "c"),
                            config=cfg) as cluster:
        op = cluster.client()
        op.create_model("sec", [TableSpec("t", N, D, feature_names=("f",))])
        rows = torch.randn(N, D)
        op.write_rows("sec", "t", torch.arange(N), rows)
        yield cluster, certs, other, rows
        op.close()


def cert(certs: pathlib.Path, stem: str, ca: pathlib.Path | None = None) -> Credentials:
    return Credentials.from_files(str(ca or certs / "ca.pem"), str(certs / f"{stem}.pem"),
                                  str(certs / f"{stem}.key"))


def test_no_certificate_or_one_from_another_ca_is_refused(secure):
    cluster, certs, other, _ = secure
    ca_only = Credentials.from_files(str(certs / "ca.pem"))
    foreign = cert(other, "admin", ca=certs / "ca.pem")     # trusts us; we do not trust it
    server = cluster.servers[0].address
    for creds in (ca_only, foreign):
        # Coordinator and shard servers require a certificate from the cluster's CA: the TLS
        # handshake fails, nothing is answered.
        c, _ = code_of(lambda: stub(pbg.CoordinatorStub, cluster.coordinator_address, creds)
                       .GetShardMap(pb.GetShardMapRequest(), timeout=5))
        assert c == grpc.StatusCode.UNAVAILABLE
        c, _ = code_of(lambda: stub(pbg.ShardServerStub, server, creds)
                       .Stats(pb.StatsRequest(), timeout=5))
        assert c == grpc.StatusCode.UNAVAILABLE
        # The router (client_certs off) talks TLS to anyone, but without a token or a
        # certificate it knows, nobody is authenticated.
        c, msg = code_of(lambda: shoal.connect(cluster.router_address, 10, creds).status())
        assert c == UNAUTH and "no credentials" in msg, msg
    # Plaintext to a TLS port: no answer either.
    c, _ = code_of(lambda: pbg.RouterStub(grpc.insecure_channel(cluster.router_address))
                   .Status(pb.StatusRequest(), timeout=5))
    assert c == grpc.StatusCode.UNAVAILABLE


def test_roles_by_certificate_and_token(secure):
    cluster, certs, _, rows = secure
    ca = str(certs / "ca.pem")
    key = key_of(certs)
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.arange(8), torch.full((4,), 2))
    want = rows[:8].reshape(4, 2, D).sum(1)

    reader = shoal.connect(cluster.router_address, 10, Credentials.from_files(
        ca, token=make_token(key, "rita", ["query"])))
    torch.testing.assert_close(reader.lookup("sec", kjt).values(), want)
    c, msg = code_of(lambda: reader.write_rows("sec", "t", torch.arange(2), rows[:2]))
    assert c == DENIED and "WriteRows needs role 'write'" in msg and "rita" in msg, msg

    writer = shoal.connect(cluster.router_address, 10, Credentials.from_files(
        ca, token=make_token(key, "walt", ["write"])))
    writer.create_model("scratch", [TableSpec("s", 64, D, feature_names=("g",))])
    assert writer.write_rows("scratch", "s", torch.arange(4), torch.ones(4, D)) == 4
    c, msg = code_of(lambda: writer.update_version("scratch", 1, drop=True))
    assert c == DENIED and "needs role 'admin'" in msg, msg

    # Certificates carry their role in the OU: the reader's may read the map, not rebalance.
    coord = stub(pbg.CoordinatorStub, cluster.coordinator_address, cert(certs, "reader"))
    assert coord.GetShardMap(pb.GetShardMapRequest(), timeout=5).map.version > 0
    c, msg = code_of(lambda: coord.Rebalance(pb.RebalanceRequest(dry_run=True), timeout=5))
    assert c == DENIED and "Rebalance needs role 'admin'" in msg, msg
    admin = stub(pbg.CoordinatorStub, cluster.coordinator_address, cert(certs, "admin"))
    plan = admin.Rebalance(pb.RebalanceRequest(dry_run=True), timeout=5)
    now = coord.GetShardMap(pb.GetShardMapRequest(), timeout=5).map
    assert plan.map_version == now.version and not now.moves       # planned, not started
    assert set(plan.bytes_before) == {s.server_id for s in now.servers}
    assert sum(plan.bytes_before.values()) == sum(plan.bytes_after.values()) > 0
    # Shard servers' replication RPCs are for Shoal's own processes only, admin or not.
    c, msg = code_of(lambda: stub(pbg.ShardServerStub, cluster.servers[0].address,
                                  cert(certs, "admin")).Replicate(pb.ReplicateRequest(),
                                                                  timeout=5))
    assert c == DENIED and "needs role 'cluster'" in msg, msg
    # Refusals are logged by the process that refused them.
    log = (pathlib.Path(cluster.router.data_dir) / "process.log").read_text()
    assert "refused /shoal.v1.Router/WriteRows" in log and "PERMISSION_DENIED" in log
    for c_ in (reader, writer):
        c_.close()


def test_a_token_from_another_cluster_is_unauthenticated(secure):
    cluster, certs, other, _ = secure
    foreign = make_token(key_of(other), "mallory", ["admin"])
    client = shoal.connect(cluster.router_address, 10,
                           Credentials.from_files(str(certs / "ca.pem"), token=foreign))
    c, msg = code_of(client.status)
    assert c == UNAUTH and "issued by another cluster" in msg, msg
    log = (pathlib.Path(cluster.router.data_dir) / "process.log").read_text()
    assert "UNAUTHENTICATED: token: issued by another cluster" in log


# ================================================================ limits and hostile input
@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """One server, replication 1, every limit small: 1 MiB messages, 2 calls in flight per
    process, 100 ids and 8 MoE tokens per request, deadlines required."""
    cfg = shoal.ShoalConfig().replace(
        security__max_message_bytes=1 << 20, security__max_concurrent_requests=2,
        security__require_deadline=True, router__max_ids_per_request=100,
        router__max_moe_tokens=8, router__hedge=False, server__max_expert_tokens=64)
    with shoal.LocalCluster(servers=1, replication=1, config=cfg,
                            data_dir=str(tmp_path_factory.mktemp("lim"))) as c:
        cl = c.client(timeout=30)
        cl.create_model("lim", [TableSpec("t", N, D, feature_names=("f",))])
        rows = torch.randn(N, D)
        for lo in range(0, N, 100):
            cl.write_rows("lim", "t", torch.arange(lo, min(lo + 100, N)), rows[lo:lo + 100])
        from experts.specs import ExpertLayerSpec, ExpertLayerWeights
        spec = ExpertLayerSpec("l0", num_experts=4, d_model=8, d_ff=16, top_k=2).validate()
        g = torch.Generator().manual_seed(3)
        cl.put_expert_layers("moe", [(spec, ExpertLayerWeights(
            gate=torch.randn(4, 8, generator=g), w1=torch.randn(4, 16, 8, generator=g),
            w2=torch.randn(4, 8, 16, generator=g), w3=torch.randn(4, 16, 8, generator=g)
        ).check(spec))])
        yield c, cl, rows
        cl.close()


def stored(cluster, client) -> tuple:
    """Every row of the table, and every partition's checksum on the server."""
    m = client.status().map
    uid = next(t.table_uid for md in m.models for t in md.tables if md.name == "lim")
    parts = [rs.partition for rs in m.partitions if rs.table_uid == uid]
    sums, counts = server_checksums(cluster.servers[0].address, uid, parts)
    got = torch.cat([client.lookup_rows("lim", "t", torch.arange(lo, min(lo + 100, N)))
                     for lo in range(0, N, 100)])         # the limit: 100 ids a request
    return got, sums.tolist(), counts.tolist()


def test_oversized_and_malformed_messages_get_clear_codes_and_change_nothing(limited):
    c, cl, rows = limited
    before = stored(c, cl)
    torch.testing.assert_close(before[0], rows)
    assert sum(before[2]) == N
    raw = lambda address, method: security.channel(address, GRPC_OPTIONS).unary_unary(  # noqa
        method, request_serializer=None, response_deserializer=None)
    # 2 MiB of rows to a process that takes 1 MiB messages: gRPC's own limit.
    big = pb.RouterWriteRowsRequest(model="lim", table="t").SerializeToString() + \
        pb.RouterWriteRowsRequest(rows=pb.Tensor(data=b"\0" * (2 << 20))).SerializeToString()
    code, _ = code_of(lambda: raw(c.router_address, "/shoal.v1.Router/WriteRows")(
        big, timeout=10))
    assert code == EXHAUSTED
    # Bytes that are no valid message, to each kind of process.
    garbage = b"\xff\xff\xff\xff\x0f" + os.urandom(64)
    for address, method in ((c.router_address, "/shoal.v1.Router/Lookup"),
                            (c.router_address, "/shoal.v1.Router/WriteRows"),
                            (c.coordinator_address, "/shoal.v1.Coordinator/CreateModel"),
                            (c.servers[0].address, "/shoal.v1.ShardServer/Replicate"),
                            (c.servers[0].address, "/shoal.v1.ShardServer/Ingest")):
        code, msg = code_of(lambda: raw(address, method)(garbage, timeout=10))
        assert code == INVALID and "not a valid" in msg, (method, code, msg)
    # Over the ids and tokens limits: RESOURCE_EXHAUSTED naming the field, value and limit.
    code, msg = code_of(lambda: cl.lookup_rows("lim", "t", torch.arange(101)))
    assert code == EXHAUSTED and "ids: 101 ids exceed max_ids_per_request 100" in msg, msg
    code, msg = code_of(lambda: cl.moe_forward("moe", "l0", torch.zeros(9, 8)))
    assert code == EXHAUSTED and "hidden: 9 tokens exceed max_moe_tokens 8" in msg, msg
    assert cl.moe_forward("moe", "l0", torch.zeros(8, 8)).shape == (8, 8)
    # ... and a shard server's own limit on the token rows of one ExpertForward.
    from shoal.wire import pack
    m = cl.status().map
    uid = next(t.table_uid for md in m.models if md.name == "moe" for t in md.tables)
    code, msg = code_of(lambda: pbg.ShardServerStub(security.channel(
        c.servers[0].address, GRPC_OPTIONS)).ExpertForward(pb.ExpertForwardRequest(
            map_version=m.version, table_uid=uid, experts=pack(np.array([0], np.int32)),
            counts=pack(np.array([65], np.int64)), hidden=pack(np.zeros((65, 8), np.float32)),
            d_ff=16, gated=True), timeout=10))
    assert code == EXHAUSTED and "hidden: 65 token rows exceed max_expert_tokens 64" in msg, msg
    # No deadline: refused by name.
    code, msg = code_of(lambda: pbg.RouterStub(security.channel(c.router_address, GRPC_OPTIONS))
                        .Status(pb.StatusRequest()))
    assert code == INVALID and "deadline: none set" in msg, msg
    assert all(p.poll() is None for p in c._procs.values())
    after = stored(c, cl)
    torch.testing.assert_close(after[0], before[0])
    assert after[1:] == before[1:]


def test_calls_beyond_the_concurrency_limit_are_refused(limited):
    """With the only server stopped (SIGSTOP), lookups wait in the router: two fill its limit
    of 2 calls in flight and the third is RESOURCE_EXHAUSTED at once; once the server goes on,
    the two waiting ones are answered correctly."""
    c, cl, rows = limited
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.arange(4), torch.full((2,), 2))
    want = rows[:4].reshape(2, 2, D).sum(1)
    pid = c.servers[0].pid
    results: list = []
    from tests.test_metrics import scrape, value
    metrics = cl.status().router.metrics_address
    os.kill(pid, signal.SIGSTOP)
    try:
        waiting = [threading.Thread(target=lambda: results.append(
            shoal.connect(c.router_address, 30).lookup("lim", kjt).values())) for _ in range(2)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 10                  # until both wait in the router
        while value(scrape(metrics), "shoal_rpc_in_flight", role="router") < 2:
            assert time.monotonic() < deadline, "the lookups never reached the router"
            time.sleep(0.05)
        code, msg = code_of(lambda: shoal.connect(c.router_address, 5).lookup("lim", kjt))
        assert code == EXHAUSTED and "concurrent requests: 2 in flight, limit 2" in msg, msg
    finally:
        os.kill(pid, signal.SIGCONT)
    for t in waiting:
        t.join(30)
    assert len(results) == 2 and all(torch.allclose(r, want) for r in results)


def test_predict_streams_are_admitted_like_calls(secure):
    """``predict`` travels on a PredictStream: the stream is refused without credentials or
    with a token from another cluster, as a Predict call would be; a reader gets through."""
    cluster, certs, other, _ = secure
    ca = str(certs / "ca.pem")
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.arange(2),
                                              torch.ones(2, dtype=torch.int64))
    ask = lambda creds: shoal.connect(cluster.router_address, 10, creds).predict(  # noqa: E731
        "sec", torch.zeros(2, 1), kjt)
    c, msg = code_of(lambda: ask(Credentials.from_files(ca)))
    assert c == UNAUTH and "no credentials" in msg, msg
    c, msg = code_of(lambda: ask(Credentials.from_files(
        ca, token=make_token(key_of(other), "mallory", ["admin"]))))
    assert c == UNAUTH and "issued by another cluster" in msg, msg
    c, msg = code_of(lambda: ask(Credentials.from_files(
        ca, token=make_token(key_of(certs), "rita", ["query"]))))
    assert c not in (UNAUTH, DENIED) and "dense part" in msg, (c, msg)  # model "sec" has none


def test_calls_on_a_predict_stream_need_their_own_deadline(limited):
    c, _, _ = limited
    ch = security.channel(c.router_address, GRPC_OPTIONS, None)
    calls = [pb.PredictCall(id=7, request=pb.PredictRequest(sparse=pb.FeatureBatch(model="x"))),
             pb.PredictCall(id=8, timeout_s=5.0,
                            request=pb.PredictRequest(sparse=pb.FeatureBatch(model="nope")))]
    answers = {a.id: a for a in pbg.RouterStub(ch).PredictStream(iter(calls), timeout=30)}
    ch.close()
    assert answers[7].code == INVALID.value[0] and "timeout_s" in answers[7].message
    assert answers[8].code == grpc.StatusCode.NOT_FOUND.value[0] and "nope" in answers[8].message
