"""``client.moe_forward`` through a real 3-server cluster (replication 2) equals the plain
PyTorch reference blocks of ``tests/test_experts.py`` (written from the published Mixtral,
Qwen2-MoE and DeepSeek-V3 code) with the same weights: every gating variant, float32 and
bfloat16 (stored and run in bfloat16 on the servers), 1 to 4096 tokens (a single token leaves most experts idle), the router's routing and
the caller's own. Then the failure and bad-input cases: a server SIGKILLed between requests,
and refusals that name the field."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch

import shoal
from shoal.errors import ShoalError
from tests.faults import errors_while_stopped
from tests.test_experts import (D_FF, D_MODEL, DTYPES, E, FIRM_MARGIN, FP32_ATOL, FP32_RTOL,
                                TOKEN_COUNTS, VARIANTS, assert_bf16_close, assert_not_worse,
                                firm_hidden, lib_weights, make_hidden, make_refs, make_spec, random_routing)

MODELS = {"float32": "moe32", "bfloat16": "moe16"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with shoal.LocalCluster(servers=3, replication=2,
                            data_dir=str(tmp_path_factory.mktemp("moe"))) as c:
        client = c.client(timeout=120)
        for dtype, model in MODELS.items():
            layers = []
            for variant in sorted(VARIANTS):
                ref32, ref16, _ = make_refs(variant)
                layers.append((make_spec(variant, dtype),
                               lib_weights(ref32 if dtype == "float32" else ref16)))
            client.put_expert_layers(model, layers)
        yield c, client
        client.close()


def _check(got, variant, dtype, x, ids=None, w=None):
    """``got`` equals the reference block on every token of ``x`` (bf16 inputs with the
    router's routing come from ``firm_hidden``: no token is left out as a near tie)."""
    ref32, ref16, ref32r = make_refs(variant)
    T = x.shape[0]
    with torch.no_grad():
        if dtype == "float32":
            want = ref32(x) if ids is None else ref32(x, ids, w)
            assert got.dtype == torch.float32 and got.shape == (T, D_MODEL)
            torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=FP32_ATOL)
            return
        x16 = x.to(torch.bfloat16)
        want16 = ref16(x16) if ids is None else ref16(x16, ids, w)
        want32 = ref32r(x16.float()) if ids is None else ref32r(x16.float(), ids, w)
        if ids is None:
            assert (ref16.route(x16)[2] > FIRM_MARGIN).all(), "an input with near ties"
    assert got.dtype == torch.bfloat16 and got.shape == (T, D_MODEL)
    what = f"{variant} bf16 T={T}"
    assert_bf16_close(got, want16, what, min_rows=T)
    assert_not_worse(got, want16, want32, what)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_forward_equals_the_reference_block(cluster, variant, dtype):
    _, client = cluster
    _, ref16, _ = make_refs(variant)
    for T in TOKEN_COUNTS:
        x = make_hidden(T, seed=10_000 + T) if dtype == "float32" else \
            firm_hidden(ref16, T, seed=10_000 + T)
        xin = x if dtype == "float32" else x.to(torch.bfloat16)
        timings = {}
        got = client.moe_forward(MODELS[dtype], variant, xin, timings=timings)
        _check(got, variant, dtype, x)
        assert set(timings) == {"gate", "dispatch", "servers", "expert_compute", "combine",
                                "batching", "batch_requests"}
        assert timings["servers"] >= timings["expert_compute"] > 0


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_forward_with_the_callers_routing(cluster, variant, dtype):
    _, client = cluster
    spec = make_spec(variant, dtype)
    x = make_hidden(513, seed=30_000)
    ids, w = random_routing(513, spec.top_k, E, seed=31)
    has5 = (ids == 5).any(dim=1)
    ids[~has5, 0] = 5                 # expert 5 in every token (still distinct per token)
    xin = x if dtype == "float32" else x.to(torch.bfloat16)
    got = client.moe_forward(MODELS[dtype], variant, xin, expert_ids=ids, expert_weights=w)
    _check(got, variant, dtype, x, ids, w)
    got32 = client.moe_forward(MODELS[dtype], variant, xin, expert_ids=ids.int(),
                               expert_weights=w)
    assert torch.equal(got, got32)


