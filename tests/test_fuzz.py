"""Fuzzing: random and mutated protobuf messages (``tests.fuzzing``) against every RPC of a
live cluster, for a bounded number of calls: no process crashes or hangs, no call ends in an
unhandled error (UNKNOWN, INTERNAL) or a timeout, and the data of a model the fuzzer never
names is unchanged, checksum for checksum, on both replicas.

Three callers. A query-role token sends to every method of every service: every method above
its role must answer PERMISSION_DENIED whatever the bytes (the role is checked before the
request is parsed), and no method of its role may. A cluster-role token (Shoal's own
processes' role: it may do everything) sends to every method except the coordinator's
membership and placement commands (a random Register or SetReplicas is not hostile input but an
order, which the role checks keep from anyone else), with names and table_uids steered to a
sacrificial model. And a cluster-role token sends only those orders, to a cluster of their own:
whatever they order, they are handled (no unhandled error, no hang, no dead process), the map
stays well formed, and a restarted coordinator reads back the same map.
"""
from __future__ import annotations

import collections
import os
import signal
import time

import grpc
import pytest
import torch
from google.protobuf import message_factory
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import UnsatisfiedAssumption

import shoal
from embeddings.specs import TableSpec
from shoal import security
from shoal.admin import server_checksums
from shoal.proto import shoal_pb2 as pb
from shoal.serving import GRPC_OPTIONS
from tests.fuzzing import Names, message, mutate

# Calls per caller (a count, not a time: hypothesis needs every example to draw the same
# way each time). About a minute on 2 cores; SHOAL_FUZZ_SCALE multiplies them.
SCALE = float(os.environ.get("SHOAL_FUZZ_SCALE", "1"))
QUERY_CALLS, CLUSTER_CALLS, ORDER_CALLS = int(800 * SCALE), int(2200 * SCALE), int(1000 * SCALE)
UNHANDLED = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.DEADLINE_EXCEEDED}
ORDERS = {f"/shoal.v1.Coordinator/{m}" for m in (
    "Register", "Heartbeat", "ReportFailure", "ReplicaReady", "SetReplicas", "RemoveServer",
    "Drain", "CancelMoves", "SplitTable", "SetAutoscale", "Rebalance", "RebalanceExperts")} | \
    {"/shoal.v1.Router/RebalanceExperts"}
SERVICES = {s.name: s for s in pb.DESCRIPTOR.services_by_name.values()}
METHODS = [(s.name, f"/shoal.v1.{s.name}/{m.name}", message_factory.GetMessageClass(m.input_type))
           for s in SERVICES.values() for m in s.methods]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    key = root / "token.key"
    key.write_text(os.urandom(32).hex())
    cfg = shoal.ShoalConfig().replace(security__token_key_file=str(key),
                                      security__max_message_bytes=4 << 20)
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(root / "c"),
                            config=cfg) as cluster:
        op = cluster.client(timeout=30)
        op.create_model("keep", [TableSpec("t", 256, 8, feature_names=("f",))])
        rows = torch.randn(256, 8)
        op.write_rows("keep", "t", torch.arange(256), rows)
        op.create_model("fuzz", [TableSpec("t", 64, 4, feature_names=("g",)),
                                 TableSpec("s", 32, 4, pooling="mean", feature_names=("h",))])
        m = op.status().map
        uids = {md.name: [t.table_uid for t in md.tables] for md in m.models}
        names = Names(models=("fuzz", "nope"), tables=("t", "s"),
                      table_uids=tuple(uids["fuzz"]), servers=tuple(s.server_id for s in m.servers),
                      addresses=tuple(s.address for s in m.servers),
                      avoid_uids=frozenset(uids["keep"]))
        yield cluster, op, rows, names, key.read_bytes().decode().strip()
        op.close()


def least_role(method: str) -> str:
    rule = security.RULES[method]
    return rule.least if isinstance(rule, security.ByRequest) else rule


def keep_state(cluster, op):
    m = op.status().map
    uid = next(t.table_uid for md in m.models if md.name == "keep" for t in md.tables)
    parts = sorted(rs.partition for rs in m.partitions if rs.table_uid == uid)
    sums = [server_checksums(s.address, uid, parts, creds=cluster.credentials)[0].tolist()
            for s in cluster.servers]
    return op.lookup_rows("keep", "t", torch.arange(256)).clone(), sums


def addresses(cluster) -> dict[str, list[str]]:
    return {"Router": [cluster.router_address], "Coordinator": [cluster.coordinator_address],
            "ShardServer": [s.address for s in cluster.servers]}


