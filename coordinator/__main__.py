"""``python -m coordinator --data-dir D [--port P] [--config JSON]``: run a coordinator."""
from __future__ import annotations

import argparse
import logging
import pathlib
import threading

from shoal import security
from shoal.config import ShoalConfig
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.proto import shoal_pb2 as pb
from shoal.serving import channel, make_server, serve_until_signalled, write_ready

from coordinator.service import CoordinatorService
from coordinator.status import StatusServer
from coordinator.store import SqliteStateStore


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m coordinator")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--replication", type=int, default=0)
    ap.add_argument("--config", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(message)s")
    cfg = ShoalConfig.from_json(args.config)
    security.install(cfg.security)
    data = pathlib.Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    store = SqliteStateStore(data / "state.db")
    stubs: dict[str, pbg.ShardServerStub] = {}

    def build_replica(address: str, request: pb.BuildReplicaRequest) -> None:
        stub = stubs.get(address) or stubs.setdefault(address,
                                                      pbg.ShardServerStub(channel(address)))
        stub.BuildReplica(request, timeout=5)

    service = CoordinatorService(store, cfg.coordinator, default_replication=args.replication,
                                 build_replica=build_replica)
    server, address = make_server(16, args.host, args.port)
    pbg.add_CoordinatorServicer_to_server(service, server)
    server.start()
    stop = threading.Event()
    threading.Thread(target=service.run_reconcile_loop, args=(stop,), daemon=True).start()
    from shoal.metrics import REGISTRY, MapCollector, set_role
    set_role("coordinator")
    REGISTRY.register(MapCollector(service.shard_map, service.partition_load))
    web = StatusServer(service.status_view, REGISTRY, args.host)   # /, /status.json, /metrics
    service.metrics_address = metrics = web.address
    write_ready(data / "ready.json", address=address, metrics=metrics)
    logging.info("serving on %s", address)
    serve_until_signalled(server, on_stop=lambda: (stop.set(), store.close()))


if __name__ == "__main__":
    main()
