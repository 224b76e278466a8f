"""Shoal on a Ray cluster (``shoal.raycluster``): a local multi-node Ray cluster
(``ray.cluster_utils.Cluster``, a head and 2 worker nodes, RAY_AUTH_MODE=disabled), one shard
server per node as a Ray actor. Lookups equal a local torchrec EmbeddingBagCollection; no
partition has two replicas on one node; removing a node under load fails no query and the
replication factor comes back on the remaining nodes; a new node joins and the cluster resizes
onto it. The clients speak gRPC only."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

import shoal  # noqa: E402
from embeddings.synthetic import random_kjt  # noqa: E402
from tests.oracle import fill_from_oracle  # noqa: E402


@pytest.fixture(scope="module")
def ray_nodes():
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, namespace="shoal-test", log_to_driver=False)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def _tables(rows=2000, dim=8):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows,
                               feature_names=[f"f{i}"]) for i in range(3)]


def _node_of(cluster_map) -> dict[str, str]:
    return {s.server_id: s.domain for s in cluster_map.servers}


def _assert_apart(m) -> None:
    node = _node_of(m)
    for rs in m.partitions:
        nodes = [node[s] for s in rs.replicas]
        assert len(set(nodes)) == len(nodes), (rs, nodes)


class Queries:
    """Clients querying through the router, each answer checked against the oracle."""

    def __init__(self, address, ebc, features, sizes):
        self.address, self.ebc, self.features, self.sizes = address, ebc, features, sizes
        self.ok, self.failed, self.wrong = 0, [], 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(2)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self, seed):
        rng = np.random.default_rng(seed)
        c = shoal.connect(self.address, timeout=60)
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            kjt = random_kjt(rng, self.features, self.sizes, 32, 4)
            try:
                got = c.lookup("m", kjt).values()
            except shoal.ShoalError as e:
                self.failed.append(e)
                continue
            with torch.no_grad():
                want = self.ebc(kjt).values()
            if torch.allclose(got, want, atol=1e-5):
                self.ok += 1
            else:
                self.wrong += 1
        c.close()


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


def test_a_shoal_cluster_on_ray_nodes_survives_losing_one_and_grows(ray_nodes, tmp_path):
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from shoal.raycluster import RayCluster, alive_nodes
    cluster, workers = ray_nodes
    tables = _tables()
    ebc = EmbeddingBagCollection(tables=tables)
    features = [t.feature_names[0] for t in tables]
    sizes = [t.num_embeddings for t in tables]
    cfg = shoal.ShoalConfig().replace(coordinator__lease_s=2.0,
                                      server__heartbeat_interval_s=0.25)
    nodes = alive_nodes()
    assert len(nodes) == 3
    with RayCluster(servers=3, replication=2, data_dir=str(tmp_path), config=cfg,
                    name="t1") as rc:
        assert sorted(s["node_id"] for s in rc.servers) == sorted(nodes)   # one per node
        client = rc.client()
        client.create_model("m", tables)
        fill_from_oracle(client, "m", ebc)
        m = client.status().map
        assert {s.server_id: s.domain for s in m.servers} == \
            {s["name"]: s["node_id"] for s in rc.servers}
        _assert_apart(m)
        rng = np.random.default_rng(0)
        for _ in range(5):
            kjt = random_kjt(rng, features, sizes, 32, 4)
            torch.testing.assert_close(client.lookup("m", kjt).values(), ebc(kjt).values(),
                                       atol=1e-5, rtol=0)

        # A worker node goes away under load.
        victim = next(s for s in rc.servers if s["node_id"] != nodes[0])
        with Queries(rc.router_address, ebc, features, sizes) as q:
            time.sleep(1.0)
            node = next(w for w in workers if w.node_id == victim["node_id"])
            cluster.remove_node(node)
            workers.remove(node)

            def restored():
                m = client.status().map
                return all(len(rs.replicas) == 2 and not rs.learners and
                           victim["name"] not in rs.replicas for rs in m.partitions)
            _wait(restored, 120, "the replication factor to come back")
            time.sleep(1.0)
        assert not q.failed, q.failed[:3]
        assert q.wrong == 0 and q.ok > 10
        m = client.status().map
        _assert_apart(m)
        assert {s.state for s in m.servers if s.server_id == victim["name"]} == {"dead"}
        rc.forget_node(victim["node_id"])

        # A new node joins; the cluster grows onto it while queries run.
        fresh = cluster.add_node(num_cpus=1)
        workers.append(fresh)
        _wait(lambda: fresh.node_id in alive_nodes(), 60, "the new node")
        with Queries(rc.router_address, ebc, features, sizes) as q:
            info = rc.add_server(fresh.node_id)
            assert info["node_id"] == fresh.node_id
            rc.rebalance(timeout=180)
        assert not q.failed and q.wrong == 0 and q.ok > 0
        m = client.status().map
        assert any(info["name"] in rs.replicas for rs in m.partitions)
        _assert_apart(m)
        client.close()
