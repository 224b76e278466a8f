"""Shoal on a Ray cluster: the coordinator, the shard servers and the router, each hosted by a
named, detached Ray actor that runs the same process as the local backend on its node.

Each actor (``RoleHost``) starts its role's process on its node with a node-local data folder
(``<data_dir>/<node id>/<name>``: a server's RocksDB lives on the node's own disk), bound to
the node's IP, and ties the two together: the process gets SIGKILL from the kernel if the
actor's process dies (a lost node takes both), and the actor exits if the process dies, so
Ray restarts it (``max_restarts``) and the server comes back on its data folder. Actors are
pinned to their node (hard node affinity): a server never wanders to another node's disk. A
shard server's failure domain is its node (``server.domain``), so the coordinator keeps a
partition's replicas on distinct nodes, and a lost node is a failover like any lost server.

Clients talk gRPC to the router's address (``RayCluster.router_address``); they need no Ray.
Ray is used for placement and lifecycle only, never on the data path.
"""
from __future__ import annotations

import os
import pathlib
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shoal.admin import Elastic
from shoal.config import ShoalConfig
from shoal.local import spawn_role, wait_ready

NAMESPACE = "shoal"


@ray.remote(num_cpus=0, max_restarts=-1)
class RoleHost:
    """One Shoal process on this actor's node (see the module doc)."""

    def __init__(self, role: str, name: str, data_dir: str, config_json: str,
                 coordinator: str = "", extra: tuple = (), port: int = 0):
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.host = ray.util.get_node_ip_address()
        cfg = ShoalConfig.from_json(config_json)
        if role == "server":
            cfg = cfg.replace(server__domain=self.node_id)
        self.role, self.name = role, name
        self.data = pathlib.Path(data_dir) / self.node_id[:16] / name
        self.proc = spawn_role(role, name, self.data, cfg.to_json(), coordinator, list(extra),
                               host=self.host, port=port, die_with_parent=True)
        self.address = wait_ready(self.proc, role, name, self.data)
        self._stopping = False
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        """The process died without being told to: end this actor so Ray restarts it."""
        self.proc.wait()
        if not self._stopping:
            os._exit(1)

    def info(self) -> dict:
        return {"role": self.role, "name": self.name, "address": self.address,
                "node_id": self.node_id, "pid": self.proc.pid, "data_dir": str(self.data)}

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the process (SIGKILL after ``timeout``); its exit code."""
        self._stopping = True
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except Exception:
            self.proc.kill()
            return self.proc.wait()


def connect_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address`` ("" or None: the one this machine runs, "auto")
    from this driver, unless already connected."""
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)


def alive_nodes() -> list[str]:
    """Node ids of the live Ray nodes, the head (this driver's node) first."""
    here = ray.get_runtime_context().get_node_id()
    ids = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    return sorted(ids, key=lambda n: n != here)


