"""A leader's writes on the event loop: sequence and store them (``WritePath.lead_write``, in a
thread), send every peer its entries concurrently, resend from the log to a peer that is
behind, report a peer that fails to the coordinator, and acknowledge only when every peer still
in the partitions' sets has the write durable.

Writes to one table are ordered by an asyncio lock held from sequencing to acknowledgement, so
peers receive each partition's entries in order; lookups are not affected.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Awaitable, Callable

import grpc
from shoal.errors import ShoalError, StaleMap, Unavailable, from_rpc_error
from shoal.metrics import REPLICATION_CATCH_UPS, REPLICATION_SECONDS
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import AioStubs
from shoal.wire import unpack

from shards.service import ShardService
from shards.writes import Target

log = logging.getLogger("shard.leader")
MAX_ROUNDS = 6          # send / report / refresh rounds before a write gives up (UNAVAILABLE)
CATCH_UP_TRIES = 3


class Replicator:
    def __init__(self, service: ShardService,
                 report: Callable[[pb.ReportFailureRequest], Awaitable[pb.ReportFailureReply]],
                 timeout_s: float, stubs: AioStubs | None = None):
        """``report``: ReportFailure on the coordinator; raises ShoalError if it refuses."""
        self._svc = service
        self._report = report
        self._timeout = timeout_s
        self._stubs = stubs or AioStubs(pbg.ShardServerStub)
        self._locks: dict[int, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def write(self, request: pb.WriteRowsRequest) -> pb.WriteRowsReply:
        async with self._locks[request.table_uid]:
            plan = await asyncio.to_thread(self._svc.lead_write, request)
            done: set[str] = set()
            for _ in range(MAX_ROUNDS):
                if not plan.targets:
                    return pb.WriteRowsReply(written=plan.written)
                results = await asyncio.gather(*(self._send(t) for t in plan.targets))
                newer = 0
                for t, err in zip(plan.targets, results):
                    if err is None:
                        done.add(t.server_id)
                    elif isinstance(err, StaleMap):     # a peer at a newer epoch: catch up
                        newer = max(newer, err.map_version)
                    else:
                        newer = max(newer, await self._drop(t, err))
                if newer:
                    await asyncio.to_thread(self._svc.refresh_map, newer)
                plan = await asyncio.to_thread(self._svc.replan, plan, done)
            raise Unavailable(f"write to table_uid {request.table_uid}: replicas kept failing "
                              f"or the map kept changing for {MAX_ROUNDS} rounds; retry")

    async def _send(self, t: Target) -> ShoalError | None:
        """Deliver ``t``'s entries; None once it has them all, else the error."""
        request, t0 = t.request, time.perf_counter()
        for _ in range(CATCH_UP_TRIES):
            try:
                reply = await self._stubs(t.address).Replicate(request, timeout=self._timeout)
            except grpc.RpcError as e:
                return from_rpc_error(e)
            diverged = unpack(reply.diverged_partitions, "diverged", "int32", 1)
            if diverged.size:
                return ShoalError(grpc.StatusCode.DATA_LOSS,
                                  f"{t.server_id}'s history of partitions "
                                  f"{diverged.tolist()[:8]} differs from this leader's")
            behind = unpack(reply.behind_partitions, "behind", "int32", 1)
            if not behind.size:
                REPLICATION_SECONDS.labels(t.server_id).observe(time.perf_counter() - t0)
                return None
            REPLICATION_CATCH_UPS.labels(t.server_id).inc()
            seqs = unpack(reply.behind_seqs, "behind_seqs", "int64", 1)
            request = await asyncio.to_thread(self._svc.catch_up_request, request.table_uid,
                                              behind, seqs)
            if request is None:
                return ShoalError(grpc.StatusCode.DATA_LOSS,
                                  f"{t.server_id} is behind on partitions "
                                  f"{behind.tolist()[:8]} further than this leader's log")
        return Unavailable(f"{t.server_id} stayed behind after {CATCH_UP_TRIES} catch-ups")

    async def _drop(self, t: Target, err: ShoalError) -> int:
        """Have the coordinator drop a failed peer from the partitions it was sent; the map
        version that no longer has it."""
        log.warning("peer %s failed a write of table_uid %d (%s); reporting it",
                    t.server_id, t.request.table_uid, err)
        try:
            reply = await self._report(pb.ReportFailureRequest(
                server_id=t.server_id, reporter=self._svc.server_id,
                table_uid=t.request.table_uid, partitions=t.partitions.tolist(),
                reason=str(err)[:500]))
        except ShoalError as e:
            raise Unavailable(f"replica {t.server_id} failed a write ({err.message}) and the "
                              f"coordinator did not drop it: {e.message}") from None
        return reply.map_version

