"""The local backend's provisioner: it makes the cluster's processes follow the autoscaler.

The coordinator decides (``coordinator.autoscale``): it raises ``desired_servers`` to scale
out, and drains the servers that should leave to scale in. This loop starts a server while
fewer than ``desired_servers`` are serving, and stops (and forgets) a draining server once it
holds nothing. ``LocalCluster.autoscale`` runs it in a thread; for a cluster started with
``shoal up``, ``shoal autoscale`` runs it as a process (``python -m shoal.provisioner``) that
``shoal down`` stops. A Ray backend provides the same two operations.
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import threading
from typing import Protocol

from shoal.proto import shoal_pb2 as pb

log = logging.getLogger("shoal.provisioner")


class Backend(Protocol):
    def add_server(self): ...
    def remove_server(self, server_id: str, timeout: float = 600.0, progress=None): ...
    def admin(self): ...
    def server_ids(self) -> list[str]: ...


class Provisioner:
    def __init__(self, backend: Backend, interval_s: float = 1.0):
        self._backend = backend
        self._interval = interval_s
        self.actions: list[str] = []

    def step(self) -> list[str]:
        """One look at the map, and at most one server started or stopped."""
        with self._backend.admin() as admin:
            m = admin.shard_map()
        st = m.autoscale
        if not st.policy.enabled:
            return []
        mine = set(self._backend.server_ids())
        serving = [s for s in m.servers if s.state == "alive" and not s.draining]
        if len(serving) < st.desired_servers:
            h = self._backend.add_server()
            return self._did(f"started {h.name} ({len(serving) + 1} of "
                             f"{st.desired_servers} servers wanted)")
        for s in m.servers:
            if s.draining and s.server_id in mine and not _holds(m, s.server_id) \
                    and not m.moves:
                self._backend.remove_server(s.server_id)
                return self._did(f"stopped {s.server_id} (drained by the autoscaler)")
        return []

    def _did(self, what: str) -> list[str]:
        log.info("%s", what)
        self.actions.append(what)
        return [what]

    def run(self, stop: threading.Event, alive=lambda: True) -> None:
        """Step every interval until ``stop`` is set or ``alive()`` is false."""
        while not stop.wait(self._interval) and alive():
            try:
                self.step()
            except Exception as e:            # the coordinator may be restarting; go on
                log.warning("provisioner step failed: %s", e)


def _holds(m: pb.ShardMap, server_id: str) -> bool:
    return any(server_id in rs.replicas or server_id in rs.learners for rs in m.partitions)


def main() -> None:
    from shoal.local import LocalCluster, ProcessHandle
    from shoal.serving import write_ready

    ap = argparse.ArgumentParser(prog="python -m shoal.provisioner")
    ap.add_argument("--cluster-dir", required=True, help="the data folder of `shoal up`")
    ap.add_argument("--data-dir", required=True, help="this process's folder")
    ap.add_argument("--interval", type=float, default=1.0)
    args, _ = ap.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s provisioner %(message)s")
    cluster = LocalCluster.attach(args.cluster_dir)
    # This process rewrites cluster.json as it starts and stops servers: it names itself there.
    cluster.provisioner = ProcessHandle("provisioner", "provisioner", args.data_dir,
                                        pid=os.getpid())
    cluster._save()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    write_ready(pathlib.Path(args.data_dir) / "ready.json", address="-:0")
    state = pathlib.Path(args.cluster_dir) / "cluster.json"
    Provisioner(cluster, args.interval).run(stop, alive=state.exists)   # gone: shoal down


if __name__ == "__main__":
    main()