def _refused(call, code, *words):
    with pytest.raises(ShoalError) as e:
        call()
    assert e.value.code == code, e.value
    for w in words:
        assert w in e.value.message, e.value.message
    return e.value.message


def test_bad_moe_requests_name_the_field(cluster):
    _, client = cluster
    x = make_hidden(4, seed=1)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    _refused(lambda: client.moe_forward("moe32", "mixtral", torch.randn(4, D_MODEL + 1)), bad,
             "hidden", f"d_model={D_MODEL}")
    nan = x.clone()
    nan[2, 3] = float("inf")
    _refused(lambda: client.moe_forward("moe32", "mixtral", nan), bad, "hidden", "finite")
    _refused(lambda: client.moe_forward("moe32", "mixtral", x.to(torch.bfloat16)), bad,
             "hidden", "float32")
    ids = torch.zeros(4, 2, dtype=torch.int64)
    ids[1, 1] = E
    _refused(lambda: client.moe_forward("moe32", "mixtral", x, expert_ids=ids,
                                        expert_weights=torch.ones(4, 2)), bad,
             "expert_ids", f"expert {E}")
    _refused(lambda: client.moe_forward("moe32", "mixtral", x, expert_ids=ids[:, :1],
                                        expert_weights=torch.ones(4, 2)), bad,
             "expert_weights", "shape")
    _refused(lambda: client.moe_forward("moe32", "mixtral", x,
                                        expert_ids=torch.zeros(4, 2, dtype=torch.int64),
                                        expert_weights=torch.full((4, 2), float("nan"))),
             bad, "expert_weights", "finite")
    _refused(lambda: client.moe_forward("moe32", "mixtral", x,
                                        expert_ids=torch.zeros(4, E + 1, dtype=torch.int64),
                                        expert_weights=torch.ones(4, E + 1)),
             bad, "expert_ids", f"top_k {E + 1}", f"{E} experts")
    _refused(lambda: client.moe_forward("moe32", "nope", x), grpc.StatusCode.NOT_FOUND,
             "layer", "'nope'", "mixtral")
    _refused(lambda: client.moe_forward("moe32", "mixtral", x, version=9),
             grpc.StatusCode.NOT_FOUND, "version 9")


def test_top_k_beyond_the_experts_is_refused():
    from experts.specs import ExpertLayerSpec
    with pytest.raises(ShoalError) as e:
        ExpertLayerSpec("l", num_experts=4, d_model=8, d_ff=8, top_k=5).validate()
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k: 5" in e.value.message


