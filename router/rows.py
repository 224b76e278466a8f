"""Unpooled paths: write rows to every replica (and learner), read rows from one replica per
partition.

Writes: the router sends each replica of a partition the rows it holds, all in parallel, and
acknowledges when every replica has them durable. (Leader-driven replication with sequence
numbers replaces this in the Failover work.)
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import numpy as np

from embeddings.partition import partition_of
from shoal.errors import ShoalError, StaleMap, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.wire import pack

from router.mapcache import MapCache
from router.pooled import MAX_ATTEMPTS, RETRYABLE, Stats
from router.routing import routed
from router.transport import ShardTransport

WRITE_CHUNK_BYTES = 32 << 20


async def write_rows(model: str, table: str, ids: np.ndarray, rows: np.ndarray,
                     maps: MapCache, transport: ShardTransport, timeout: float, stats: Stats,
                     report: Callable[[str, int, np.ndarray, str], Awaitable[int]]) -> int:
    """Write validated, unique ``ids`` to every replica of their partitions; return how many.

    Acknowledged only when every replica still in each partition's set has the rows durable. A
    replica that cannot be reached is reported (``report(server_id, table_uid, partitions,
    reason)`` returns the map version after the coordinator dropped it from those sets) and the
    write is retried on the new map; writes are absolute values, so resending is harmless."""
    last_error: ShoalError | None = None
    for _ in range(MAX_ATTEMPTS):
        rt = maps.current()
        tr = rt.model(model).table(table)
        parts = partition_of(ids, tr.spec.num_partitions)
        order = np.argsort(parts, kind="stable")
        chunk = max(1, WRITE_CHUNK_BYTES // max(1, tr.spec.row_bytes))
        calls, targets = [], []
        for slot in range(tr.writers.shape[1]):
            servers = tr.writers[parts[order], slot]
            for s in np.unique(servers[servers >= 0]):
                sel = order[servers == s]
                for lo in range(0, len(sel), chunk):
                    c = np.sort(sel[lo:lo + chunk])
                    req = pb.WriteRowsRequest(map_version=rt.version,
                                              table_uid=tr.spec.table_uid, ids=pack(ids[c]),
                                              rows=pack(rows[c]), routed=routed(tr, parts[c]))
                    calls.append(transport.write_rows(rt.addresses[s], req, timeout))
                    targets.append((int(s), parts[c]))
        results = await asyncio.gather(*calls, return_exceptions=True)
        at_least, retry = 0, False
        for (s, p), r in zip(targets, results):
            if isinstance(r, StaleMap):
                stats.redirects += 1
                at_least, retry = max(at_least, r.map_version), True
            elif isinstance(r, ShoalError) and r.code in RETRYABLE:
                stats.replica_retries += 1
                last_error, retry = r, True
                version = await report(rt.server_ids[s], tr.spec.table_uid, np.unique(p),
                                       r.message)
                at_least = max(at_least, version)
            elif isinstance(r, BaseException):
                raise r
        if not retry:
            return len(ids)
        await maps.refresh_async(at_least=at_least)
    if last_error is not None:
        raise Unavailable(f"write to table {table!r}: a replica stayed unreachable after "
                          f"{MAX_ATTEMPTS} attempts and could not be dropped from its "
                          f"partitions' replica sets: {last_error.message}")
    raise Unavailable(f"write to table {table!r}: the shard map kept changing; retry")


async def lookup_rows(model: str, table: str, ids: np.ndarray, maps: MapCache,
                      transport: ShardTransport, timeout: float, stats: Stats) -> np.ndarray:
    """Rows of ``ids`` (validated) in the table's dtype; duplicate ids are fetched once."""
    uniq, inverse = np.unique(ids, return_inverse=True)
    tr0 = maps.current().model(model).table(table)
    out = np.empty((len(uniq), tr0.spec.dim), dtype=tr0.spec.np_dtype)
    pending = np.arange(len(uniq))
    exclude: set[int] = set()
    for _ in range(MAX_ATTEMPTS):
        rt = maps.current()
        tr = rt.model(model).table(table)
        parts = partition_of(uniq[pending], tr.spec.num_partitions)
        servers = tr.choose(next(stats.rotation), frozenset(exclude))[parts]
        if servers.size and servers.min() < 0:
            p = int(parts[np.flatnonzero(servers < 0)[0]])
            raise Unavailable(f"partition {p} of table {table!r} has no live replica")
        calls, sels = [], []
        for s in np.unique(servers):
            sel = pending[servers == s]
            req = pb.LookupRowsRequest(map_version=rt.version, segments=[pb.RowsSegment(
                table_uid=tr.spec.table_uid, ids=pack(uniq[sel]),
                routed=routed(tr, partition_of(uniq[sel], tr.spec.num_partitions)))])
            calls.append(transport.lookup_rows(rt.addresses[s], req, timeout))
            sels.append((int(s), sel))
        retry = []
        for (s, sel), reply in zip(sels, await asyncio.gather(*calls, return_exceptions=True)):
            if isinstance(reply, StaleMap):
                stats.redirects += 1
                await maps.refresh_async(at_least=reply.map_version)
                retry.append(sel)
                continue
            if isinstance(reply, ShoalError) and reply.code in RETRYABLE:
                stats.replica_retries += 1
                exclude.add(s)
                retry.append(sel)
                continue
            if isinstance(reply, BaseException):
                raise reply
            out[sel] = np.frombuffer(reply.rows[0].data, out.dtype).reshape(len(sel), -1)
        if not retry:
            return out[inverse]
        pending = np.concatenate(retry)
    raise Unavailable(f"lookup_rows on table {table!r}: no replica answered after "
                      f"{MAX_ATTEMPTS} attempts")
