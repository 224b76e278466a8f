"""Prometheus metrics from every process of a real local cluster: each serves /metrics on its
own port, listed in the shard map and the router's status; under a known workload the
router's counters equal the requests sent (per RPC and status code, and per model and version),
its latency histograms counted every one, and the servers and the coordinator count theirs."""
from __future__ import annotations

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
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client()
        client.create_model("m", [TableSpec("t", 1000, 8, feature_names=("f",))])
        client.write_rows("m", "t", torch.arange(1000), torch.randn(1000, 8))
        rng = np.random.default_rng(0)
        for _ in range(25):
            client.lookup("m", random_kjt(rng, ["f"], [1000], 16, 3))
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

        # Each server answered lookups, and the coordinator took their heartbeats.
        for s in m.servers:
            samples = scrape(s.metrics_address)
            assert value(samples, "shoal_rpc_requests_total", role="server",
                         method="LookupPooled", code="OK") > 0
            assert value(samples, "shoal_rpc_seconds_count", role="server",
                         method="LookupPooled") == value(
                samples, "shoal_rpc_requests_total", role="server", method="LookupPooled",
                code="OK")
        c = scrape(m.coordinator_metrics_address)
        assert value(c, "shoal_rpc_requests_total", role="coordinator", method="Heartbeat",
                     code="OK") > 0
        assert value(c, "shoal_rpc_requests_total", role="coordinator", method="CreateModel",
                     code="OK") == 1
        client.close()
