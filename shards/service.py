"""The shard server's state: the tables and partitions it holds, the routing checks every
request passes, storing rows (RocksDB, then memory), and its stats. Each path is a module of
its own: applying the map (``shards.mapping``), lookups (``shards.reads``), the replicated write
path (``shards.writes``, ``shards.leader``), bulk loads (``shards.ingest``), experts
(``shards.experts``); the gRPC face is ``shards.servicer``.

Durability: rows and each partition's replication position are durable in RocksDB
(``RowStore``) before a write returns; the memory tier, the log of recent writes and the
held-partition table are soft state rebuilt from RocksDB and the coordinator's map on restart.
"""
from __future__ import annotations

import contextlib
import os
import logging
import resource
import threading
import time
from typing import Callable

import numpy as np
import torch

from embeddings.partition import partition_of, rows_in_partition
from embeddings.specs import TableSpec, check_ids
from shoal.config import ShardServerConfig
from shoal.errors import InvalidArgument, ResourceExhausted, StaleMap, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.wire import pack, unpack

from shards import spool, tiers, warm
from shards.experts import ExpertPath
from shards.failpoints import Failpoints
from shards.held import HeldTable
from shards.ingest import IngestPath
from shards.mapping import MapApplier
from shards.reads import Reader
from shards.rowcache import POLICIES
from shards.storage import Positions, RowStore
from shards.writes import WritePath

log = logging.getLogger("shard")


