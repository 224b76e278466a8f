"""The shard server's gRPC face: each RPC of ``ShardServer`` handed to ``ShardService`` (in a
thread where it may block), the replicator (writes) or the replica builder, with errors turned
into gRPC statuses (a full disk: RESOURCE_EXHAUSTED naming the server and its path).
"""
from __future__ import annotations

import asyncio
import inspect

import numpy as np

from shoal.errors import ResourceExhausted, ShoalError, StaleMap, Unavailable, abort_async
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.wire import pack, parse_with_tensor

from shards.service import ShardService
from shards.storage import disk_full

class ShardServicer(pbg.ShardServerServicer):
    """The gRPC face of a ShardService on an asyncio server. Lookups run inline on the event
    loop: each is a short burst of vectorised work, and inline avoids a thread hand-off per
    request. Writes and copies, which touch RocksDB at length, run in threads."""

    # Ingest's rows stay in the received bytes (parsing copies 16 MiB twice otherwise).
    PARSERS = {"/shoal.v1.ShardServer/Ingest": parse_with_tensor(pb.IngestRequest, 4)}

    def __init__(self, service: ShardService, replicator=None, builder=None):
        """``replicator``: a ``shards.leader.Replicator`` (leads writes); ``builder``: a
        ``shards.replication.ReplicaBuilder`` (builds replicas when asked)."""
        self._svc = service
        self._replicator = replicator
        self._builder = builder

    async def _run(self, fn, request, context, in_thread: bool = False, lazy: bool = False):
        """Run ``fn(request)``. A request routed with a newer map first waits for this server
        to fetch it (off the loop: other requests go on meanwhile), unless ``lazy``: then only a
        StaleMap makes it fetch the map and try once more."""
        try:
            for attempt in (0, 1):
                try:
                    if not lazy and request.map_version > self._svc.map_version:
                        await asyncio.to_thread(self._svc.refresh_map, request.map_version)
                    if in_thread:
                        return await asyncio.to_thread(fn, request)
                    out = fn(request)
                    return await out if inspect.isawaitable(out) else out
                except StaleMap:
                    if attempt or request.map_version <= self._svc.map_version:
                        raise
                    await asyncio.to_thread(self._svc.refresh_map, request.map_version)
        except ShoalError as e:
            await abort_async(context, e)
        except Exception as e:
            full = disk_full(e)
            if full is None:
                raise
            # Nothing of the write is acknowledged (a RocksDB write batch or ingest is all or
            # nothing); what was stored before stays readable.
            await abort_async(context, ResourceExhausted(
                f"server {self._svc.server_id}: disk full under {self._svc.store.path} "
                f"({full}); the write was not stored. Free space there, or move data off "
                "this server (server.disk_capacity_bytes, Drain)"))

    async def WriteRows(self, request, context):
        if self._replicator is None:
            await abort_async(context, Unavailable("this server cannot lead writes"))
        return await self._run(self._replicator.write, request, context)

    async def Replicate(self, request, context):
        return await self._run(self._svc.replicate, request, context, in_thread=True)

    async def HotIds(self, request, context):
        return await self._run(self._svc.hot_ids, request, context, in_thread=True)

    async def CatchUp(self, request, context):
        return await self._run(self._svc.catch_up, request, context, in_thread=True)

    async def LookupRows(self, request, context):
        return await self._run(self._svc.lookup_rows, request, context, lazy=True)

    async def LookupPooled(self, request, context):
        return await self._run(self._svc.lookup_pooled, request, context, lazy=True)

    async def Stats(self, request, context):
        return self._svc.stats()

    async def Ingest(self, request, context):
        return await self._run(self._svc.ingest, request, context, in_thread=True)

    async def ExpertForward(self, request, context):
        return await self._run(self._svc.expert_forward, request, context, in_thread=True,
                               lazy=True)

    async def Checksums(self, request, context):
        try:
            return await asyncio.to_thread(self._svc.checksums, request)
        except ShoalError as e:
            await abort_async(context, e)

    async def BuildReplica(self, request, context):
        if self._builder is None:
            await abort_async(context, Unavailable("this server cannot build replicas"))
        return pb.BuildReplicaReply(started=self._builder.start(request))

    async def ReadPartition(self, request, context):
        """Stream a consistent snapshot of the partition from a checkpoint, a chunk at a time,
        each read only when the learner has taken the last one (flow control), so a paced copy
        paces the leader too."""
        n = int(request.chunk_rows) if request.chunk_rows > 0 else 8_192
        try:
            snap, seq, epoch = await asyncio.to_thread(
                self._svc.open_snapshot, request.table_uid, request.partition,
                request.map_version, request.learner)
        except ShoalError as e:
            await abort_async(context, e)
            return
        try:
            spec = self._svc.spec(request.table_uid)
            first = True
            while True:
                ids, raw = await asyncio.to_thread(snap.read, n)
                rows = np.frombuffer(raw, dtype=spec.np_dtype).reshape(len(ids), spec.dim)
                if first or len(ids):
                    yield pb.PartitionChunk(ids=pack(ids), rows=pack(rows), snapshot_seq=seq,
                                            snapshot_epoch=epoch)
                first = False
                if len(ids) < n:
                    return
        finally:
            await asyncio.to_thread(snap.close)
