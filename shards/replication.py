"""Building a replica: a learner copies a partition from its leader.

The coordinator makes this server a learner of the partition and asks it to build, naming the
leader. If the learner still holds a copy from an earlier membership whose last entry is in the
leader's history, it only catches up: it replays the leader's log after that entry. Otherwise
it drops its copy, streams a consistent snapshot (the leader's RocksDB checkpoint, taken
between two writes, opened read-only), then catches up from the entry the snapshot ends at.
When the catch-up reaches the leader's head, the leader attaches the learner (every later write
goes to it too, and waits for it), and the learner reports ReplicaReady; the coordinator
promotes it while that leader still leads. Asking again re-runs the build, which is harmless.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable

import numpy as np

from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.metrics import REPLICATION_LAG_ENTRIES
from shoal.serving import channel
from shoal.wire import unpack

from shards import warm
from shards.service import ShardService

log = logging.getLogger("shard.replication")
CHUNK_ROWS = 8_192          # small chunks: the copy never holds the GIL or a lock for long
CATCH_UP_BYTES = 4 << 20    # log entries per catch-up call, at most
INSTALL_BYTES = 2 << 20     # snapshot rows are stored in write batches of about this size
MAX_CATCH_UP_CALLS = 1_000


class BuildFailed(Exception):
    pass


class ReplicaBuilder:
    def __init__(self, service: ShardService,
                 report: Callable[[pb.ReplicaReadyRequest], pb.ReplicaReadyReply | None],
                 mib_per_s: float = 24.0):
        """``report(request)`` tells the coordinator a copy is complete (the reply names the map
        version that promoted it, applied before any further entry of the partition); copies
        are paced to ``mib_per_s`` so that serving goes on while they run."""
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
            self._svc.building[key] = [0, self._svc.partition_bytes(*key)]
            ch = channel(request.source_address)
            try:
                stub = pbg.ShardServerStub(ch)
                copied, have = 0, self._svc.position(*key)
                entries = self._catch_up(stub, request, have) if have is not None else None
                mode = "caught up from its own copy"
                if entries is None:
                    mode = "snapshot"
                    have, copied = self._snapshot(stub, request)
                    entries = self._catch_up(stub, request, have)
                    if entries is None:
                        raise BuildFailed("the leader's log no longer reaches the snapshot")
                warmed = self._warm(stub, request)
            finally:
                ch.close()
            self._svc.count("builds_caught_up" if mode != "snapshot" else "builds_from_snapshot")
            with self._svc.promoting(*key):
                try:
                    reply = self._report(pb.ReplicaReadyRequest(
                        server_id=self._svc.server_id, table_uid=request.table_uid,
                        partition=request.partition, epoch=request.epoch, rows=copied,
                        leader=request.source_id, entries=entries))
                except Exception:
                    # The promotion may have been committed all the same: take the newest
                    # map before taking entries again.
                    with contextlib.suppress(Exception):
                        self._svc.refresh_map()
                    raise
                if reply is not None and reply.map_version:
                    self._svc.refresh_map(at_least=reply.map_version)
            log.info("built partition %s from %s (%s): %d rows copied, %d entries replayed, "
                     "%d hot rows cached, %.1fs", key, request.source_id, mode, copied, entries,
                     warmed, time.monotonic() - t0)
        except Exception as e:            # the coordinator asks again after build_resend_s
            log.warning("building partition %s from %s failed: %s", key, request.source_id, e)
        finally:
            self._svc.building.pop(key, None)
            with contextlib.suppress(KeyError):   # built or failed: no copy lagging now
                REPLICATION_LAG_ENTRIES.remove(str(key[0]), str(key[1]))
            with self._lock:
                self._running.discard(key)

    def _warm(self, stub, request) -> int:
        """Start this copy's share of the row cache with the leader's hot rows of the partition
        (``shards.warm``); rows admitted. A failure costs only a cold start."""
        try:
            table = self._svc.held(request.table_uid)
            with table.cache_lock:
                if table.cache is None:
                    return 0
                share = table.cache.capacity // max(1, int((table.epochs > 0).sum()))
            reply = stub.HotIds(pb.HotIdsRequest(table_uid=request.table_uid,
                                                 partition=request.partition, max_ids=share,
                                                 map_version=request.map_version),
                                timeout=10)
            return warm.warm(self._svc, table, unpack(reply.ids, "ids", "int64", 1),
                             unpack(reply.scores, "scores", "int32", 1))
        except Exception as e:
            log.warning("no hot rows for partition %s from %s: %s",
                        (request.table_uid, request.partition), request.source_id, e)
            return 0

    def _pace(self, t0: float, nbytes: int) -> None:
        ahead = t0 + nbytes / self._bytes_per_s - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)

    def _snapshot(self, stub, request) -> tuple[tuple[int, int], int]:
        """Replace this server's copy with the leader's snapshot; ((seq, epoch) it ends at,
        rows copied)."""
        uid, p = request.table_uid, request.partition
        self._svc.reset_partition(uid, p)
        stream = stub.ReadPartition(pb.ReadPartitionRequest(
            table_uid=uid, partition=p, chunk_rows=CHUNK_ROWS, map_version=request.map_version,
            learner=self._svc.server_id), timeout=3600)
        t0, nbytes, total, at = time.monotonic(), 0, 0, None
        ids_buf, rows_buf, buffered = [], [], 0

        def install():
            if ids_buf:
                self._svc.install_rows(uid, p, np.concatenate(ids_buf), np.concatenate(rows_buf))
            ids_buf.clear()
            rows_buf.clear()

        for chunk in stream:
            if at is None:
                at = (chunk.snapshot_seq, chunk.snapshot_epoch)
            ids = unpack(chunk.ids, "ids", "int64", 1)
            rows = unpack(chunk.rows, "rows", None, 2)
            ids_buf.append(ids)
            rows_buf.append(rows)
            buffered += rows.nbytes
            if buffered >= INSTALL_BYTES:
                install()
                buffered = 0
            total += len(ids)
            nbytes += rows.nbytes
            self._svc.building[(uid, p)][0] = nbytes
            self._pace(t0, nbytes)
        install()
        if at is None:
            raise BuildFailed("the leader sent an empty snapshot stream")
        self._svc.finish_snapshot(uid, p, *at)
        return at, total

    def _catch_up(self, stub, request, have: tuple[int, int]) -> int | None:
        """Replay the leader's log after ``have`` until the leader attaches this server;
        entries replayed, or None when the leader cannot (log too short, history differs)."""
        uid, p = request.table_uid, request.partition
        seq, epoch = have
        t0, nbytes, n = time.monotonic(), 0, 0
        for _ in range(MAX_CATCH_UP_CALLS):
            reply = stub.CatchUp(pb.CatchUpRequest(
                table_uid=uid, partition=p, after_seq=seq, after_epoch=epoch,
                learner=self._svc.server_id, map_version=request.map_version,
                max_bytes=CATCH_UP_BYTES), timeout=30)
            if reply.unavailable:
                return None
            _, ok = self._svc.apply_caught_up(uid, list(reply.entries))
            if not ok:
                raise BuildFailed("catch-up entries did not follow this copy's last entry")
            n += len(reply.entries)
            if reply.attached:
                return n
            seq, epoch = self._svc.position(uid, p)
            REPLICATION_LAG_ENTRIES.labels(str(uid), str(p)).set(max(0, reply.head_seq - seq))
            nbytes += sum(len(e.rows.data) for e in reply.entries)
            self._pace(t0, nbytes)
        raise BuildFailed(f"catch-up did not reach the leader's head in {MAX_CATCH_UP_CALLS} "
                          "calls")