class ShardService(MapApplier, IngestPath, WritePath, ExpertPath):
    def __init__(self, server_id: str, store: RowStore, config: ShardServerConfig,
                 fetch_map: Callable[[int], pb.ShardMap | None], spool_dir: str = "",
                 failpoints: Failpoints | None = None):
        """``fetch_map(known_version)`` returns the coordinator's map, or None if unchanged.
        ``spool_dir``: where a loader on this host may leave SST files (``shards.spool``);
        "": none taken. ``failpoints``: where a test may hold this server (off by default)."""
        self.server_id = server_id
        self.failpoints = failpoints or Failpoints(None)
        self._spool_dir = spool_dir
        self._host_id = spool.host_id()
        self._store = store
        self._cfg = config
        self._fetch_map = fetch_map
        self._tables: dict[int, HeldTable] = {}
        self._addresses: dict[str, str] = {}
        self._on_disk: set[tuple[int, int]] = store.stored_partitions()
        self._map_version = 0
        self._map_lock = threading.Lock()
        self._ready = False
        self.building: dict[tuple[int, int], list[int]] = {}  # (uid, p) -> [bytes done, total]
        # Partitions whose copy this server has reported ready and whose promoting map it has
        # not applied yet: it applies no leader's entries of them meanwhile (see ``promoting``).
        self._promoting: set[tuple[int, int]] = set()
        self._promoting_cv = threading.Condition()
        # Splits (see shards.split): the builds this server owes, (uid, p, new uid), and the new
        # table's partitions it keeps for them; progress as the builder last published it.
        self._split_work: list[tuple[int, int, int]] = []
        self._shadow: set[tuple[int, int]] = set()
        self.split_progress: dict[tuple[int, int], pb.SplitProgress] = {}
        self.last_bulk_write = 0.0     # time.monotonic() of the last Ingest (heap trimming)
        self._counters = {"lookups": 0, "ids_looked_up": 0, "cold_ids": 0, "rocksdb_reads": 0,
                          "redirects": 0, "admissions_dropped": 0,
                          "dropped_partitions": 0, "builds_from_snapshot": 0,
                          "builds_caught_up": 0}
        if config.cache_policy not in POLICIES:
            raise ValueError(f"server.cache_policy: {config.cache_policy!r} is not one of "
                             f"{', '.join(POLICIES)}")
        if config.cache_ways < 1:
            raise ValueError(f"server.cache_ways: {config.cache_ways} must be >= 1")
        budget = config.memory_budget_bytes
        self.store_memory = tiers.store_memory(budget, config.block_cache_bytes,
                                               config.replication_log_bytes)
        self._rows_budget = tiers.rows_budget(budget, self.store_memory)
        self.reader = Reader(self, store, self._counters, config.read_chunks)
        self.lookup_rows = self.reader.lookup_rows
        self.lookup_pooled = self.reader.lookup_pooled

    # ------------------------------------------------------------ promotion
    @contextlib.contextmanager
    def promoting(self, table_uid: int, partition: int):
        """Around reporting a built copy ready and applying the map that promotes it: the
        promotion may depose the leader this copy caught up with (a move's source), and until
        this server has that map it would take the deposed leader's next write, one its
        successor refuses (never acknowledged): this copy would fork from the new leader's."""
        with self._promoting_cv:
            self._promoting.add((table_uid, partition))
        try:
            yield
        finally:
            with self._promoting_cv:
                self._promoting.discard((table_uid, partition))
                self._promoting_cv.notify_all()

    def wait_promoted(self, table_uid: int, partitions, timeout: float = 10.0) -> None:
        """Wait while any of ``partitions`` of the table is being promoted here."""
        keys = {(table_uid, int(p)) for p in partitions}
        with self._promoting_cv:
            self._promoting_cv.wait_for(lambda: not keys & self._promoting, timeout)

    # ------------------------------------------------------------ shard map: shards.mapping
    @property
    def map_version(self) -> int:
        return self._map_version

    def _enter(self, map_version: int, refresh: bool = True) -> None:
        """Admit a request routed with ``map_version``. ``refresh``: first apply that map if it
        is newer than ours. Lookups do not wait for that: their routed epochs are checked
        anyway, and only a mismatch (a StaleMap) makes the servicer refresh and retry."""
        if not self._ready:
            raise Unavailable(f"server {self.server_id} is starting; retry shortly")
        if refresh and map_version > self._map_version:
            self.refresh_map(at_least=map_version)

    def _table(self, uid: int) -> HeldTable:
        table = self._tables.get(uid)
        if table is None:
            raise StaleMap(f"server {self.server_id} holds no partition of table_uid {uid} at "
                           f"map version {self._map_version}", self._map_version)
        return table

    def _check(self, table: HeldTable, ids: np.ndarray, routed: pb.PartitionEpochs,
               read: bool = False) -> np.ndarray:
        """Validate ids and the routing; return each id's partition.

        Writes must be routed at exactly the partition's epoch here (fencing). A ``read`` may
        also be routed at an older epoch if this server is still one of the partition's
        replicas: every replica holds every acknowledged write, and the set changing around it
        (a learner added or promoted, another replica dropped) does not change its rows. So a
        map change does not turn every read in flight into a redirect."""
        spec = table.spec
        check_ids(ids, spec, "ids")
        rp = self._check_routing(table, routed, read)
        parts = partition_of(ids, spec.num_partitions)
        if len(rp) == spec.num_partitions and (rp == table.all_partitions).all():
            return parts                    # every partition routed: nothing to match
        declared = np.zeros(spec.num_partitions, bool)
        declared[rp] = True
        if ids.size and not declared[parts].all():
            i = int(np.flatnonzero(~declared[parts])[0])
            raise InvalidArgument(f"ids: id {int(ids[i])} is in partition {int(parts[i])} of "
                                  f"table {spec.name!r}, which the request did not route here")
        return parts

    def _check_routing(self, table: HeldTable, routed: pb.PartitionEpochs,
                       read: bool = False) -> np.ndarray:
        """The routed partitions, if each is held here at the epoch it was routed with (see
        ``_check``); else StaleMap."""
        spec = table.spec
        rp = unpack(routed.partitions, "routed.partitions", "int32", 1)
        re = unpack(routed.epochs, "routed.epochs", "int64", 1)
        if rp.shape != re.shape:
            raise InvalidArgument(f"routed: {rp.size} partitions but {re.size} epochs")
        if rp.size and (rp.min() < 0 or rp.max() >= spec.num_partitions):
            raise InvalidArgument(f"routed.partitions: must be in [0, {spec.num_partitions})")
        held = table.epochs[rp]
        ok = held == re
        if read:
            ok |= table.serves[rp] & (held > re)
        if read and table.missed[rp].any():
            p = int(rp[np.flatnonzero(table.missed[rp])[0]])
            raise Unavailable(f"server {self.server_id}: its copy of partition {p} of table "
                              f"{spec.name!r} failed to store a write (see its log); it serves "
                              "no reads of it until it has caught up")
        stale = np.flatnonzero(~ok)
        if stale.size:
            i = int(stale[0])
            self._counters["redirects"] += 1
            raise StaleMap(f"partition {int(rp[i])} of table {spec.name!r} was routed to "
                           f"{self.server_id} at epoch {int(re[i])}; this server holds it at "
                           f"epoch {int(held[i])} (0 = not held), map version "
                           f"{self._map_version}", self._map_version, int(held[i]))
        return rp

    def _gather(self, table: HeldTable, ids: np.ndarray, parts: np.ndarray):
        """(weight, idx): rows ``weight[idx]`` are the rows of ``ids``, misses read from RocksDB
        inline (callers off the event loop). Caller holds ``table.lock`` for reading."""
        return self.reader.read_now(table, ids, parts)

    def _put(self, table: HeldTable, parts: np.ndarray, ids: np.ndarray, rows: np.ndarray,
             positions: Positions | None = None, background: bool = False) -> None:
        """Store rows (and the partitions' new positions) durably, then in the memory tier.
        Caller holds ``table.write_mutex``."""
        self._store.write_rows(table.spec.table_uid, parts, ids, rows, positions, background)
        if len(ids) >= self._cfg.sst_threshold_rows:
            self.last_bulk_write = time.monotonic()     # the heap is trimmed once writes stop
        if positions is not None:
            self._on_disk.update((table.spec.table_uid, int(p)) for p in positions[0])
        self._to_memory(table, parts, ids, rows)

    def _to_memory(self, table: HeldTable, parts: np.ndarray, ids: np.ndarray,
                   rows: np.ndarray) -> None:
        """Copy stored (unique) rows into memory: the arena where their partitions are
        resident, the row cache where they are cached (write-through)."""
        table.written[np.bincount(parts, minlength=table.spec.num_partitions) > 0] += 1
        if table.cache is not None:
            t = torch.from_numpy(np.require(rows, requirements=["C", "W"])).view(
                table.arena.dtype)
            with table.cache_lock:
                if table.cache is not None:
                    table.cache.update(ids, t, parts)
        idx = table.arena.rows_index(ids, parts)
        hot = np.flatnonzero(idx >= 0)
        if hot.size:
            if hot.size < len(ids):
                idx, rows = idx[hot], rows[hot]
            rows = torch.from_numpy(np.ascontiguousarray(rows)).view(table.arena.dtype)
            # Rows that land in a few runs of consecutive arena rows (a load's chunk, a
            # partition at a time) are copied run by run: index_copy_ goes a row at a time.
            starts = np.flatnonzero(np.diff(idx) != 1) + 1
            with table.lock.write():
                if len(starts) < 64:
                    for a, b in zip([0, *starts.tolist()], [*starts.tolist(), len(idx)]):
                        table.arena.weight[int(idx[a]): int(idx[a]) + b - a] = rows[a:b]
                else:
                    table.arena.weight.index_copy_(0, torch.from_numpy(idx), rows)

    # ------------------------------------------------------------ splits (see shards.split)
    @property
    def store(self) -> RowStore:
        return self._store

    def held(self, uid: int) -> HeldTable:
        return self._table(uid)

    def held_tables(self) -> dict[int, HeldTable]:
        return dict(self._tables)

    def complete_copies(self, uid: int) -> np.ndarray:
        """bool [P]: partitions of table ``uid`` this server holds a complete copy of."""
        table = self._table(uid)
        with table.write_mutex:
            done = table.log.seq >= 0
            stored = np.zeros(table.spec.num_partitions, bool)
            stored[[p for u, p in self._on_disk if u == uid]] = True
        return done & stored

    def hot_ids(self, request: pb.HotIdsRequest) -> pb.HotIdsReply:
        """The ids this server's row cache holds of one partition, hottest first."""
        table = self._table(request.table_uid)
        if not 0 <= request.partition < table.spec.num_partitions:
            raise InvalidArgument(f"partition: {request.partition} is not in [0, "
                                  f"{table.spec.num_partitions})")
        ids, scores = warm.hot_set(table, max(0, request.max_ids) or None, [request.partition])
        return pb.HotIdsReply(ids=pack(ids), scores=pack(scores))

    def split_work(self) -> list[tuple[int, int, int]]:
        """(old uid, old partition, new uid) of every split build this server owes."""
        return list(self._split_work)

    def reset_split_partitions(self, uid2: int, parts: tuple[int, ...]) -> bool:
        """Empty the new table's partitions ``parts`` before a build (marked incomplete, seq
        -1); False if they are no longer a build's."""
        table = self._table(uid2)
        with table.write_mutex, table.lock.write():
            if not all((uid2, q) in self._shadow for q in parts):
                return False
            for q in parts:
                self._empty_copy(table, q)
        return True

    def put_split_rows(self, uid2: int, ids: np.ndarray, rows: np.ndarray | None,
                       at: tuple[int, int, int] | None) -> bool:
        """Store rows of an old partition into the new table, each under ``id & (2P - 1)``;
        ``at`` = (old partition p, seq, epoch): stamp new partitions p and p + P with that
        position, in the same batch. False (nothing stored) once the new table is no longer a
        build's: the split was cancelled or cut over, or this server left p's replicas."""
        table = self._table(uid2)
        spec = table.spec
        half = spec.num_partitions // 2
        if rows is None:
            rows = np.zeros((0, spec.dim), dtype=spec.np_dtype)
        positions = None
        if at is not None:
            parts = np.array([at[0], at[0] + half])
            positions = (parts, np.full(2, at[1], np.int64), np.full(2, at[2], np.int64))
        with table.write_mutex:
            qs = (at[0], at[0] + half) if at is not None else ()
            if table.serves.any() or not all((uid2, q) in self._shadow for q in qs):
                return False
            self._put(table, partition_of(ids, spec.num_partitions), ids, rows, positions,
                      background=at is None)
            for q in qs:
                table.log.reset(q, at[1], at[2])
        return True

    # ------------------------------------------------------------ lookups: shards.reads
    def _limit(self, n: int) -> None:
        if n > self._cfg.max_ids_per_request:
            raise ResourceExhausted(f"ids: {n} ids exceed max_ids_per_request "
                                  f"{self._cfg.max_ids_per_request}")

    def spec(self, table_uid: int) -> TableSpec:
        return self._table(table_uid).spec

    def partition_bytes(self, table_uid: int, partition: int) -> int:
        spec = self.spec(table_uid)
        return rows_in_partition(spec.num_embeddings, spec.num_partitions, partition) * \
            spec.row_bytes

    def stored_bytes(self, table_uid: int) -> int:
        """Bytes of the rows of the table's partitions stored here (every row counted)."""
        try:
            return sum(self.partition_bytes(u, p) for u, p in list(self._on_disk)
                       if u == table_uid)
        except Exception:               # a table no longer held
            return 0

    def count(self, counter: str) -> None:
        self._counters[counter] += 1

    def _count(self, n: int) -> None:
        self._counters["lookups"] += 1
        self._counters["ids_looked_up"] += n

    def stats(self) -> pb.ServerStats:
        rows = raw = resident = parts = resident_parts = 0
        evictions = rejected = 0
        loads = []
        tables = list(self._tables.values())
        for t in tables:
            held = np.flatnonzero(t.epochs)
            parts += held.size
            resident_parts += int((t.arena.slot[held] >= 0).sum())
            n = sum(rows_in_partition(t.spec.num_embeddings, t.spec.num_partitions, int(p))
                    for p in held)
            rows += n
            raw += n * t.spec.row_bytes
            cache = t.cache
            memory = t.arena.nbytes + (cache.nbytes if cache is not None else 0)
            resident += memory
            c = cache.counters if cache is not None else None
            if c is not None:
                evictions += c.evicted
                rejected += c.rejected
            r = self.reader.tables.get(t.spec.table_uid)
            loads.append(pb.TableLoad(
                table_uid=t.spec.table_uid, ids_looked_up=pack(t.looked_up),
                ids=r.ids if r else 0, misses=r.misses if r else 0,
                miss_reads=r.miss_reads if r else 0, miss_seconds=r.miss_seconds if r else 0.0,
                cache_bytes=memory, cache_rows=cache.capacity if cache is not None else 0,
                held_bytes=n * t.spec.row_bytes, evictions=c.evicted if c else 0))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return pb.ServerStats(rows=rows, raw_bytes=raw, resident_bytes=resident,
                              rss_bytes=_rss_bytes(), partitions=parts,
                              resident_partitions=resident_parts, map_version=self._map_version,
                              cpu_seconds=usage.ru_utime + usage.ru_stime, pid=os.getpid(),
                              replication_log_bytes=sum(t.log.nbytes for t in tables),
                              stored_partitions=len(self._on_disk),
                              host_id=self._host_id, spool_dir=self._spool_dir,
                              builds=[pb.BuildProgress(table_uid=k[0], partition=k[1],
                                                       bytes_done=v[0], bytes_total=v[1])
                                      for k, v in list(self.building.items())],
                              splits=list(self.split_progress.values()),
                              table_loads=loads,
                              disk_bytes=self._store.disk_bytes(),
                              disk_capacity_bytes=self.disk_capacity(),
                              cache_bytes=sum(t.cache.nbytes for t in tables
                                              if t.cache is not None),
                              store_memory_bytes=self.store_memory.total,
                              memory_budget_bytes=self._cfg.memory_budget_bytes,
                              cache_evictions=evictions, cache_rejected=rejected,
                              miss_read_seconds=sum(r.miss_seconds
                                                    for r in self.reader.tables.values()),
                              **self._counters)

    def disk_capacity(self) -> int:
        """Bytes this server may hold on disk: ``disk_capacity_bytes`` if configured, else
        what its file system has free now plus what the store already uses."""
        if self._cfg.disk_capacity_bytes:
            return self._cfg.disk_capacity_bytes
        return self._store.disk_bytes() + self._store.disk_free()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