class RayCluster(Elastic):
    """A Shoal cluster on the Ray cluster this process is connected to (``ray.init`` first).

    ``servers`` shard servers spread over the live nodes in turn (or on ``nodes``, node ids);
    the coordinator and the router on this driver's node. ``name`` prefixes the actors' names
    (namespace "shoal"), so ``RayCluster.attach(name)`` finds them from another driver.
    ``router_port``: a fixed port for the router (0: any free one). ``server_resources``: Ray
    resources each shard server actor reserves on its node (e.g. ``{"CPU": 1, "shoal": 1}``),
    so Ray accounts for them and refuses a node that has no room."""

    def __init__(self, servers: int = 3, replication: int = 0, data_dir: str = "/tmp/shoal-ray",
                 config: ShoalConfig | None = None, name: str = "shoal",
                 nodes: list[str] | None = None, router_port: int = 0,
                 server_resources: dict | None = None, start: bool = True):
        self.name = name
        self.data_dir = data_dir
        self.config = config or ShoalConfig()
        self.num_servers = servers
        self.replication = replication or (2 if servers >= 2 else 1)
        self.nodes = nodes
        self.router_port = router_port
        self.server_resources = dict(server_resources or {})
        self.coordinator: dict | None = None
        self.router: dict | None = None
        self.servers: list[dict] = []
        self._actors: dict[str, ray.actor.ActorHandle] = {}
        if start:
            self.start()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "RayCluster":
        try:
            here = ray.get_runtime_context().get_node_id()
            self.coordinator = self._host("coordinator", "coordinator", here,
                                          extra=("--replication", str(self.replication)))
            nodes = self.nodes or alive_nodes()
            pending = [(f"s{i}", nodes[i % len(nodes)]) for i in range(self.num_servers)]
            self.servers = self._host_many("server", pending)
            self.router = self._host("router", "router", here, port=self.router_port)
        except BaseException:
            self.stop()
            raise
        return self

    @classmethod
    def attach(cls, name: str = "shoal", data_dir: str = "/tmp/shoal-ray") -> "RayCluster":
        """A handle on a cluster started by another driver (e.g. ``shoal up --ray``), found by
        its actors' names."""
        c = cls(name=name, data_dir=data_dir, start=False)
        prefix = f"{name}-"
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] != NAMESPACE or not entry["name"].startswith(prefix):
                continue
            role_name = entry["name"][len(prefix):]
            actor = ray.get_actor(entry["name"], namespace=NAMESPACE)
            try:
                info = ray.get(actor.info.remote(), timeout=30)
            except Exception:               # on a node that is gone
                continue
            c._actors[role_name] = actor
            if info["role"] == "coordinator":
                c.coordinator = info
            elif info["role"] == "router":
                c.router = info
            else:
                c.servers.append(info)
        if c.coordinator is None or c.router is None:
            raise LookupError(f"no Shoal cluster named {name!r} on this Ray cluster")
        c.servers.sort(key=lambda s: int(s["name"][1:]))
        c.num_servers = len(c.servers)
        return c

    def stop(self) -> None:
        """Stop every process, then end the actors (their data folders stay on the nodes)."""
        for name in ["router"] + [s["name"] for s in self.servers] + ["coordinator"]:
            actor = self._actors.pop(name, None)
            if actor is None:
                continue
            try:
                ray.get(actor.stop.remote(), timeout=30)
            except Exception:              # a lost node, an actor already gone
                pass
            ray.kill(actor, no_restart=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------ addresses and clients
    @property
    def router_address(self) -> str:
        return self.router["address"]

    @property
    def coordinator_address(self) -> str:
        return self.coordinator["address"]

    @property
    def credentials(self):
        """As ``LocalCluster.credentials``: the cluster's own, where security is on."""
        from shoal.security import operator_credentials
        return operator_credentials(self.config.security)

    def client(self, timeout: float = 120.0, creds=None):
        from shoal.client import Client
        return Client(self.router_address, timeout, creds or self.credentials)

    def admin(self):
        from shoal.admin import Admin
        return Admin(self.coordinator_address, creds=self.credentials)

    def server(self, server_id: str) -> dict:
        for s in self.servers:
            if s["name"] == server_id:
                return s
        raise KeyError(f"no server {server_id!r} (servers: "
                       f"{', '.join(s['name'] for s in self.servers)})")

    # ------------------------------------------------------------ resizing
    def add_server(self, node_id: str | None = None) -> dict:
        """One more shard server, on ``node_id`` (default: the live node with the fewest);
        it joins empty: ``rebalance`` moves partitions onto it."""
        used = {s["name"] for s in self.servers}
        i = next(i for i in range(len(used) + 1) if f"s{i}" not in used)
        if node_id is None:
            count = {n: 0 for n in alive_nodes()}
            for s in self.servers:
                if s["node_id"] in count:
                    count[s["node_id"]] += 1
            node_id = min(count, key=lambda n: (count[n], n))
        (info,) = self._host_many("server", [(f"s{i}", node_id)])
        self.servers.append(info)
        return info

    def server_ids(self) -> list[str]:
        return [s["name"] for s in self.servers]

    def remove_server(self, server_id: str, timeout: float = 600.0, progress=None) -> None:
        """Drain ``server_id`` (its partitions move to the others while the cluster serves),
        then stop its process and actor and forget it."""
        with self.admin() as admin:
            self._drained(admin, server_id, timeout, progress)
            actor = self._actors.pop(server_id)
            ray.get(actor.stop.remote(), timeout=30)
            ray.kill(actor, no_restart=True)
            admin.remove_server(server_id)
        self.servers = [s for s in self.servers if s["name"] != server_id]

    def forget_node(self, node_id: str) -> list[str]:
        """Drop the handles of the servers that lived on a node that is gone (the coordinator
        has already failed them over); returns their ids."""
        gone = [s["name"] for s in self.servers if s["node_id"] == node_id]
        for name in gone:
            actor = self._actors.pop(name, None)
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.servers = [s for s in self.servers if s["node_id"] != node_id]
        return gone

    # ------------------------------------------------------------ actors
    def _host(self, role: str, name: str, node_id: str, extra: tuple = (),
              port: int = 0) -> dict:
        return self._host_many(role, [(name, node_id)], extra, port)[0]

    def _host_many(self, role: str, names_nodes: list[tuple[str, str]],
                   extra: tuple = (), port: int = 0) -> list[dict]:
        """Start the actors at once, then wait for all of them."""
        coord = self.coordinator["address"] if role != "coordinator" else ""
        actors = []
        res = dict(self.server_resources) if role == "server" else {}
        cpus = res.pop("CPU", 0)
        for name, node in names_nodes:
            actor = RoleHost.options(
                num_cpus=cpus, resources=res or None,
                name=f"{self.name}-{name}", namespace=NAMESPACE, lifetime="detached",
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(role, name, self.data_dir, self.config.to_json(), coord, extra, port)
            self._actors[name] = actor
            actors.append(actor)
        deadline = time.monotonic() + 180
        return [ray.get(a.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
                for a in actors]
