"""The local deployment: a coordinator, N shard servers and a router as processes on this
machine, each server with its own RocksDB directory under one data folder.

``LocalCluster`` is what the CLI (``shoal up``), the demo and the tests use. It is also how tests
inject faults: ``kill`` (SIGKILL / SIGSTOP / SIGCONT) and ``restart``.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from shoal.admin import Elastic
from shoal.config import ShoalConfig
from shoal.proto import shoal_pb2 as pb

READY_TIMEOUT_S = 120.0


@dataclass
class ProcessHandle:
    role: str              # "coordinator" | "server" | "router"
    name: str              # server_id for servers
    data_dir: str
    address: str = ""
    pid: int = 0
    port: int = 0

    @property
    def server_id(self) -> str:
        return self.name


class LocalCluster(Elastic):
    def __init__(self, servers: int = 3, replication: int = 0, data_dir: str | None = None,
                 config: ShoalConfig | None = None, start: bool = True, detach: bool = False,
                 routers: int = 1):
        """``replication`` 0 means the default: 2 when there are >= 2 servers, else 1.
        ``detach``: processes outlive this object (the CLI's ``shoal up``). ``routers``: how
        many routers (they hold nothing the coordinator cannot give them again; clients from
        ``client()`` spread their requests over all and move off one that fails)."""
        if routers < 1:
            raise ValueError(f"routers: {routers}; a cluster needs at least 1")
        self.num_routers = routers
        self.routers: list[ProcessHandle] = []
        self._owns_dir = data_dir is None
        self.data_dir = pathlib.Path(data_dir or tempfile.mkdtemp(prefix="shoal-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = config or ShoalConfig()
        self.num_servers = servers
        self.replication = replication or (2 if servers >= 2 else 1)
        self.detach = detach
        self.coordinator: ProcessHandle | None = None
        self.router: ProcessHandle | None = None
        self.servers: list[ProcessHandle] = []
        self.provisioner: ProcessHandle | None = None      # the autoscaler's hands (detached)
        self._provisioning: tuple[threading.Thread, threading.Event] | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        if start:
            self.start()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "LocalCluster":
        try:
            self.coordinator = self._spawn("coordinator", "coordinator", [
                "--replication", str(self.replication)])
            self._wait_ready(self.coordinator)
            for i in range(self.num_servers):
                self.servers.append(self._spawn("server", f"s{i}", []))
            for h in self.servers:
                self._wait_ready(h)
            self.routers = [self._spawn("router", "router" if i == 0 else f"router{i}", [])
                            for i in range(self.num_routers)]
            for h in self.routers:
                self._wait_ready(h)
            self.router = self.routers[0]
            self._save()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and remove a data folder we created."""
        self._stop_provisioning()
        handles = [h for h in [self.provisioner, *(self.routers or [self.router]),
                               *self.servers, self.coordinator] if h and h.pid]
        for h in handles:
            _signal(h.pid, signal.SIGCONT)
            _signal(h.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for h in handles:
            while _alive(h.pid, self._procs.get(h.name)) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(h.pid, self._procs.get(h.name)):
                _signal(h.pid, signal.SIGKILL)
                _wait(h.pid, self._procs.get(h.name))
        state = self.data_dir / "cluster.json"
        if state.exists():
            state.unlink()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------ addresses and clients
    @property
    def router_address(self) -> str:
        return self.router.address

    @property
    def router_addresses(self) -> list[str]:
        return [h.address for h in self.routers or [self.router]]

    @property
    def coordinator_address(self) -> str:
        return self.coordinator.address

    @property
    def credentials(self):
        """The operator's credentials (``shoal.security.Credentials``) for a cluster with
        security on: the cluster's own certificate (role cluster) and / or a token signed with
        its key; None when security is off."""
        from shoal.security import operator_credentials
        return operator_credentials(self.config.security)

    def client(self, timeout: float = 120.0, creds=None):
        from shoal.client import Client
        addresses = self.router_addresses
        return Client(addresses if len(addresses) > 1 else addresses[0], timeout,
                      creds or self.credentials)

    def server(self, server_id: str) -> ProcessHandle:
        for h in self.servers:
            if h.name == server_id:
                return h
        raise KeyError(f"no server {server_id!r} (servers: "
                       f"{', '.join(h.name for h in self.servers)})")

    # ------------------------------------------------------------ faults
    def kill(self, server_id: str, sig: int = signal.SIGKILL) -> None:
        h = self.server(server_id)
        os.kill(h.pid, sig)
        if sig == signal.SIGKILL:
            _wait(h.pid, self._procs.get(h.name))

    def restart(self, server_id: str) -> ProcessHandle:
        """Start a stopped (or killed) server again on its data folder and port."""
        h = self.server(server_id)
        if _alive(h.pid, self._procs.get(h.name)):
            self.kill(server_id)
        new = self._spawn("server", h.name, [], port=h.port)
        self._wait_ready(new)
        self.servers[self.servers.index(h)] = new
        self._save()
        return new

    def restart_coordinator(self) -> ProcessHandle:
        h = self.coordinator
        if _alive(h.pid, self._procs.get(h.name)):
            os.kill(h.pid, signal.SIGKILL)
            _wait(h.pid, self._procs.get(h.name))
        self.coordinator = self._spawn("coordinator", "coordinator", [
            "--replication", str(self.replication)], port=h.port)
        self._wait_ready(self.coordinator)
        self._save()
        return self.coordinator

    # ------------------------------------------------------------ resizing
    def admin(self):
        from shoal.admin import Admin
        return Admin(self.coordinator_address, creds=self.credentials)

    def add_server(self) -> ProcessHandle:
        """Start one more shard server (a fresh id and data folder); it joins empty. Call
        ``rebalance`` to move partitions onto it."""
        used = {h.name for h in self.servers} | {p.name for p in self.data_dir.glob("s*")}
        i = 0
        while f"s{i}" in used:
            i += 1
        h = self._spawn("server", f"s{i}", [])
        self._wait_ready(h)
        self.servers.append(h)
        self.num_servers = len(self.servers)
        self._save()
        return h

    def remove_server(self, server_id: str, timeout: float = 600.0, progress=None):
        """Drain ``server_id`` (its partitions move to the others while queries and writes go
        on), wait until it has deleted its copies, then stop its process and forget it.
        Returns its last stats (``stored_partitions`` 0)."""
        from shoal.admin import server_stats
        h = self.server(server_id)
        with self.admin() as admin:
            done = self._drained(admin, server_id, timeout, progress)
            deadline = time.monotonic() + 30
            while (last := server_stats(h.address, creds=self.credentials)).map_version < \
                    done.version or last.partitions or last.stored_partitions:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{server_id} still stores {last.stored_partitions} "
                                       "partitions after it was drained")
                time.sleep(0.1)
            self._stop_one(h)
            admin.remove_server(server_id)
        self.servers.remove(h)
        self.num_servers = len(self.servers)
        shutil.rmtree(pathlib.Path(h.data_dir) / "rocksdb", ignore_errors=True)
        self._save()
        return last

    def server_ids(self) -> list[str]:
        return [h.name for h in self.servers]

    def autoscale(self, min_servers: int, max_servers: int, memory_target: float = 0.0,
                  load_target: float = 0.0, band: float = 0.0, window_s: float = 0.0,
                  cooldown_s: float = 0.0, enabled: bool = True):
        """Turn on (or off, ``enabled=False``) autoscaling: the coordinator decides
        (``coordinator.autoscale``: targets for memory use, a share of each server's budget,
        and lookup load, ids/s per server; 0 = not used) and a provisioner starts and stops
        servers to follow it — a thread of this object, or for a detached cluster (``shoal
        up``) a process that ``stop`` ends. Returns the ``pb.AutoscaleStatus``."""
        from shoal.provisioner import Provisioner
        policy = pb.AutoscalePolicy(enabled=enabled, min_servers=min_servers,
                                    max_servers=max_servers, memory_target=memory_target,
                                    load_target=load_target, band=band, window_s=window_s,
                                    cooldown_s=cooldown_s)
        with self.admin() as admin:
            status = admin.set_autoscale(policy)
        self._stop_provisioning()
        if enabled and self.detach:
            # It names itself in cluster.json, which it keeps up to date from then on.
            self.provisioner = self._spawn("provisioner", "provisioner",
                                           ["--cluster-dir", str(self.data_dir)])
            self._wait_ready(self.provisioner)
        elif enabled:
            stop = threading.Event()
            t = threading.Thread(target=Provisioner(self, interval_s=0.5).run, args=(stop,),
                                 daemon=True, name="provisioner")
            t.start()
            self._provisioning = (t, stop)
        return status

    def _stop_provisioning(self) -> None:
        if self._provisioning is not None:
            t, stop = self._provisioning
            stop.set()
            t.join(60)
            self._provisioning = None
        if self.provisioner is not None and self.provisioner.pid:
            self._stop_one(self.provisioner)
            self.provisioner = None
            if (self.data_dir / "cluster.json").exists():     # the servers it left running
                self.servers = LocalCluster.attach(self.data_dir).servers
                self._save()

    def _stop_one(self, h: ProcessHandle) -> None:
        _signal(h.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(h.pid, self._procs.get(h.name)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(h.pid, self._procs.get(h.name)):
            _signal(h.pid, signal.SIGKILL)
            _wait(h.pid, self._procs.get(h.name))

    # ------------------------------------------------------------ processes
    def _spawn(self, role: str, name: str, extra: list[str], port: int = 0) -> ProcessHandle:
        data = self.data_dir / name
        proc = spawn_role(role, name, data, self.config.to_json(),
                          self.coordinator.address if role in ("server", "router") else "",
                          extra, port=port)
        self._procs[name] = proc
        return ProcessHandle(role, name, str(data), pid=proc.pid)

    def _wait_ready(self, h: ProcessHandle) -> None:
        h.address = wait_ready(self._procs[h.name], h.role, h.name, h.data_dir)
        h.port = int(h.address.rsplit(":", 1)[1])

    # ------------------------------------------------------------ remembered state (CLI)
    def _save(self) -> None:
        state = {"data_dir": str(self.data_dir), "replication": self.replication,
                 "config": self.config.to_json(),
                 "coordinator": asdict(self.coordinator), "router": asdict(self.router),
                 "routers": [asdict(h) for h in self.routers or [self.router]],
                 "servers": [asdict(h) for h in self.servers],
                 "provisioner": asdict(self.provisioner) if self.provisioner else None}
        (self.data_dir / "cluster.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def attach(cls, data_dir: str | os.PathLike) -> "LocalCluster":
        """A handle on a cluster started elsewhere (e.g. by ``shoal up``)."""
        state = json.loads((pathlib.Path(data_dir) / "cluster.json").read_text())
        c = cls(servers=len(state["servers"]), replication=state["replication"],
                data_dir=state["data_dir"], config=ShoalConfig.from_json(state["config"]),
                start=False, detach=True)
        c.coordinator = ProcessHandle(**state["coordinator"])
        c.router = ProcessHandle(**state["router"])
        c.routers = [ProcessHandle(**h) for h in state.get("routers", [state["router"]])]
        c.num_routers = len(c.routers)
        c.servers = [ProcessHandle(**h) for h in state["servers"]]
        if state.get("provisioner"):
            c.provisioner = ProcessHandle(**state["provisioner"])
        return c


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int, proc: subprocess.Popen | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(pid: int, proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is not None:
        proc.wait(timeout)
        return
    deadline = time.monotonic() + timeout
    while _alive(pid, None) and time.monotonic() < deadline:
        time.sleep(0.05)


MODULES = {"coordinator": "coordinator", "server": "shards", "router": "router",
           "provisioner": "shoal.provisioner"}


def spawn_role(role: str, name: str, data: pathlib.Path, config_json: str, coordinator: str,
               extra: list[str], host: str = "127.0.0.1", port: int = 0,
               die_with_parent: bool = False) -> subprocess.Popen:
    """Start one Shoal process (``python -m <role module>``) with its data folder ``data``
    (its log in ``process.log``). ``die_with_parent``: the kernel SIGKILLs it when the process
    that started it dies (a Ray actor hosting it), so it never outlives its host."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "ready.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", MODULES[role], "--data-dir", str(data), "--port", str(port),
           "--config", config_json, *extra]
    if role != "provisioner":
        cmd += ["--host", host]
    if role == "server":
        cmd += ["--server-id", name]
    if coordinator:
        cmd += ["--coordinator", coordinator]
    log = open(data / "process.log", "ab")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent if die_with_parent else None)
    log.close()
    return proc


def _die_with_parent() -> None:
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def wait_ready(proc: subprocess.Popen, role: str, name: str, data_dir) -> str:
    """The address a started process serves on, once it has written its ready.json."""
    ready = pathlib.Path(data_dir) / "ready.json"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{role} {name} exited with code {proc.returncode} before it was "
                               f"ready; log:\n{_tail(str(data_dir))}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{role} {name} not ready after {READY_TIMEOUT_S}s; "
                               f"log:\n{_tail(str(data_dir))}")
        time.sleep(0.05)
    return json.loads(ready.read_text())["address"]


def _tail(data_dir: str, lines: int = 30) -> str:
    log = pathlib.Path(data_dir) / "process.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""
