"""Prometheus metrics from every process of a real local cluster: each serves /metrics on its
own port, listed in the shard map and the router's status; under a known workload the
router's counters equal the requests sent (per RPC and status code, and per model and version),
its latency histograms counted every one, and the servers and the coordinator count theirs."""
from __future__ import annotations

import time
import urllib.request

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import shoal
from embeddings.specs import TableSpec
from embeddings.synthetic import random_kjt


def scrape(address: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one /metrics endpoint."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_equal_the_requests_sent(tmp_path):
    cfg = shoal.ShoalConfig().replace(router__hedge=False)    # every id read exactly once
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c"),
                            config=cfg) as cluster:
        client = cluster.client()
        client.create_model("m", [TableSpec("t", 1000, 8, feature_names=("f",))])
        client.write_rows("m", "t", torch.arange(1000), torch.randn(1000, 8))
        rng = np.random.default_rng(0)
        ids_sent = 0
        for _ in range(25):
            kjt = random_kjt(rng, ["f"], [1000], 16, 3)
            client.lookup("m", kjt)
            ids_sent += kjt.values().numel()
        bad = random_kjt(rng, ["f"], [1000], 4, 2)
        for _ in range(3):
            with pytest.raises(shoal.ShoalError):
                client.lookup("nope", bad)
        st = client.status()
        m = st.map
        ends = [st.router.metrics_address, m.coordinator_metrics_address] + \
            [s.metrics_address for s in m.servers]
        assert all(a.startswith("127.0.0.1:") for a in ends) and len(set(ends)) == 4

        r = scrape(st.router.metrics_address)
        assert value(r, "shoal_rpc_requests_total", role="router", method="Lookup",
                     code="OK") == 25
        assert value(r, "shoal_rpc_requests_total", role="router", method="Lookup",
                     code="NOT_FOUND") == 3
        assert value(r, "shoal_rpc_seconds_count", role="router", method="Lookup") == 28
        assert value(r, "shoal_rpc_requests_total", role="router", method="WriteRows",
                     code="OK") == 1
        assert value(r, "shoal_model_requests_total", model="m", version="1", rpc="Lookup",
                     code="OK") == 25
        assert value(r, "shoal_model_requests_total", model="nope", version="current",
                     rpc="Lookup", code="NOT_FOUND") == 3
        assert value(r, "shoal_model_requests_total", model="m", version="1", rpc="WriteRows",
                     code="OK") == 1

        # Each server answered lookups, and the coordinator took their heartbeats. Every
        # server holds the whole table (replication 2 on 2): 1000 rows x 32 bytes, all of it
        # in the memory tier; between them they served every id sent, once.
        served = 0
        for s in m.servers:
            samples = scrape(s.metrics_address)
            assert value(samples, "shoal_server_rows") == 1000
            assert value(samples, "shoal_server_raw_bytes") == 1000 * 32
            tier = value(samples, "shoal_server_memory_bytes", kind="memory_tier")
            assert abs(tier - 32000) <= 0.1 * 32000, tier
            assert value(samples, "shoal_server_cold_ids_total") == 0
            served += value(samples, "shoal_server_ids_total")
            per = sum(v for (n, _), v in samples.items() if n == "shoal_partition_ids_total")
            assert per == value(samples, "shoal_server_ids_total")
            assert value(samples, "shoal_rpc_requests_total", role="server",
                         method="LookupPooled", code="OK") > 0
            assert value(samples, "shoal_rpc_seconds_count", role="server",
                         method="LookupPooled") == value(
                samples, "shoal_rpc_requests_total", role="server", method="LookupPooled",
                code="OK")
        assert served == ids_sent
        # Replication: each leader waited on its peer once per write it sent, no catch-ups,
        # and the peer counted as many Replicate calls.
        a, b = (scrape(s.metrics_address) for s in m.servers)
        ids = [s.server_id for s in m.servers]
        for mine, other, peer in ((a, b, ids[1]), (b, a, ids[0])):
            sent = value(mine, "shoal_replication_seconds_count", peer=peer)
            assert sent == value(other, "shoal_rpc_requests_total", role="server",
                                 method="Replicate", code="OK") >= 1
            assert value(mine, "shoal_replication_catch_ups_total", peer=peer) == 0
        # Bytes in and out: the one WriteRows request held 1000 ids (int64) and 1000 rows.
        w_in = value(r, "shoal_rpc_bytes_total", role="router", method="WriteRows",
                     direction="in")
        assert 1000 * (8 + 32) <= w_in <= 1000 * (8 + 32) + 512, w_in
        # ... and each OK lookup's reply: 16 pooled float32 rows of 8, plus framing.
        out = value(r, "shoal_rpc_bytes_total", role="router", method="Lookup", direction="out")
        assert 25 * 16 * 32 <= out <= 25 * (16 * 32 + 64), out
        assert all(value(scrape(s.metrics_address), "shoal_server_memory_tier_hit_ratio") == 1
                   for s in m.servers)
        c = scrape(m.coordinator_metrics_address)
        assert value(c, "shoal_cluster_servers", state="alive") == 2
        assert value(c, "shoal_cluster_partitions") == 4
        assert value(c, "shoal_cluster_moves") == 0
        loads = [k for k in c if k[0] == "shoal_partition_load"]
        assert sorted(dict(k[1])["partition"] for k in loads) == ["0", "1", "2", "3"] and \
            all(dict(k[1])["table"] == "t" for k in loads), loads
        assert value(c, "shoal_rpc_requests_total", role="coordinator", method="Heartbeat",
                     code="OK") > 0
        assert value(c, "shoal_rpc_requests_total", role="coordinator", method="CreateModel",
                     code="OK") == 1
        client.close()