def _concurrently(calls: list, timeout: float = 120.0) -> list:
    """Run each call in its own thread, released together; their results (or the
    ShoalError each raised), in order."""
    barrier = threading.Barrier(len(calls))
    out: list = [None] * len(calls)

    def go(i, call):
        barrier.wait()
        try:
            out[i] = call()
        except ShoalError as e:
            out[i] = e
    threads = [threading.Thread(target=go, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads)
    return out


def _expert_loads(c, client, model: str, layer: str) -> np.ndarray:
    """Tokens each expert of ``layer`` ran, summed over the servers' own counts."""
    from shoal.admin import server_stats
    from shoal.wire import unpack
    md = next(m for m in client.models() if m.name == model and m.current)
    uid = next(t.table_uid for t in md.tables if t.name == f"moe.{layer}")
    total = np.zeros(E, np.int64)
    for s in c.servers:
        for tl in server_stats(s.address).table_loads:
            if tl.table_uid == uid:
                total += unpack(tl.ids_looked_up, "ids", "int64", 1)
    return total


@pytest.mark.parametrize("dtype", DTYPES)
def test_concurrent_callers_are_merged_and_each_equals_its_call_alone(cluster, dtype):
    """Decode-shaped callers of different sizes at once, one with its own routing and one
    invalid: the router merges them (``batch_requests`` > 1 in their timings), the invalid
    one alone fails, and every other output equals the same call made alone (float32 within
    1e-5: a row's matrix product depends in its last bits on how many rows run beside it,
    as in any batched GEMM; bfloat16 within the reference tolerance) and the reference."""
    c, client = cluster
    sizes = [1, 2, 3, 4, 7, 16]
    # Every variant in float32; in bfloat16 one of each gating (softmax + renormalise,
    # softmax, sigmoid groups).
    variants = sorted(VARIANTS) if dtype == "float32" else \
        ["mixtral", "qwen2_moe", "deepseek_v3"]
    for variant in variants:
        spec = make_spec(variant, dtype)
        _, ref16, _ = make_refs(variant)
        xs = [make_hidden(n, seed=50_000 + n) if dtype == "float32" else
              firm_hidden(ref16, n, seed=50_000 + n) for n in sizes]
        ins = [x if dtype == "float32" else x.to(torch.bfloat16) for x in xs]
        ids, w = random_routing(3, spec.top_k, E, seed=52)
        routed = {2: (ids, w)}                       # the 3-token caller routes itself
        bad = torch.full_like(ins[0], float("nan"))

        def call(i, timings=None):
            r = routed.get(i, (None, None))
            return client.moe_forward(MODELS[dtype], variant, ins[i], expert_ids=r[0],
                                      expert_weights=r[1], timings=timings)
        alone = [call(i) for i in range(len(sizes))]
        timings = [{} for _ in sizes]
        loads0 = _expert_loads(c, client, MODELS[dtype], variant)
        before = client.status().router
        got = _concurrently([lambda i=i: call(i, timings[i]) for i in range(len(sizes))]
                            + [lambda: client.moe_forward(MODELS[dtype], variant, bad)])
        after = client.status().router
        assert isinstance(got[-1], ShoalError) and \
            got[-1].code == grpc.StatusCode.INVALID_ARGUMENT and "finite" in got[-1].message
        assert max(t["batch_requests"] for t in timings) > 1, timings
        assert after.moe_merged > before.moe_merged
        assert after.moe_requests - before.moe_requests == len(sizes)
        # The servers counted the merged calls' tokens per expert (what hot-expert
        # replication and the status page's heat map read): each call's routing, summed.
        if dtype == "float32":
            from experts.gating import route
            ref32, _, _ = make_refs(variant)
            lw = lib_weights(ref32)
            want = sum(np.bincount((routed[i][0] if i in routed else
                                    route(spec, lw.gate, xs[i], lw.bias)[0]).reshape(-1),
                                   minlength=E) for i in range(len(sizes)))
            np.testing.assert_array_equal(
                _expert_loads(c, client, MODELS[dtype], variant) - loads0, want)
        for i, n in enumerate(sizes):
            r = routed.get(i, (None, None))
            _check(got[i], variant, dtype, xs[i], *r)
            if dtype == "float32":
                torch.testing.assert_close(got[i], alone[i], rtol=1e-5, atol=1e-5)
            else:
                assert_bf16_close(got[i], alone[i], f"{variant} merged vs alone T={n}",
                                  min_rows=n)


def test_moe_forward_survives_a_killed_server(tmp_path):
    """Replication 2 on 3 servers: 8 decode-shaped callers (4 tokens a call, merged by the
    router) and one sending 256 tokens a call, while a server is SIGKILLed: every expert still
    has a replica, the router moves each piece the dead server held to the other, no call
    fails and every output equals the reference."""
    variant, dtype = "mixtral", "float32"
    ref32, _, _ = make_refs(variant)
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path / "c")) as c:
        client = c.client(timeout=120)
        client.put_expert_layers("m", [(make_spec(variant, dtype), lib_weights(ref32))])
        x = make_hidden(256, seed=7)
        _check(client.moe_forward("m", variant, x), variant, dtype, x)
        stop = threading.Event()

        def caller(j, tokens):
            k = 0
            while not stop.is_set() and k < 400:
                xi = make_hidden(tokens, seed=1_000 * j + k)
                _check(client.moe_forward("m", variant, xi, timeout=30), variant, dtype, xi)
                k += 1
            return k
        killer = threading.Timer(1.5, lambda: c.kill(c.servers[1].server_id))
        ender = threading.Timer(3.5, stop.set)
        killer.start()
        ender.start()
        got = _concurrently([lambda j=j: caller(j, 4) for j in range(8)]
                            + [lambda: caller(99, 256)])
        assert all(isinstance(n, int) and n > 0 for n in got), got    # none failed
        assert client.status().router.moe_merged > 0
        assert np.all(np.isfinite(client.moe_forward("m", variant, x).numpy()))
        client.close()


