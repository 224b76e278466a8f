"""``python -m shards --server-id ID --data-dir D --coordinator ADDR``: run a shard server.

One asyncio loop serves the RPCs; a heartbeat thread reports stats and pulls newer maps.
Start-up: bind the port, open RocksDB, register with the coordinator (retrying until it
answers), load the partitions the map gives this server, then answer requests.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import sys
import threading
import time

import grpc
import torch

from shoal import security
from shoal.config import ShoalConfig
from shoal.errors import from_rpc_error
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import (
    call_until_up, channel, keep_heap, make_aio_server, process_args, trim_heap, until_signalled,
    watch_loop_lag, write_ready)

from shards.failpoints import Failpoints
from shards.leader import Replicator
from shards.replication import ReplicaBuilder
from shards.service import ShardService
from shards.servicer import ShardServicer
from shards.split import SplitBuilder
from shards.spool import default_spool_dir
from shards.storage import RocksRowStore
from shards.tiers import store_memory
from shards import warm

log = logging.getLogger("shard")


async def serve(args) -> None:
    whole = ShoalConfig.from_json(args.config)
    security.install(whole.security)
    cfg = whole.server
    sys.setswitchinterval(cfg.gil_switch_interval_s)   # a copy adds little to lookup latency
    data = pathlib.Path(args.data_dir)
    # Bulk writes reuse their buffers' pages (trimmed when idle), and every thread shares one
    # malloc arena: set before RocksDB starts its threads, which otherwise each get an arena
    # that the read path's threads then share and grow (~190 MiB of RSS in bench/tiered.py).
    keep_heap()
    mem = store_memory(cfg.memory_budget_bytes, cfg.block_cache_bytes)
    failpoints = Failpoints(data if cfg.failpoints else None)
    store = RocksRowStore(data, mem.block_cache, cfg.sst_threshold_rows,
                          memtable_bytes=mem.memtable, failpoints=failpoints,
                          mmap_reads=cfg.mmap_reads)
    coord = pbg.CoordinatorStub(channel(args.coordinator))

    def fetch_map(known: int):
        reply = coord.GetShardMap(pb.GetShardMapRequest(known_version=known), timeout=10,
                                 wait_for_ready=True)  # ride out a coordinator restart
        return None if reply.unchanged else reply.map

    spool_dir = cfg.spool_dir or default_spool_dir(data)
    os.makedirs(spool_dir, exist_ok=True)
    service = ShardService(args.server_id, store, cfg, fetch_map, spool_dir=spool_dir,
                           failpoints=failpoints)
    server, address = make_aio_server(args.host, args.port, parsers=ShardServicer.PARSERS)
    builder = ReplicaBuilder(service, lambda req: coord.ReplicaReady(req, timeout=10),
                             cfg.rebuild_mib_per_s)

    async def report(req: pb.ReportFailureRequest) -> pb.ReportFailureReply:
        try:
            return await asyncio.to_thread(coord.ReportFailure, req, timeout=10,
                                           wait_for_ready=True)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    replicator = Replicator(service, report, cfg.replicate_timeout_s)
    pbg.add_ShardServerServicer_to_server(ShardServicer(service, replicator, builder), server)
    await server.start()
    from shoal.metrics import REGISTRY, ServerCollector, serve_metrics
    metrics = serve_metrics("server", args.host)
    REGISTRY.register(ServerCollector(service.stats))
    register = pb.RegisterRequest(server_id=args.server_id, address=address,
                                  memory_budget_bytes=cfg.memory_budget_bytes,
                                  disk_capacity_bytes=service.disk_capacity(),
                                  domain=cfg.domain, metrics_address=metrics)
    await asyncio.to_thread(call_until_up, lambda: coord.Register(register, timeout=5))
    await asyncio.to_thread(service.refresh_map)
    write_ready(data / "ready.json", address=address, server_id=args.server_id,
                metrics=metrics)
    log.info("serving on %s at map version %d", address, service.map_version)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(coord, service, register, cfg.heartbeat_interval_s,
                                              stop), daemon=True).start()
    threading.Thread(target=SplitBuilder(service, cfg.rebuild_mib_per_s).run, args=(stop,),
                     daemon=True, name="split-builder").start()
    threading.Thread(target=_hot_sets, args=(service, data, cfg.hot_save_interval_s, stop),
                     daemon=True, name="warmer").start()
    lag = asyncio.create_task(watch_loop_lag())
    await until_signalled()
    lag.cancel()
    stop.set()
    await server.stop(grace=1.0)
    if cfg.hot_save_interval_s > 0:
        with contextlib.suppress(Exception):
            warm.save_hot(service, data)
    store.close()


def main() -> None:
    args = process_args("python -m shards", server_id=True)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s shard {args.server_id} %(message)s")
    torch.set_num_threads(1)   # two OpenMP threads per process collapse under load here
    asyncio.run(serve(args))


TRIM_EVERY_S = 5.0


def _heartbeat(coord, service: ShardService, register: pb.RegisterRequest, interval: float,
               stop: threading.Event) -> None:
    """Report stats every ``interval``; a newer map version in the reply wakes the map applier.
    Nothing slow runs here, so loading a large map never delays the heartbeats that keep this
    server in its replica sets."""
    newer = threading.Event()
    threading.Thread(target=_apply_maps, args=(service, newer, stop), daemon=True,
                     name="map-applier").start()
    trimmed, last_trim = 0, time.monotonic()
    compacting = threading.Event()
    while not stop.wait(interval):
        bulk, now = service.last_bulk_write, time.monotonic()
        if bulk > trimmed and now - bulk > 2 * interval:
            trim_heap()                      # the writes stopped: give their buffers back
            trimmed, last_trim = bulk, now
            if not compacting.is_set():      # and compact what they ingested, off this thread
                compacting.set()
                threading.Thread(target=_compact, args=(service, compacting), daemon=True,
                                 name="compactor").start()
        elif now - last_trim > TRIM_EVERY_S and now - bulk > 2 * interval:
            # Lookups' buffers too (the heap keeps up to 256 MiB free for bulk writes,
            # ``keep_heap``): RSS stays near the memory budget.
            trim_heap()
            last_trim = now
        try:
            reply = coord.Heartbeat(pb.HeartbeatRequest(server_id=service.server_id,
                                                        stats=service.stats()), timeout=5)
            if reply.map_version > service.map_version:
                newer.set()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:       # a coordinator that lost us
                call_until_up(lambda: coord.Register(register, timeout=5))
            else:
                log.warning("heartbeat failed: %s", e.code().name)
        except Exception:                                   # keep heartbeating whatever happens
            log.exception("heartbeat loop error")


def _hot_sets(service: ShardService, data, interval: float, stop: threading.Event) -> None:
    """Start the row caches from the hot sets saved before (a restart), then save them every
    ``interval`` seconds (``shards.warm``)."""
    warm.warm_from_files(service, data)
    while interval > 0 and not stop.wait(interval):
        try:
            warm.save_hot(service, data)
        except Exception:
            log.exception("saving the row caches' hot sets failed")


def _compact(service: ShardService, running: threading.Event) -> None:
    try:
        t0 = time.perf_counter()
        done = service.store.compact_ingested(service.stored_bytes)
        if done:
            log.info("compacted bulk-loaded tables %s in %.1f s", done, time.perf_counter() - t0)
    except Exception:
        log.exception("compacting bulk-loaded tables failed")
    finally:
        running.clear()


def _apply_maps(service: ShardService, newer: threading.Event, stop: threading.Event) -> None:
    while not stop.is_set():
        if not newer.wait(1.0):
            continue
        newer.clear()
        try:
            service.refresh_map()
        except Exception:
            log.exception("applying a new shard map failed; retrying on the next heartbeat")


if __name__ == "__main__":
    main()
