"""``python -m router --data-dir D --coordinator ADDR``: run a router."""
from __future__ import annotations

import argparse
import logging
import pathlib
import threading

import grpc
import torch

from shoal.config import ShoalConfig
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import channel, make_server, serve_until_signalled, write_ready

from router.mapcache import MapCache
from router.service import RouterService
from router.transport import GrpcShardTransport


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m router")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--config", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(message)s")
    torch.set_num_threads(1)
    cfg = ShoalConfig.from_json(args.config).router
    coord = pbg.CoordinatorStub(channel(args.coordinator))

    def fetch(known: int):
        reply = coord.GetShardMap(pb.GetShardMapRequest(known_version=known), timeout=10)
        return None if reply.unchanged else reply.map

    maps = MapCache(fetch)
    maps.refresh()
    service = RouterService(cfg, maps, GrpcShardTransport(), coord)
    server, address = make_server(cfg.threads, args.host, args.port)
    pbg.add_RouterServicer_to_server(service, server)
    server.start()
    data = pathlib.Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    write_ready(data / "ready.json", address=address)
    logging.info("serving on %s at map version %d", address, maps.current().version)
    stop = threading.Event()
    threading.Thread(target=maps.poll_forever, args=(cfg.map_poll_interval_s, stop),
                     daemon=True).start()
    serve_until_signalled(server, on_stop=stop.set)


if __name__ == "__main__":
    main()
