"""``python -m router --data-dir D --coordinator ADDR``: run a router.

The router is one asyncio event loop (grpc.aio server and channels): no thread hand-offs on the
request path. A background thread polls the coordinator for newer shard maps.
"""
from __future__ import annotations

import asyncio
import logging
import pathlib
import threading

import torch

from shoal import security
from shoal.config import ShoalConfig
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import (
    GRPC_OPTIONS, call_until_up, channel, make_aio_server, process_args, until_signalled, watch_loop_lag,
    write_ready)

from router.mapcache import MapCache
from router.service import RouterService
from router.transport import GrpcShardTransport


async def serve(args) -> None:
    whole = ShoalConfig.from_json(args.config)
    security.install(whole.security)
    cfg = whole.router
    sync_coord = pbg.CoordinatorStub(channel(args.coordinator))

    def fetch(known: int):
        reply = sync_coord.GetShardMap(pb.GetShardMapRequest(known_version=known), timeout=10,
                                 wait_for_ready=True)  # ride out a coordinator restart
        return None if reply.unchanged else reply.map

    maps = MapCache(fetch)
    call_until_up(maps.refresh)
    coord = pbg.CoordinatorStub(security.aio_channel(args.coordinator, GRPC_OPTIONS))
    from shoal.metrics import REGISTRY, RowCacheCollector, serve_metrics
    service = RouterService(cfg, maps, GrpcShardTransport(), coord)
    service.metrics_address = metrics = serve_metrics("router", args.host)
    if service.row_cache.enabled:
        REGISTRY.register(RowCacheCollector(service.row_cache))
    server, address = make_aio_server(args.host, args.port, role="router")
    pbg.add_RouterServicer_to_server(service, server)
    await server.start()
    data = pathlib.Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    write_ready(data / "ready.json", address=address, metrics=metrics)
    logging.info("serving on %s at map version %d", address, maps.current().version)
    stop_poll = threading.Event()
    threading.Thread(target=maps.poll_forever, args=(cfg.map_poll_interval_s, stop_poll),
                     daemon=True).start()
    lag = asyncio.create_task(watch_loop_lag())
    await until_signalled()
    lag.cancel()
    stop_poll.set()
    await server.stop(grace=1.0)


def main() -> None:
    args = process_args("python -m router")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(message)s")
    torch.set_num_threads(1)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