def test_a_moe_forward_past_its_deadline_fails_whole(tmp_path):
    """With the only server stopped (SIGSTOP), a moe_forward with a 0.5 s deadline gets
    DEADLINE_EXCEEDED from the router in about that time, never a partial output; once the
    server goes on, the same tokens are answered correctly."""
    variant, dtype = "mixtral", "float32"
    ref32, _, _ = make_refs(variant)
    with shoal.LocalCluster(servers=1, replication=1, data_dir=str(tmp_path / "c")) as c:
        client = c.client(timeout=120)
        client.put_expert_layers("m", [(make_spec(variant, dtype), lib_weights(ref32))])
        x = make_hidden(64, seed=3)
        _check(client.moe_forward("m", variant, x), variant, dtype, x)
        [(e, took)] = errors_while_stopped(
            c.servers[0].pid, lambda: client.moe_forward("m", variant, x, timeout=0.5))
        assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline" in e.message and "moe_forward of 64 tokens" in e.message
        assert 0.4 < took < 2.0, took
        _check(client.moe_forward("m", variant, x, timeout=60), variant, dtype, x)
        client.close()


def test_pieces_split_an_experts_tokens_across_its_live_replicas():
    from router.moe import MIN_PIECE_TOKENS as M, _pieces
    from shoal.errors import Unavailable
    counts = np.array([5, 0, 3, 1])
    replicas = np.array([[0, 1], [1, 2], [2, -1], [0, 2]], np.int32)
    todo = np.ones(4, bool)
    got = _pieces(counts, todo, replicas, set(), rotation=0, layer="l")
    # Few tokens: each expert whole on one replica (a piece costs a read of its weights),
    # the biggest first, each on its least loaded live replica: expert 0's 5 slots on server
    # 0 (a tie, rotation 0), expert 2's on 2 (its only one), expert 3's on 2 (3 < 5).
    assert got == [(0, 0, 0, 5), (2, 2, 5, 3), (2, 3, 8, 1)]
    got = _pieces(counts, todo, replicas, {0}, rotation=1, layer="l")
    assert got == [(1, 0, 0, 5), (2, 2, 5, 3), (2, 3, 8, 1)]
    only2 = np.array([False, False, True, False])
    assert _pieces(counts, only2, replicas, set(), 0, "l") == [(2, 2, 5, 3)]
    with pytest.raises(Unavailable, match="expert 2 of layer 'l' has no live replica"):
        _pieces(counts, todo, replicas, {2}, 0, "l")
    # Many tokens: one piece per replica, none under MIN_PIECE_TOKENS, sizes within one.
    three = np.array([[0, 1, 2]])
    assert _pieces(np.array([2 * M + 1]), np.ones(1, bool), three, set(), 0, "l") == \
        [(0, 0, 0, M + 1), (1, 0, M + 1, M)]
    assert _pieces(np.array([3 * M + 2]), np.ones(1, bool), three, set(), 1, "l") == \
        [(1, 0, 0, M + 1), (2, 0, M + 1, M + 1), (0, 0, 2 * M + 2, M)]


