"""Building a replica: a learner copies a partition from a source replica.

The coordinator makes this server a learner of the partition (every writer now sends it every
write), then asks it to build. The builder streams the source's rows and stores each one the
learner does not already have (a row it has came from a write after it joined, so it is at
least as new), then reports ReplicaReady and the coordinator promotes it. Idempotent: asking
again re-runs the copy, which changes nothing that is already there.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import channel
from shoal.wire import unpack

from shards.service import ShardService

log = logging.getLogger("shard.replication")
CHUNK_ROWS = 8_192          # small chunks: the copy never holds the GIL or a lock for long


class ReplicaBuilder:
    def __init__(self, service: ShardService,
                 report: Callable[[pb.ReplicaReadyRequest], None], mib_per_s: float = 24.0):
        """``report(request)`` tells the coordinator a copy is complete; copies are paced to
        ``mib_per_s`` so that serving goes on while they run."""
        self._svc = service
        self._bytes_per_s = mib_per_s * 2**20
        self._report = report
        self._running: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def start(self, request: pb.BuildReplicaRequest) -> bool:
        key = (request.table_uid, request.partition)
        with self._lock:
            if key in self._running:
                return True
            self._running.add(key)
        threading.Thread(target=self._run, args=(request,), daemon=True,
                         name=f"build-{key[0]}-{key[1]}").start()
        return True

    def _run(self, request: pb.BuildReplicaRequest) -> None:
        key = (request.table_uid, request.partition)
        t0 = time.monotonic()
        try:
            self._svc.refresh_map(at_least=request.map_version)   # we know we are its learner
            ch = channel(request.source_address)
            copied = total = 0
            try:
                stream = pbg.ShardServerStub(ch).ReadPartition(pb.ReadPartitionRequest(
                    table_uid=request.table_uid, partition=request.partition,
                    chunk_rows=CHUNK_ROWS, map_version=request.map_version), timeout=3600)
                nbytes = 0
                for chunk in stream:
                    ids = unpack(chunk.ids, "ids", "int64", 1)
                    rows = unpack(chunk.rows, "rows", None, 2)
                    copied += self._svc.put_if_absent(request.table_uid, request.partition,
                                                      ids, rows)
                    total += len(ids)
                    nbytes += rows.nbytes
                    ahead = t0 + nbytes / self._bytes_per_s - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
            finally:
                ch.close()
            self._report(pb.ReplicaReadyRequest(
                server_id=self._svc.server_id, table_uid=request.table_uid,
                partition=request.partition, epoch=request.epoch, rows=total))
            log.info("built partition %s from %s: %d rows streamed, %d stored, %.1fs", key,
                     request.source_address, total, copied, time.monotonic() - t0)
        except Exception:                 # the coordinator asks again after build_resend_s
            log.exception("building partition %s from %s failed", key, request.source_address)
        finally:
            with self._lock:
                self._running.discard(key)
