"""Shoal on a Ray cluster (``shoal.raycluster``): a local multi-node Ray cluster
(``ray.cluster_utils.Cluster``, a head and 2 worker nodes, RAY_AUTH_MODE=disabled), one shard
server per node as a Ray actor. Lookups equal a local torchrec EmbeddingBagCollection; no
partition has two replicas on one node; removing a node under load fails no query and the
replication factor comes back on the remaining nodes; a new node joins and the cluster resizes
onto it. The clients speak gRPC only."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray's loopback-only mode: every node (and so every Shoal process) binds 127.0.0.1, where
# Ray would otherwise take the machine's address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")

import shoal  # noqa: E402
from embeddings.synthetic import random_kjt  # noqa: E402
from tests.ckpt_fixtures import EBC_PREFIX, write_safetensors_index  # noqa: E402
from tests.traffic import Workers  # noqa: E402

LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def ray_nodes():
    from ray.cluster_utils import Cluster
    for attempt in range(2):
        # Ray's own start-up can time out on a loaded 2-core machine ("The current node timed
        # out during startup": its GCS did not answer a node lookup in 30 s although the
        # raylet had registered; or "Timed out waiting for file .../gcs_server_port_...")
        # for the head node as for the others; a second, fresh cluster is tried before
        # giving up. (The first node added is the head.)
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=1, include_dashboard=False,
                             resources={"shoal_server": 1})
            workers = [cluster.add_node(num_cpus=1, resources={"shoal_server": 1})
                       for _ in range(2)]
            break
        except Exception as e:
            cluster.shutdown()
            if attempt or "timed out" not in str(e).lower():
                raise
    assert cluster.address.startswith(LOOPBACK + ":")
    ray.init(address=cluster.address, namespace="shoal-test", log_to_driver=False)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def _tables(rows=2000, dim=8):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows,
                               feature_names=[f"t{i}"]) for i in range(3)]   # as `load` names them


def _node_of(cluster_map) -> dict[str, str]:
    return {s.server_id: s.domain for s in cluster_map.servers}


def _assert_apart(m) -> None:
    node = _node_of(m)
    for rs in m.partitions:
        nodes = [node[s] for s in rs.replicas]
        assert len(set(nodes)) == len(nodes), (rs, nodes)


class Queries(Workers):
    """Clients querying through the router, each answer checked against the oracle."""

    def __init__(self, address, ebc, features, sizes):
        self.address, self.ebc, self.features, self.sizes = address, ebc, features, sizes
        self.ok, self.failed, self.wrong = 0, [], 0
        super().__init__(2, join_s=60)

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
                    name="t1", server_resources={"shoal_server": 1}) as rc:
        assert sorted(s["node_id"] for s in rc.servers) == sorted(nodes)   # one per node
        assert all(s["address"].startswith(LOOPBACK + ":") for s in rc.servers)
        assert rc.router_address.startswith(LOOPBACK + ":")
        client = rc.client()
        # The model's tables saved as a sharded safetensors checkpoint, loaded with `load`:
        # every chunk goes straight to the replicas on their nodes.
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        with torch.no_grad():
            weights = {f"{EBC_PREFIX}{n}.weight": b.weight.detach().clone()
                       for n, b in ebc.embedding_bags.items()}
        write_safetensors_index(str(ckpt), {f"part-{i}.safetensors": {k: weights[k]}
                                            for i, k in enumerate(sorted(weights))})
        res = client.load(str(ckpt), model="m", chunk_bytes=16 << 10)
        assert res.tables == {t.name: t.num_embeddings for t in tables}
        m = client.status().map
        assert {s.server_id: s.domain for s in m.servers} == \
            {s["name"]: s["node_id"] for s in rc.servers}
        _assert_apart(m)
        rng = np.random.default_rng(0)
        for _ in range(5):
            kjt = random_kjt(rng, features, sizes, 32, 4)
            torch.testing.assert_close(client.lookup("m", kjt).values(), ebc(kjt).values(),
                                       atol=1e-5, rtol=0)

        # A shard server process crashes: its actor ends with it, Ray restarts the actor, and
        # the server comes back on its data folder, at a new pid.
        crashed = next(s for s in rc.servers if s["node_id"] != nodes[0])
        os.kill(crashed["pid"], 9)

        def back():
            try:
                info = ray.get(rc._actors[crashed["name"]].info.remote(), timeout=5)
            except Exception:
                return False
            st = {s.server_id: s.state for s in client.status().map.servers}
            return info["pid"] != crashed["pid"] and st[crashed["name"]] == "alive"
        _wait(back, 90, "the crashed server to be restarted by Ray")
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
        # Its replicas may be rebuilt (a leader reports it unreachable) before its lease runs
        # out; then the coordinator declares it dead too.
        _wait(lambda: {s.state for s in client.status().map.servers
                       if s.server_id == victim["name"]} == {"dead"}, 30,
              "the lost node's server to be declared dead")
        _assert_apart(client.status().map)
        rc.forget_node(victim["node_id"])

        # A new node joins; the cluster grows onto it while queries run.
        fresh = cluster.add_node(num_cpus=1, resources={"shoal_server": 1})
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


def test_shoal_up_on_ray_and_resize_from_the_command_line(ray_nodes, tmp_path):
    """``shoal up --ray ADDRESS``, ``status``, ``resize`` and ``down`` drive a cluster of
    detached actors; ``status`` reaches the router with gRPC alone."""
    import subprocess
    import sys
    cluster, _ = ray_nodes
    env = dict(os.environ, SHOAL_HOME=str(tmp_path / "home"))
    data = str(tmp_path / "state")

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "shoal.cli", *args, "--data-dir", data],
                             env=env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    up = cli("up", "--ray", cluster.address, "--servers", "2", "--replication", "2",
             "--ray-name", "cli", "--ray-data-dir", str(tmp_path / "nodes"))
    assert "2 servers on Ray nodes" in up and "router: 127.0.0.1:" in up
    from embeddings.specs import TableSpec
    client = shoal.connect(up.split("router: ")[1].split()[0])
    client.create_model("c", [TableSpec("t", 1000, 8, num_partitions=8)])
    rows = torch.randn(1000, 8)
    client.write_rows("c", "t", torch.arange(1000), rows)
    st = cli("status")
    assert sum(ln.split()[1] == "alive" for ln in st.splitlines()
               if ln.startswith("s") and len(ln.split()) > 1) == 2
    grown = cli("resize", "--servers", "3")
    assert "2 -> 3 servers on Ray" in grown
    from shoal.raycluster import RayCluster
    rc = RayCluster.attach("cli")
    assert len(rc.servers) == 3 and len({s["node_id"] for s in rc.servers}) == 3
    assert any("s2" in rs.replicas for rs in client.status().map.partitions)   # moved onto
    shrunk = cli("resize", "--servers", "2")             # s2 drained, then its actor ended
    assert "3 -> 2 servers on Ray" in shrunk
    rc = RayCluster.attach("cli")
    assert sorted(s["name"] for s in rc.servers) == ["s0", "s1"]
    m = client.status().map
    assert all("s2" not in rs.replicas for rs in m.partitions)
    assert "s2" not in {s.server_id for s in m.servers}
    torch.testing.assert_close(client.lookup_rows("c", "t", torch.arange(1000)), rows,
                               rtol=0, atol=0)
    client.close()
    down = cli("down")
    assert "stopped the cluster 'cli' on Ray" in down
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if n.startswith("cli-")]