def test_the_grafana_dashboard_only_uses_metrics_shoal_exports(tmp_path):
    """deploy/grafana/shoal.json parses, and every metric its queries name is exported by a
    live cluster's processes (a renamed metric would leave a panel empty)."""
    import json
    import pathlib
    import re
    dash = json.loads((pathlib.Path(__file__).parents[1] / "deploy/grafana/shoal.json")
                      .read_text())
    used = {m for p in dash["panels"] for t in p["targets"]
            for m in re.findall(r"shoal_[a-z_]+", t["expr"])}
    assert len(used) >= 10
    with shoal.LocalCluster(servers=1, replication=1, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client()
        st = client.status()
        names = set()
        for a in [st.router.metrics_address, st.map.coordinator_metrics_address] + \
                [s.metrics_address for s in st.map.servers]:
            with urllib.request.urlopen(f"http://{a}/metrics", timeout=10) as r:
                names |= {f.name for f in text_string_to_metric_families(r.read().decode())}
        client.close()
    exported = names | {n + s for n in names for s in ("_total", "_bucket", "_count", "_sum")}
    assert used <= exported, sorted(used - exported)


def test_a_request_gets_its_trace_and_slow_ones_are_logged(tmp_path):
    """A lookup that asks for its timing breakdown gets it with the answer; with the slow
    threshold at 0 every request is slow, and the router logs one with its stages."""
    import pathlib
    import time
    cfg = shoal.ShoalConfig().replace(router__slow_request_ms=0.0)
    with shoal.LocalCluster(servers=1, replication=1, data_dir=str(tmp_path / "c"),
                            config=cfg) as cluster:
        client = cluster.client()
        client.create_model("m", [TableSpec("t", 100, 4, feature_names=("f",))])
        rng = np.random.default_rng(1)
        t = {}
        kjt = random_kjt(rng, ["f"], [100], 8, 2)
        client.lookup("m", kjt, timings=t)
        assert set(t) == {"batching", "merge", "fan_out", "servers", "combine", "pool_split",
                          "total", "batch_requests"}
        assert t["batch_requests"] >= 1 and all(v >= 0 for v in t.values())
        assert t["fan_out"] > 0 and t["combine"] > 0
        assert t["total"] >= t["servers"] > 0
        client.lookup("m", kjt)                     # without asking: timed, nothing sent
        r = scrape(client.status().router.metrics_address)
        assert value(r, "shoal_router_stage_seconds_count", path="lookup", stage="servers") == 2
        log = pathlib.Path(cluster.router.data_dir) / "process.log"
        deadline = time.monotonic() + 10
        while "slow request" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        line = next(ln for ln in log.read_text().splitlines() if "slow request" in ln)
        assert f"lookup of {kjt.values().numel()} ids, model m v1" in line, line
        assert "servers" in line and "batching" in line
        client.close()


def test_cost_per_model_and_occupancy_under_a_known_workload(tmp_path):
    """Two models, queries to one: its queries/s, CPU and bytes per 1,000 queries (every query
    reads 32 rows of 64 bytes), the other's none; memory held per model is every replica of
    its rows; each server's memory tier is its share of the (16 MiB) budget."""
    import subprocess
    import sys
    import threading

    from shoal.cost import measure
    cfg = shoal.ShoalConfig().replace(router__hedge=False, server__memory_budget_bytes=16 << 20)
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c"),
                            config=cfg) as cluster:
        client = cluster.client()
        client.create_model("a", [TableSpec("ta", 2048, 16, feature_names=("fa",))])
        client.create_model("b", [TableSpec("tb", 1024, 8, feature_names=("fb",))])
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["fa"], values=torch.arange(32) * 61,
                                                  lengths=torch.full((8,), 4))
        stop = threading.Event()

        def load():
            c = shoal.connect(cluster.router_address)
            while not stop.is_set():
                c.lookup("a", kjt)
            c.close()
        t = threading.Thread(target=load, daemon=True)
        t.start()
        time.sleep(1.0)
        costs, uses = measure(client, 3.0)
        stop.set()
        t.join(30)
        by = {c.model: c for c in costs}
        a, b = by["a"], by["b"]
        assert a.queries_per_s > 10 and a.cpu_s_per_1k > 0
        assert abs(a.bytes_per_1k - 32 * 64 * 1000) <= 0.1 * 32 * 64 * 1000, a.bytes_per_1k
        assert b.queries_per_s == 0 and b.cpu_s_per_1k is None
        assert a.memory_bytes == 2048 * 64 * 2 and b.memory_bytes == 1024 * 32 * 2
        # Every row fits memory: each server holds both tables whole, and reads no row from
        # disk; the model not queried read nothing.
        assert a.in_memory_bytes == 2048 * 64 * 2 and b.in_memory_bytes == 1024 * 32 * 2
        assert a.miss_share == 0.0 and b.miss_share is None
        held = (2048 * 64 + 1024 * 32) / (16 << 20)          # each server holds both, whole
        for u in uses:
            assert abs(u.memory_share - held) <= 0.1 * held, u
            assert 0 < u.disk_share < 1, u
            assert 0 < u.cpu_share < 2.5
        out = subprocess.run([sys.executable, "-m", "shoal.cli", "cost", "--seconds", "1",
                              "--address", cluster.router_address], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "CPU-s/1k q" in out.stdout and "memory tier / budget" in out.stdout
        assert "MiB in memory" in out.stdout and "disk / capacity" in out.stdout
        client.close()