def run_fuzz(cluster, token: str, names: Names, methods, check, examples: int):
    creds = security.Credentials(token=token)
    where = addresses(cluster)
    channels = {a: security.channel(a, GRPC_OPTIONS, creds) for al in where.values() for a in al}
    seen: collections.Counter = collections.Counter()

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data):
        try:
            one_call(data)
        except UnsatisfiedAssumption:  # hypothesis's own control flow: it draws again
            raise
        except Exception as e:          # the fuzzer's own bug: reported, not replayed
            import traceback
            failures.append("fuzzer: " + "".join(traceback.format_exception(e))[-1500:])

    def one_call(data):
        service, method, cls = data.draw(st.sampled_from(methods))
        address = data.draw(st.sampled_from(where[service]))
        msg = message(data.draw, cls, names)
        raw = msg.SerializeToString()
        mutated = data.draw(st.booleans())
        if mutated:
            raw = mutate(data.draw, raw)
        stream = method.endswith("/ReadPartition")          # the one server-streaming RPC
        ch = channels[address]
        call = (ch.unary_stream if stream else ch.unary_unary)(
            method, request_serializer=None, response_deserializer=None)
        try:
            reply = call(raw, timeout=10)
            if stream:
                for _ in reply:
                    pass
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        seen[(method, code.name)] += 1
        # Failures are collected, not raised: hypothesis would replay the example, and with a
        # time budget a replay need not draw the same.
        what = f"{method} ({'mutated ' if mutated else ''}{msg!r:.400}) -> {code.name}: " \
               f"{details[:300]}"
        if code in UNHANDLED:
            failures.append(what)
        elif not check(method, msg, mutated, code):
            failures.append("wrong code: " + what)

    failures: list[str] = []
    one()
    assert not failures, f"{len(failures)} bad answers; first: {failures[:3]}"
    return seen


def test_fuzz_every_rpc_changes_nothing_it_may_not(target):
    cluster, op, rows, names, key_hex = target
    key = bytes.fromhex(key_hex)
    before = keep_state(cluster, op)
    torch.testing.assert_close(before[0], rows)
    assert before[1][0] == before[1][1]

    def as_query(method, msg, mutated, code) -> bool:
        """Above the query role: PERMISSION_DENIED, mutated bytes or not; at it: never."""
        return (code == grpc.StatusCode.PERMISSION_DENIED) != (least_role(method) == "query")

    t0 = time.monotonic()
    q = run_fuzz(cluster, security.make_token(key, "fuzz-q", ["query"]), names, METHODS,
                 as_query, QUERY_CALLS)
    full = [m for m in METHODS if m[1] not in ORDERS]
    c = run_fuzz(cluster, security.make_token(key, "fuzz-c", ["cluster"]), names, full,
                 lambda *a: True, CLUSTER_CALLS)
    print(f"\nfuzzed {sum(q.values())} calls as query, {sum(c.values())} as cluster in "
          f"{time.monotonic() - t0:.0f} s; codes: "
          f"{collections.Counter(k[1] for k in (q + c).elements())}")
    assert sum(q.values()) > 100 and sum(c.values()) > 100
    denied = {k[0] for k in q if k[1] == "PERMISSION_DENIED"}
    above = {m for _, m, _ in METHODS if least_role(m) != "query"}
    assert len(denied) >= len(above) * 0.9 and denied <= above   # and each was refused
    assert len({k[0] for k in c}) >= len(full) * 0.9        # nearly every method was reached

    assert all(p.poll() is None for p in cluster._procs.values()), "a process died"
    after = keep_state(cluster, op)
    torch.testing.assert_close(after[0], before[0])
    assert after[1] == before[1]
    # ... and the cluster still serves.
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.arange(6), torch.full((3,), 2))
    torch.testing.assert_close(op.lookup("keep", kjt).values(), rows[:6].reshape(3, 2, 8).sum(1))