def test_an_expert_layer_needs_its_table(cluster):
    import dataclasses

    from experts.layout import table_for
    from shoal.proto import shoal_pb2 as pb
    _, client = cluster
    spec = make_spec("mixtral", "float32")
    table = table_for(spec)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    for tables, words in (([], ("'moe.mixtral'",)),
                          ([dataclasses.replace(table, dim=D_MODEL // 2)], ("dim", "32"))):
        md = pb.ModelSpec(name="bad", tables=[t.to_proto() for t in tables] +
                          [pb.TableSpec(name="other", num_embeddings=4, dim=4, dtype="float32",
                                       pooling="sum")],
                          expert_layers=[spec.to_proto(table.name)])
        _refused(lambda: client.create_model_spec(md), bad, "expert_layers", *words)
    md = pb.ModelSpec(name="bad", tables=[table.to_proto()],
                      expert_layers=[dataclasses.replace(spec, top_k=E + 1).to_proto(table.name)])
    _refused(lambda: client.create_model_spec(md), bad, "top_k")
    assert "bad" not in {m.name for m in client.models()}


def test_bfloat16_tables_store_rows_exactly(cluster):
    """A bfloat16 layer's experts are stored as bfloat16 (half the bytes) and read back bit
    for bit; a plain bfloat16 table writes, reads and pools through both replicas."""
    import torch.nn.functional as F

    from embeddings.specs import TableSpec
    from experts.layout import expert_row_ids, unpack_expert
    _, client = cluster
    md = next(m for m in client.models() if m.name == "moe16")
    assert {t.dtype for t in md.tables} == {"bfloat16"}
    spec = make_spec("mixtral", "bfloat16")
    w = lib_weights(make_refs("mixtral")[1])
    rows = client.lookup_rows("moe16", "moe.mixtral", expert_row_ids(spec, 6))
    assert rows.dtype == torch.bfloat16
    w1, w2, w3 = unpack_expert(spec, rows)
    assert torch.equal(w1, w.w1[6]) and torch.equal(w2, w.w2[6]) and torch.equal(w3, w.w3[6])

    client.create_model("b16", [TableSpec("t", 1000, 16, dtype="bfloat16", pooling="sum",
                                          feature_names=("f",))])
    table = torch.randn(1000, 16).to(torch.bfloat16)
    client.write_rows("b16", "t", torch.arange(1000), table)
    assert torch.equal(client.lookup_rows("b16", "t", torch.arange(1000)), table)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    ids = torch.tensor([3, 999, 3, 500, 7])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids,
                                              lengths=torch.tensor([2, 3]))
    got = client.lookup("b16", kjt).values()
    want = F.embedding_bag(ids, table.float(), torch.tensor([0, 2]), mode="sum")
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    _refused(lambda: client.moe_forward("moe16", "mixtral", torch.randn(3, D_MODEL)),
             grpc.StatusCode.INVALID_ARGUMENT, "hidden", "bfloat16")


def test_the_router_times_every_moe_stage(cluster):
    from tests.test_metrics import scrape, value
    _, client = cluster
    before = scrape(client.status().router.metrics_address)
    for T in (3, 40):
        client.moe_forward("moe32", "mixtral", make_hidden(T, seed=T))
    after = scrape(client.status().router.metrics_address)
    for stage in ("gate", "dispatch", "servers", "expert_compute", "combine"):
        n = value(after, "shoal_router_stage_seconds_count", path="moe", stage=stage) - \
            value(before, "shoal_router_stage_seconds_count", path="moe", stage=stage)
        assert n == 2, stage
    assert value(after, "shoal_model_requests_total", model="moe32", version="1",
                 rpc="MoeForward", code="OK") >= 2


def test_moe_forward_with_experts_partly_cold(tmp_path):
    """Memory for about a third of the experts each server holds: ``moe_forward`` through the
    router equals the reference Mixtral block at every token count, and the servers' counters
    show experts served both from memory and from RocksDB."""
    import time
    from shards.tiers import budget_for_rows
    expert_bytes = 3 * D_MODEL * D_FF * 4                       # gated: w1, w2, w3 in float32
    held = E * 2 // 3                                           # replication 2 on 3 servers
    cfg = shoal.ShoalConfig().replace(server__memory_budget_bytes=budget_for_rows(
        expert_bytes * held // 3), server__heartbeat_interval_s=0.25)
    ref32, _, _ = make_refs("mixtral")
    with shoal.LocalCluster(servers=3, replication=2, config=cfg,
                            data_dir=str(tmp_path / "c")) as c:
        client = c.client(timeout=120)
        client.put_expert_layers("cold", [(make_spec("mixtral", "float32"),
                                           lib_weights(ref32))])
        for T in TOKEN_COUNTS:
            x = make_hidden(T, seed=20_000 + T)
            _check(client.moe_forward("cold", "mixtral", x), "mixtral", "float32", x)
        time.sleep(0.8)                                         # the servers' counters
        for s in client.status().map.servers:
            assert 0 < s.stats.resident_bytes < held * expert_bytes, s.stats
            assert s.stats.cold_ids > 0, s.stats
        client.close()
