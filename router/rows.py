"""Unpooled paths: write rows through each partition's leader, read rows from one replica per
partition.

Writes: the router sends each partition's rows to its leader, which sequences them, replicates
them to the in-sync replicas and acknowledges once they all have them durable. Every request
carries an idempotency key, so resending after a lost reply, a timeout or a change of leader
applies each partition's rows once.
"""
from __future__ import annotations

import asyncio

import numpy as np

from embeddings.partition import partition_of
from shoal.errors import ShoalError, StaleMap, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.wire import pack

from router.mapcache import MapCache
from router.pooled import MAX_ATTEMPTS, MAX_REDIRECTS, RETRYABLE, Stats
from router.routing import routed
from router.transport import ShardTransport

WRITE_CHUNK_BYTES = 32 << 20
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 0.5


async def write_rows(model: str, table: str, ids: np.ndarray, rows: np.ndarray,
                     maps: MapCache, transport: ShardTransport, stats: Stats, request_id: str,
                     timeout: float, attempt_timeout: float, version: int = 0) -> int:
    """Write validated, unique ``ids``; return how many. Acknowledged when every partition's
    leader has acknowledged its rows (so every in-sync replica has them durable).

    A partition's rows go in one request of an idempotency key, so a resend is deduplicated
    per partition. A partition with more rows than fit one request is written in rounds, one
    key per round, each round holding at most one request's worth of every partition."""
    route = maps.current().model(model, version)
    version = route.version             # pinned: a switch of the current version mid-write
    tr = route.table(table)             # does not move the rest of it to another version
    parts = partition_of(ids, tr.spec.num_partitions)
    per_chunk = max(1, WRITE_CHUNK_BYTES // max(1, tr.spec.row_bytes))
    order = np.argsort(parts, kind="stable")
    sp = parts[order]
    starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])
    rank = np.arange(len(sp)) - np.repeat(starts, np.diff(np.r_[starts, len(sp)]))
    rounds = rank // per_chunk
    deadline = asyncio.get_running_loop().time() + timeout
    for r in range(int(rounds.max()) + 1 if len(ids) else 0):
        await _write_round(model, version, table, ids, rows, np.sort(order[rounds == r]),
                           maps, transport, stats, f"{request_id}.{r}", deadline,
                           attempt_timeout)
    return len(ids)


async def _write_round(model, version, table, ids, rows, pending, maps, transport, stats,
                       request_id, deadline, attempt_timeout) -> None:
    loop = asyncio.get_running_loop()
    backoff, last_error = FIRST_BACKOFF_S, None
    while True:
        rt = maps.current()
        tr = rt.model(model, version).table(table)
        parts = partition_of(ids[pending], tr.spec.num_partitions)
        leaders = tr.replicas[parts, 0]
        if leaders.size and leaders.min() < 0:
            p = int(parts[np.flatnonzero(leaders < 0)[0]])
            raise Unavailable(f"partition {p} of table {table!r} has no replica")
        calls, sels = [], []
        left = deadline - loop.time()
        for s, sel in _requests(pending, parts, leaders, tr.spec.row_bytes):
            c_parts = partition_of(ids[sel], tr.spec.num_partitions)
            req = pb.WriteRowsRequest(map_version=rt.version, table_uid=tr.spec.table_uid,
                                      ids=pack(ids[sel]), rows=pack(rows[sel]),
                                      routed=routed(tr, c_parts), request_id=request_id)
            calls.append(transport.write_rows(rt.addresses[s], req,
                                              max(0.05, min(attempt_timeout, left))))
            sels.append(sel)
        failed, at_least, redirected = [], 0, False
        for sel, r in zip(sels, await asyncio.gather(*calls, return_exceptions=True)):
            if isinstance(r, StaleMap):
                stats.redirects += 1
                at_least, redirected = max(at_least, r.map_version), True
                failed.append(sel)
            elif isinstance(r, ShoalError) and r.code in RETRYABLE:
                stats.replica_retries += 1
                last_error = r
                failed.append(sel)
            elif isinstance(r, BaseException):
                raise r
        if not failed:
            return
        pending = np.sort(np.concatenate(failed))
        left = deadline - loop.time()
        if left <= 0:
            raise Unavailable(f"write to table {table!r}: {len(pending)} rows not acknowledged "
                              f"within the deadline; last error: "
                              f"{last_error.message if last_error else 'the map kept changing'}")
        if not redirected:               # a leader is down: wait for the coordinator to act
            await asyncio.sleep(min(backoff, left))
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        await maps.refresh_async(at_least=at_least)


def _requests(pending: np.ndarray, parts: np.ndarray, leaders: np.ndarray, row_bytes: int):
    """(leader, selection) per request: ``pending`` grouped by leader, cut into requests of
    about WRITE_CHUNK_BYTES at partition boundaries only."""
    per_chunk = max(1, WRITE_CHUNK_BYTES // max(1, row_bytes))
    order = np.lexsort((parts, leaders))
    sl, sp = leaders[order], parts[order]
    for s in np.unique(sl):
        lo, hi = np.searchsorted(sl, [s, s + 1])
        p = sp[lo:hi]
        first = np.r_[True, p[1:] != p[:-1]]
        starts = np.flatnonzero(first)
        chunk_of_part = starts // per_chunk          # a partition's chunk: where it starts
        chunk = np.repeat(chunk_of_part, np.diff(np.r_[starts, len(p)]))
        for c in np.unique(chunk):
            yield int(s), np.sort(pending[order[lo:hi][chunk == c]])


async def lookup_rows(model: str, table: str, ids: np.ndarray, maps: MapCache,
                      transport: ShardTransport, timeout: float, stats: Stats,
                      version: int = 0) -> np.ndarray:
    """Rows of ``ids`` (validated) in the table's dtype; duplicate ids are fetched once. The
    version is pinned when the request starts (0: the current one then)."""
    uniq, inverse = np.unique(ids, return_inverse=True)
    route = maps.current().model(model, version).readable()
    version = route.version
    tr0 = route.table(table)
    out = np.empty((len(uniq), tr0.spec.dim), dtype=tr0.spec.np_dtype)
    pending = np.arange(len(uniq))
    exclude: set[int] = set()
    failed_rounds = redirected_rounds = 0
    while failed_rounds < MAX_ATTEMPTS and redirected_rounds < MAX_REDIRECTS:
        rt = maps.current()
        tr = rt.model(model, version).table(table)
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
        retry, failed = [], False
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
                failed = True
                continue
            if isinstance(reply, BaseException):
                raise reply
            out[sel] = np.frombuffer(reply.rows[0].data, out.dtype).reshape(len(sel), -1)
        if not retry:
            return out[inverse]
        pending = np.concatenate(retry)
        failed_rounds += failed
        redirected_rounds += not failed
    raise Unavailable(f"lookup_rows on table {table!r}: no replica answered after "
                      f"{failed_rounds} rounds with failures and {redirected_rounds} redirects")