def test_atheris_fuzzes_the_parsers_of_untrusted_bytes():
    """Coverage-guided (libFuzzer) runs over the bulk parser, tensor validation and token
    verification, in-process (tests/fuzz/atheris_parsers.py); only where atheris installs."""
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    import pathlib
    import subprocess
    import sys
    harness = pathlib.Path(__file__).parent / "fuzz" / "atheris_parsers.py"
    out = subprocess.run([sys.executable, str(harness), "-atheris_runs=50000"],
                         capture_output=True, text=True, timeout=240,
                         cwd=pathlib.Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done 50000 " in out.stderr, \
        out.stderr[-1000:]


# ------------------------------------------------------------------ the orders, on their own
def map_is_well_formed(m: pb.ShardMap) -> None:
    servers = [s.server_id for s in m.servers]
    assert len(set(servers)) == len(servers), servers
    known = set(servers)
    tables = {(t.table_uid, t.num_partitions) for md in m.models for t in md.tables}
    uids = {uid for uid, _ in tables}
    for rs in m.partitions:
        where = f"partition {rs.partition} of table {rs.table_uid}: {rs}"
        assert rs.table_uid in uids, where
        assert len(set(rs.replicas)) == len(rs.replicas), where
        assert not set(rs.learners) & set(rs.replicas), where
        assert set(rs.replicas) | set(rs.learners) <= known, where
        assert rs.epoch >= 1, where
    for uid, parts in tables:
        held = sorted(rs.partition for rs in m.partitions if rs.table_uid == uid)
        assert held == list(range(parts)), f"table {uid}: partitions {held} of {parts}"
    for mv in m.moves:
        assert mv.source in known and mv.target in known, mv


@pytest.fixture(scope="module")
def orders_target(tmp_path_factory):
    from experts.specs import ExpertLayerSpec, ExpertLayerWeights
    root = tmp_path_factory.mktemp("orders")
    key = os.urandom(32)
    (root / "token.key").write_text(key.hex())
    cfg = shoal.ShoalConfig().replace(security__token_key_file=str(root / "token.key"))
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(root / "c"),
                            config=cfg) as cluster:
        op = cluster.client(timeout=30)
        op.create_model("m", [TableSpec("t", 512, 8, feature_names=("f",)),
                              TableSpec("s", 128, 4, feature_names=("g",))])
        op.write_rows("m", "t", torch.arange(512), torch.randn(512, 8))
        spec = ExpertLayerSpec(name="l0", num_experts=4, d_model=8, d_ff=16, top_k=2)
        g = torch.Generator().manual_seed(3)
        op.put_expert_layers("x", [(spec, ExpertLayerWeights(
            gate=torch.randn(4, 8, generator=g), w1=torch.randn(4, 16, 8, generator=g),
            w2=torch.randn(4, 8, 16, generator=g), w3=torch.randn(4, 16, 8, generator=g)))])
        m = op.status().map
        names = Names(models=("m", "x", "nope"), tables=("t", "s"),
                      table_uids=tuple(t.table_uid for md in m.models for t in md.tables),
                      servers=tuple(s.server_id for s in m.servers) + ("s9",),
                      addresses=tuple(s.address for s in m.servers))
        yield cluster, op, names, key
        op.close()


def test_fuzz_membership_and_placement_orders(orders_target):
    """Register, Heartbeat, SetReplicas, Drain, RemoveServer, SplitTable, Rebalance, ... with
    random and mutated arguments from the cluster role, the one role allowed to give them."""
    cluster, op, names, key = orders_target
    before = op.status().map
    orders = [m for m in METHODS if m[1] in ORDERS]
    assert len(orders) == len(ORDERS)
    seen = run_fuzz(cluster, security.make_token(key, "fuzz-o", ["cluster"]), names, orders,
                    lambda *a: True, ORDER_CALLS)
    print(f"\nfuzzed {sum(seen.values())} orders; codes: "
          f"{collections.Counter(k[1] for k in seen.elements())}")
    assert {k[0] for k in seen} == ORDERS                    # every order was given
    assert sum(n for k, n in seen.items() if k[1] == "OK") > 20  # and many were carried out
    assert all(p.poll() is None for p in cluster._procs.values()), "a process died"
    m = op.status().map
    assert m.version > before.version
    map_is_well_formed(m)
    # The coordinator's durable state reads back as the map it served, once nothing is in
    # flight (no moves, splits or autoscaling left to change it meanwhile).
    with cluster.admin() as admin:
        admin.set_autoscale(pb.AutoscalePolicy())
        pre = settled(admin)
    os.kill(cluster.coordinator.pid, signal.SIGKILL)
    cluster.restart_coordinator()
    with cluster.admin() as admin:
        again = admin.shard_map()
    map_is_well_formed(again)
    assert again.version == pre.version
    assert again.partitions == pre.partitions and again.models == pre.models
    assert [(s.server_id, s.address, s.draining) for s in again.servers] == \
        [(s.server_id, s.address, s.draining) for s in pre.servers]


def settled(admin, quiet_s: float = 2.0, timeout: float = 60.0) -> pb.ShardMap:
    """Cancel splits and moves and undrain every server (what the orders left the coordinator
    doing; an order refused while another is in flight is given again), then the map once its
    version has held still for ``quiet_s``."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        m = admin.shard_map()
        try:
            for sp in m.splits:
                admin.cancel_split(sp.model, sp.table)
            if m.moves:
                admin.cancel()
            for s in m.servers:
                if s.draining:
                    admin.drain(s.server_id, undrain=True)
        except shoal.ShoalError as e:
            assert e.code == grpc.StatusCode.FAILED_PRECONDITION, e
            since = time.monotonic()
        if last is None or m.version != last.version:
            last, since = m, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return m
        assert time.monotonic() < deadline, f"the map never settled: {m.moves} {m.splits}"
        time.sleep(0.2)
