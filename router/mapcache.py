"""The router's cached shard map: a RoutingTable replaced whole when the coordinator has a newer
version. Refreshed on a redirect (at least to the version the server named) and polled with
jitter in the background, so routers never all ask at once."""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Callable

import grpc

from shoal.errors import Unavailable
from shoal.proto import shoal_pb2 as pb

from router.routing import RoutingTable

log = logging.getLogger("router.map")


class MapCache:
    def __init__(self, fetch: Callable[[int], pb.ShardMap | None]):
        """``fetch(known_version)`` returns the coordinator's map, or None if unchanged."""
        self._fetch = fetch
        self._table = RoutingTable.empty()
        self._lock = threading.Lock()
        self.refreshes = 0

    def current(self) -> RoutingTable:
        return self._table

    def install(self, m: pb.ShardMap) -> None:
        with self._lock:
            if m.version > self._table.version:
                self._table = RoutingTable.build(m)

    def refresh(self, at_least: int = 0) -> RoutingTable:
        t0 = time.perf_counter()
        with self._lock:
            if not at_least or self._table.version < at_least:
                m = self._fetch(self._table.version)
                self.refreshes += 1
                if m is not None and m.version > self._table.version:
                    self._table = RoutingTable.build(m)
        took = time.perf_counter() - t0
        if took > 0.05:
            log.info("map refresh to version %d took %.0f ms", self._table.version, took * 1e3)
        return self._table

    async def refresh_async(self, at_least: int = 0) -> RoutingTable:
        """``refresh`` from the event loop: the fetch runs in a worker thread."""
        if at_least and self._table.version >= at_least:
            return self._table
        try:
            return await asyncio.to_thread(self.refresh, at_least)
        except grpc.RpcError as e:
            raise Unavailable(f"a server redirected this request to shard map version "
                              f"{at_least}, and the coordinator could not be reached for it "
                              f"({e.code().name}); retry") from None

    def poll_forever(self, interval: float, stop: threading.Event) -> None:
        while not stop.wait(interval * random.uniform(0.8, 1.2)):
            try:
                self.refresh()
            except Exception as e:          # the coordinator may be down; keep serving
                log.warning("map poll failed: %s", e)
