"""The shard server's read path: ``LookupRows`` and ``LookupPooled``.

A lookup finds its rows in memory (a table's arena, or its row cache: ``shards.tiers`` says
which) on the event loop, in one vectorised step per segment. Rows not in memory (misses) are
read from RocksDB in one batched multi-get per request *in a worker thread*: the event loop goes
on answering other requests meanwhile (rocksdict lets other threads run through most of a
multi-get: ``bench/gil.py``). The misses' rows are then offered to the row cache by a separate
admission thread, so the request that missed does not wait for its admission.

Coherence: a request holds its tables' read locks (``HeldTable.lock``) from its routing check
to its last read, so the map (epochs, arenas, dropped copies) cannot change under it. Writes go
through to the row cache (``HeldTable.to_memory``), and a miss read before a write or a drop of
its partition is not admitted (``RowCache.insert(since=)``): a cached row is never older than
an acknowledged write.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from shoal.errors import InvalidArgument
from shoal.proto import shoal_pb2 as pb
from shoal.wire import is_set, pack, serialize_with_tensor, unpack

log = logging.getLogger("shard")
NO_IDS = np.zeros(0, dtype=np.int64)
MAX_PENDING_ADMISSIONS = 32      # batches of misses waiting to be admitted; more are dropped
MISS_READERS = 4                 # threads finishing requests with misses
# A request's misses are read as up to READ_CHUNKS multi-gets at once, each of at least
# CHUNK_KEYS keys, by IO_THREADS threads: RocksDB's multi-get reads one block after another,
# and a cold block is a disk read. Measured here (700 random keys of 4 x 500k rows, the page
# cache dropped): 81 us a key as one multi-get, 28 as 4, 19 as 8, 15 as 16; read through the
# block cache or the page cache, 5-6 us a key either way.
# That fan-out pays only when reads wait for the disk: read from the page cache on a busy
# 2-core server, one multi-get per request served 1.02-1.19 M ids/s against 0.81 with 8
# (bench/tiered.py at 1/8 memory), every thread hand-off costing CPU the lookups need.
# ``ReadFanout`` decides from the reads' own speed.
READ_CHUNKS = 8
CHUNK_KEYS = 32
IO_THREADS = 16
SLOW_US_PER_KEY = 30.0           # one multi-get slower than this a key: the disk is being read
PROBE_EVERY = 16                 # while fanned out, every 16th read is one multi-get again


class ReadFanout:
    """How many multi-gets a read of ``n`` keys is split into. One, while single multi-gets
    run at page-cache speed (5-15 us a key here, busy or not); up to ``max_chunks`` while they
    are slower than ``SLOW_US_PER_KEY`` (a cold disk: 57-100 us a key as one multi-get, 19 as
    8 at once). The speed is a moving average of single multi-gets only (a fanned-out read's
    time says little of a single one's), so while fanned out every ``PROBE_EVERY``-th read
    goes single to measure it again. Thread-safe enough: a race costs one read's choice."""

    def __init__(self, max_chunks: int, alpha: float = 0.2):
        self.max_chunks = max(1, max_chunks)
        self.alpha = alpha
        self.us_per_key = 0.0        # single multi-gets, moving average
        self._reads = 0

    @property
    def fanned(self) -> bool:
        return self.us_per_key > SLOW_US_PER_KEY

    def chunks(self, n: int) -> int:
        k = min(self.max_chunks, n // CHUNK_KEYS)
        if k <= 1 or not self.fanned:
            return 1
        self._reads += 1
        return 1 if self._reads % PROBE_EVERY == 0 else k

    def observe(self, n: int, chunks: int, seconds: float) -> None:
        """A read of ``n`` keys as ``chunks`` multi-gets took ``seconds``."""
        if chunks == 1 and n >= CHUNK_KEYS:
            was = self.fanned
            us = seconds * 1e6 / n
            self.us_per_key += self.alpha * (us - self.us_per_key) if self.us_per_key else us
            if self.fanned != was:
                log.info("cold reads at %.1f us a key: %s", self.us_per_key,
                         f"split into up to {self.max_chunks} multi-gets" if self.fanned
                         else "one multi-get each")


@dataclass
class TableReads:
    """Per table, cumulative: the cache's part of the counters in ``ServerStats``."""
    ids: int = 0                 # ids read (occurrences, as the requests name them)
    misses: int = 0              # of those, read from RocksDB
    miss_reads: int = 0          # batched RocksDB reads
    miss_seconds: float = 0.0    # time in them


@dataclass
class Gathered:
    """A segment's rows: ``weight[idx]`` are the rows of its ids once the misses (positions
    ``miss`` of the ids) are read into ``weight``."""
    weight: torch.Tensor
    idx: np.ndarray
    miss: np.ndarray = field(default_factory=lambda: NO_IDS)
    since: np.ndarray | None = None     # the misses' partition generations (row cache)
    cache: object = None                # the row cache to offer the misses to
    direct: bool = False                # ``weight`` is the ids' rows, in order (idx = arange)

    def rows(self) -> torch.Tensor:
        """The ids' rows, in order (no copy when gathered so)."""
        return self.weight if self.direct else self.weight.index_select(
            0, torch.from_numpy(self.idx))


@dataclass
class Job:
    """One segment of a request: its table, ids and partitions, what was gathered, and how to
    finish it once the misses are read."""
    table: object
    ids: np.ndarray
    parts: np.ndarray
    got: Gathered
    finish: Callable[[Gathered], object]    # the segment's out, once every row is in memory
    occurrences: np.ndarray | None = None    # per unique id, how often the request names it
    out: object = None


class Held:
    """The read locks of one request: each of its tables' once, taken in table order, held from
    the routing checks until its last row is read, so no map change (epochs, arena slots, a
    dropped copy) happens under it. Taken once per table: a second read lock of one table
    would wait behind a writer that waits for the first."""

    def __init__(self, tables):
        self._held = []
        try:
            for _, t in sorted({t.spec.table_uid: t for t in tables}.items()):
                t.lock.acquire_read()
                self._held.append(t)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        while self._held:
            self._held.pop().lock.release_read()


def gather(table, ids: np.ndarray, parts: np.ndarray) -> Gathered:
    """The rows of ``ids`` that are in memory; caller holds ``table.lock`` for reading. Nothing
    here reads RocksDB."""
    cache = table.cache
    if cache is None:
        idx = table.arena.rows_index(ids, parts)
        cold = idx < 0
        if not cold.any():
            return Gathered(table.arena.weight, idx)
        buf = torch.empty((len(ids), table.spec.dim), dtype=table.arena.dtype)
        hot = np.flatnonzero(~cold)
        if hot.size:
            buf[torch.from_numpy(hot)] = table.arena.weight.index_select(
                0, torch.from_numpy(idx[hot]))
        return Gathered(buf, np.arange(len(ids), dtype=np.int64), np.flatnonzero(cold),
                        direct=True)
    with table.cache_lock:
        slots = cache.find(ids)
        miss = np.flatnonzero(slots < 0)
        since = cache.generation[parts[miss]] if miss.size else None
        # One gather of every slot (a miss takes slot 0's row, overwritten once read).
        buf = cache.rows.index_select(0, torch.from_numpy(np.maximum(slots, 0)))
    rows = np.arange(len(ids), dtype=np.int64)
    return Gathered(buf, rows, miss, since, cache, direct=True) if miss.size else \
        Gathered(buf, rows, direct=True)


class Reader:
    """Serves lookups for a ``ShardService`` (``service``): its tables, routing checks and
    RocksDB store."""

    def __init__(self, service, store, counters: dict, read_chunks: int = READ_CHUNKS):
        self._svc = service
        self.fanout = ReadFanout(read_chunks)
        self._store = store
        self._counters = counters
        self.tables: dict[int, TableReads] = {}
        self._admit = ThreadPoolExecutor(1, thread_name_prefix="cache-admission")
        # Misses are read in threads of their own, never the event loop's default executor: a
        # miss read holds its tables' read locks, and a map change waiting for them in a
        # default-executor thread (with writes waiting behind it) must not keep it from running.
        self._miss_readers = ThreadPoolExecutor(MISS_READERS, thread_name_prefix="miss-read")
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="rocksdb-read")
        self._pending = 0
        self._pending_lock = threading.Lock()

    # ------------------------------------------------------------ RPCs
    def lookup_rows(self, request: pb.LookupRowsRequest):
        svc = self._svc
        svc._enter(request.map_version, refresh=False)
        jobs, positions = [], []
        tables = [svc._table(seg.table_uid) for seg in request.segments]
        held = Held(tables)
        try:
            for i, (seg, table) in enumerate(zip(request.segments, tables)):
                ids = unpack(seg.ids, f"segments[{i}].ids", "int64", 1)
                svc._limit(len(ids))
                parts = svc._check(table, ids, seg.routed, read=True)
                if request.with_positions:
                    # Read before the rows: a write stores its rows, then advances the
                    # partition's seq, so the rows sent are at least as new as this position.
                    rp = unpack(seg.routed.partitions, "routed.partitions", "int32", 1)
                    positions.append(pb.PartitionPositions(seqs=pack(table.log.seq[rp]),
                                                           epochs=pack(table.log.epoch[rp])))
                jobs.append(Job(table, ids, parts, gather(table, ids, parts),
                                lambda got: pack(got.rows())))
                self._start(jobs[-1])
        except BaseException:
            held.release()
            raise
        reply = lambda: pb.LookupRowsReply(rows=[j.out for j in jobs], positions=positions)
        return self._complete(jobs, held, reply)

    def lookup_pooled(self, request: pb.LookupPooledRequest):
        """The reply (or, if rows must be read from RocksDB first, an awaitable of it); with
        ``concat_sums``, already serialised (every segment's sums in one tensor, its bytes
        copied once: ``serialize_with_tensor``)."""
        svc = self._svc
        svc._enter(request.map_version, refresh=False)
        jobs = []
        tables = [svc._table(seg.table_uid) for seg in request.segments]
        held = Held(tables)
        try:
            for i, (seg, table) in enumerate(zip(request.segments, tables)):
                jobs.append(self._pool_job(table, seg, f"segments[{i}]"))
                self._start(jobs[-1])
        except BaseException:
            held.release()
            raise

        def reply():
            sums = [j.out for j in jobs]
            if not request.concat_sums:
                return pb.LookupPooledReply(sums=[pack(x) for x in sums])
            flat = np.concatenate([x.reshape(-1) for x in sums]) if sums else \
                np.zeros(0, np.float32)
            return serialize_with_tensor(pb.LookupPooledReply(), 2, flat)
        return self._complete(jobs, held, reply)

    def _pool_job(self, table, seg: pb.PooledSegment, where: str) -> Job:
        svc = self._svc
        ids = unpack(seg.ids, f"{where}.ids", ("int64", "int32"), 1).astype(np.int64, copy=False)
        lengths = unpack(seg.lengths, f"{where}.lengths", "int32", 1)
        inverse = unpack(seg.inverse, f"{where}.inverse", "int32", 1) if is_set(seg.inverse) \
            else None
        n_occ = len(inverse) if inverse is not None else len(ids)
        svc._limit(n_occ)
        if lengths.size and lengths.min() < 0:
            raise InvalidArgument(f"{where}.lengths: must be >= 0, got {int(lengths.min())}")
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        total = int(offsets[-1]) + int(lengths[-1]) if lengths.size else 0
        if total != n_occ:                  # (lengths >= 0 and summing to n_occ: none longer)
            if lengths.size and int(lengths.max()) > n_occ:
                raise InvalidArgument(f"{where}.lengths: a bag of {int(lengths.max())} ids is "
                                      f"longer than the {n_occ} ids sent")
            raise InvalidArgument(f"{where}.lengths: sum {total} != {n_occ} ids")
        if inverse is not None and inverse.size and (inverse.min() < 0
                                                      or inverse.max() >= len(ids)):
            raise InvalidArgument(f"{where}.inverse: must index [0, {len(ids)})")
        weights = None
        if is_set(seg.weights):
            w = unpack(seg.weights, f"{where}.weights", "float32", 1)
            if len(w) != n_occ:
                raise InvalidArgument(f"{where}.weights: {len(w)} weights for {n_occ} ids")
            weights = torch.from_numpy(w.copy())
        offsets_t = torch.from_numpy(offsets)

        def pool(got: Gathered) -> np.ndarray:
            weight, idx = got.weight, got.idx
            if inverse is not None:
                idx = idx[inverse]
            wts = weights
            if wts is not None and weight.dtype != torch.float32:
                wts = wts.to(weight.dtype)
            return F.embedding_bag(torch.from_numpy(idx), weight, offsets_t, mode="sum",
                                   per_sample_weights=wts).float().numpy()
        parts = svc._check(table, ids, seg.routed, read=True)
        got = gather(table, ids, parts)
        occ = np.bincount(inverse, minlength=len(ids)) if inverse is not None else None
        return Job(table, ids, parts, got, pool, occ)

    # ------------------------------------------------------------ finishing
    def _start(self, job: Job) -> None:
        """Count the segment's reads; finish it now if it has no misses."""
        table, got = job.table, job.got
        n_occ = int(job.occurrences.sum()) if job.occurrences is not None else len(job.ids)
        stats = self.tables.setdefault(table.spec.table_uid, TableReads())
        stats.ids += n_occ
        if got.miss.size:
            missed = int(job.occurrences[got.miss].sum()) if job.occurrences is not None \
                else int(got.miss.size)
            stats.misses += missed
            self._counters["cold_ids"] += missed
        table.looked_up += np.bincount(job.parts, minlength=table.spec.num_partitions)
        self._svc._count(n_occ)
        if not got.miss.size:
            job.out = job.finish(got)

    def _complete(self, jobs: list[Job], held: Held, reply: Callable[[], object]):
        """The reply now, or an awaitable of it once the misses are read off the event loop."""
        if all(j.out is not None for j in jobs):
            held.release()
            return reply()

        # Submitted now and shielded: a request cancelled meanwhile (a hedge that lost, a
        # deadline) must not cancel the read, which releases the request's tables.
        done = asyncio.wrap_future(self._miss_readers.submit(self._read_misses, jobs, held))

        async def later():
            await asyncio.shield(done)
            return reply()
        return later()

    def _read_misses(self, jobs: list[Job], held: Held) -> None:
        """In a miss-reader thread: read every job's misses from RocksDB, finish the job, offer
        the rows read to the row cache; then release the request's tables."""
        try:
            for job in jobs:
                if job.out is not None:
                    continue
                table, got = job.table, job.got
                spec = table.spec
                # Each missed id once (a request without an inverse may repeat ids).
                ids, first, again = np.unique(job.ids[got.miss], return_index=True,
                                              return_inverse=True)
                parts = job.parts[got.miss][first]
                t0 = time.perf_counter()
                rows = self.read_store(spec, parts, ids, got.weight.dtype)
                stats = self.tables[spec.table_uid]
                stats.miss_reads += 1
                stats.miss_seconds += time.perf_counter() - t0
                self._counters["rocksdb_reads"] += 1
                got.weight.index_copy_(0, torch.from_numpy(got.miss),
                                       rows.index_select(0, torch.from_numpy(again)))
                job.out = job.finish(got)
                if got.cache is not None:
                    self._offer(table, got.cache, ids, rows, parts, got.since[first])
        finally:
            held.release()

    def read_store(self, spec, parts: np.ndarray, ids: np.ndarray,
                   dtype: torch.dtype) -> torch.Tensor:
        """The stored rows of ``ids`` (unique), as a ``[n, dim]`` tensor: one multi-get, or
        (``ReadFanout``: while the disk is being read) the keys in key order split into up to
        READ_CHUNKS multi-gets read at once."""
        n, row_bytes = len(ids), spec.row_bytes
        out = torch.empty((n, spec.dim), dtype=dtype)
        dst = out.view(torch.uint8).numpy()       # the rows' bytes, copied in once
        k = self.fanout.chunks(n)
        t0 = time.perf_counter()
        if k <= 1:
            dst[:] = np.frombuffer(self._store.read_rows(spec.table_uid, parts, ids, row_bytes),
                                   np.uint8).reshape(n, row_bytes)
            self.fanout.observe(n, 1, time.perf_counter() - t0)
            return out
        order = np.lexsort((ids, parts))           # key order: neighbours share blocks
        cuts = np.linspace(0, n, k + 1).astype(np.int64).tolist()
        bounds = list(zip(cuts[:-1], cuts[1:]))
        futures = [self._io.submit(self._store.read_rows, spec.table_uid,
                                   parts[order[a:b]], ids[order[a:b]], row_bytes)
                   for a, b in bounds]
        for (a, b), f in zip(bounds, futures):
            dst[order[a:b]] = np.frombuffer(f.result(), np.uint8).reshape(b - a, row_bytes)
        self.fanout.observe(n, k, time.perf_counter() - t0)
        return out

    def read_now(self, table, ids: np.ndarray, parts: np.ndarray) -> tuple[torch.Tensor,
                                                                           np.ndarray]:
        """(weight, idx) with every row of ``ids`` in ``weight[idx]``, reading misses inline (a
        caller already off the event loop: expert compute). Caller holds ``table.lock``."""
        got = gather(table, ids, parts)
        if got.miss.size:
            self._counters["cold_ids"] += int(got.miss.size)
            self._counters["rocksdb_reads"] += 1
            got.weight[torch.from_numpy(got.miss)] = self.read_store(
                table.spec, parts[got.miss], ids[got.miss], got.weight.dtype)
        return got.weight, got.idx

    # ------------------------------------------------------------ admission
    def _offer(self, table, cache, ids, rows, parts, since) -> None:
        """Admit missed rows in the background; dropped if admissions fall behind (the cache
        then warms more slowly, never wrongly)."""
        with self._pending_lock:
            if self._pending >= MAX_PENDING_ADMISSIONS:
                self._counters["admissions_dropped"] += 1
                return
            self._pending += 1

        def admit():
            try:
                with table.cache_lock:
                    if table.cache is cache:        # not replaced meanwhile
                        cache.insert(ids, rows, parts, since)
            except Exception:
                log.exception("admitting %d rows to the row cache failed", len(ids))
            finally:
                with self._pending_lock:
                    self._pending -= 1
        self._admit.submit(admit)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until queued admissions are done (tests, benchmarks)."""
        self._admit.submit(lambda: None).result(timeout)

    def close(self) -> None:
        self._admit.shutdown(wait=False, cancel_futures=True)
        self._miss_readers.shutdown(wait=False)
        self._io.shutdown(wait=False)
