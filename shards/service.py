"""The shard server's state and RPCs: the partitions it holds (from the shard map), lookups of
rows and of pooled bags, and (through ``WritePath``) the replicated write path.

Durability: rows and each partition's replication position are durable in RocksDB
(``RowStore``) before a write returns; the memory tier, the log of recent writes and the
held-partition table are soft state rebuilt from RocksDB and the coordinator's map on restart.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import logging
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np
import torch

from embeddings.checksum import row_checksums
from embeddings.partition import partition_of, rows_in_partition
from embeddings.specs import TableSpec, check_ids
from shoal.config import ShardServerConfig
from shoal.errors import (InvalidArgument, ResourceExhausted, ShoalError, StaleMap, Unavailable,
                          abort_async)
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.wire import WithTensor, pack, parse_with_tensor, unpack

from shards.experts import ExpertPath
from shards.failpoints import Failpoints
from shards.memory import RWLock, TableArena
from shards.reads import Reader
from shards.replog import ReplicationLog
from shards.rowcache import POLICIES, RowCache
from shards import spool, tiers, warm
from shards.storage import Positions, RowStore, StorageError, disk_full, key_array
from shards.writes import WritePath

log = logging.getLogger("shard")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class HeldTable:
    spec: TableSpec
    epochs: np.ndarray                  # int64 [P]: epoch of each partition held here, 0 = not held
    arena: TableArena
    log: ReplicationLog
    lock: RWLock = field(default_factory=RWLock)          # arena readers vs. arena writers
    # The hottest rows, when the rows held here do not all fit in memory (shards.tiers); its
    # lock is taken inside ``lock`` and ``write_mutex``, never around them.
    cache: RowCache | None = None
    cache_lock: threading.Lock = field(default_factory=threading.Lock)
    write_mutex: threading.Lock = field(default_factory=threading.Lock)   # one writer of rows
    # From the map (replaced whole under write_mutex): the partitions this server leads, the
    # leader of each partition held, and per other server the partitions it follows or learns
    # of those this server leads.
    leads: np.ndarray = None
    serves: np.ndarray = None           # bool [P]: a replica here (not a learner): may be read
    leader_of: dict[int, str] = field(default_factory=dict)
    peers: dict[str, np.ndarray] = field(default_factory=dict)
    learners: dict[str, np.ndarray] = field(default_factory=dict)
    # Soft, changed under write_mutex: learners caught up with this leader, which get every write.
    attached: dict[str, np.ndarray] = field(default_factory=dict)
    looked_up: np.ndarray = None        # int64 [P]: ids looked up per partition (load), cumulative
    # bool [P]: this copy failed to store a leader's entry (a full disk): its rows may lack an
    # acknowledged write, so it refuses reads (UNAVAILABLE: the router asks another replica)
    # until a later entry applies after it (a catch-up filled the gap) or the copy is reset.
    missed: np.ndarray = None
    # int64 [P]: rows of the partition stored or dropped (a count): a partition scanned outside
    # the locks is rescanned under them if it changed meanwhile (``_scan_new``).
    written: np.ndarray = None
    frozen: bool = False                # being split: writes wait for the cut-over
    loading: bool = False               # of a model version being loaded: takes Ingest

    def __post_init__(self):
        self.all_partitions = np.arange(self.spec.num_partitions, dtype=np.int32)
        if self.looked_up is None:
            self.looked_up = np.zeros(self.spec.num_partitions, np.int64)
        if self.missed is None:
            self.missed = np.zeros(self.spec.num_partitions, bool)
        if self.written is None:
            self.written = np.zeros(self.spec.num_partitions, np.int64)

    @property
    def no_parts(self) -> np.ndarray:
        return np.zeros(self.spec.num_partitions, dtype=bool)

    def learner_mask(self, server: str) -> np.ndarray:
        return self.learners.get(server, self.no_parts)

    def attach(self, server: str, partition: int) -> None:
        self.attached.setdefault(server, self.no_parts)[partition] = True

    def detach(self, server: str, partition: int) -> None:
        if server in self.attached:
            self.attached[server][partition] = False


class ShardService(WritePath, ExpertPath):
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

    # ------------------------------------------------------------ shard map
    @property
    def map_version(self) -> int:
        return self._map_version

    def refresh_map(self, at_least: int = 0) -> None:
        """Fetch and apply the coordinator's map unless ours is already at ``at_least``."""
        with self._map_lock:
            if at_least and self._map_version >= at_least:
                return
            self.failpoints.hit("map.apply")
            m = self._fetch_map(self._map_version)
            if m is not None:
                t0 = time.perf_counter()
                self._apply(m)
                log.info("applied map version %d in %.1f ms", m.version,
                         (time.perf_counter() - t0) * 1e3)
        self._ready = True

    def _apply(self, m: pb.ShardMap) -> None:
        specs = {t.table_uid: TableSpec.from_proto(t) for md in m.models for t in md.tables}
        replication = {t.table_uid: md.replication for md in m.models for t in md.tables}
        sets = {(rs.table_uid, rs.partition): rs for rs in m.partitions}
        held: dict[int, dict[int, pb.ReplicaSet]] = {}
        for rs in m.partitions:
            if self.server_id in rs.replicas or self.server_id in rs.learners:
                held.setdefault(rs.table_uid, {})[rs.partition] = rs
        self._addresses = {s.server_id: s.address for s in m.servers}
        log_bytes = self.store_memory.log // max(1, len(held))
        splits = {sp.table_uid: sp for sp in m.splits}
        loading = {t.table_uid for md in m.models if md.state == "loading" for t in md.tables}
        shadows = self._shadows(splits, held)
        experts = {t.table_uid for md in m.models for t in md.tables
                   if t.name in {el.table for el in md.expert_layers}}
        layout = {}
        for uid in sorted(held) + sorted(shadows):
            spec = specs[uid] if uid in held else TableSpec.from_proto(shadows[uid][0])
            parts = held[uid] if uid in held else {q: None for q in shadows[uid][1]}
            layout[uid] = (spec, parts)
        plans = tiers.plan(self._rows_budget, self._needs(layout, experts))
        for uid, (spec, parts) in layout.items():
            table = self._tables.get(uid)
            if table is None:
                arena = TableArena(spec.num_embeddings, spec.dim, TORCH_DTYPES[spec.dtype],
                                   spec.num_partitions, self._cfg.arena_huge_pages)
                seq, epoch = self._store.read_positions(uid, spec.num_partitions)
                table = HeldTable(spec, np.zeros(spec.num_partitions, np.int64), arena,
                                  ReplicationLog(seq, epoch, log_bytes))
            plan = plans[uid]
            resident = sorted(parts) if plan.resident_all else plan.resident
            cache = self._sized_cache(table, plan.cache_rows)
            roles = self._roles(spec.num_partitions, held.get(uid, {}))
            left = np.flatnonzero((table.epochs > 0) & (roles[0] == 0))
            scans = self._scan_new(table, [p for p in resident if not table.arena.resident(p)])
            if scans:
                self.failpoints.hit("map.fill")
            # A map's epochs and the arena's slots change together under the write lock, and
            # lookups check epochs and gather under the read lock: a lookup never passes the
            # check against one map and then reads a slot the next map released.
            with table.write_mutex, table.lock.write():
                for p in table.arena.set_partitions(resident):
                    seen = scans.get(p)
                    if seen is None or seen[0] != table.written[p]:   # changed since: again
                        log.info("partition %d of table %r changed while it was read into "
                                 "memory: read again under the lock", p, spec.name)
                        seen = (0, *self._store.scan_partition(uid, p))
                    if seen[2]:
                        table.arena.fill(p, seen[1], torch.frombuffer(
                            bytearray(seen[2]), dtype=table.arena.dtype).view(-1, spec.dim))
                with table.cache_lock:
                    if cache is not None and left.size:
                        cache.drop_partitions(left)   # their copies may change before they return
                    table.cache = cache
                (table.epochs, table.leads, table.serves, table.leader_of, table.peers,
                 table.learners) = roles
                table.attached = {s: a & table.learner_mask(s)
                                  for s, a in table.attached.items() if s in table.learners}
                table.log.set_budget(log_bytes)
                table.frozen = uid in splits and splits[uid].frozen
                table.loading = uid in loading
            self._tables[uid] = table
        self._split_work = [(uid, p, sp.new_table.table_uid) for uid, sp in sorted(splits.items())
                            for p in sorted(held.get(uid, {}))
                            if self.server_id in held[uid][p].replicas]
        self._shadow = {(uid, q) for uid, (_, qs) in shadows.items() for q in qs}
        for uid in set(self._tables) - set(held) - set(shadows):
            gone = self._tables.pop(uid)
            with gone.write_mutex, gone.lock.write():   # a request holding it is redirected
                gone.epochs = np.zeros_like(gone.epochs)
                gone.serves = np.zeros_like(gone.epochs, dtype=bool)
                gone.leads = np.zeros_like(gone.epochs, dtype=bool)
        self._collect_garbage(specs, replication, sets, held)
        self._map_version = m.version

    def _scan_new(self, table: HeldTable, partitions: list[int]) -> dict[int, tuple]:
        """{partition: (its ``written`` count, ids, row bytes)}: the stored rows of partitions
        about to become resident, read outside the table's locks (a RocksDB iterator, taken
        between two writes, is a consistent view); reads and writes go on meanwhile."""
        out = {}
        for p in partitions:
            with table.write_mutex:
                seen = int(table.written[p])
                snap = self._store.snapshot_partition(table.spec.table_uid, p)
            try:
                out[p] = (seen, *snap.read(None))
            finally:
                snap.close()
        return out

    def _needs(self, layout, experts: set[int]) -> dict[int, tiers.TableNeed]:
        """What each table holds here, for ``tiers.plan``: an expert layer's partitions most
        used first."""
        needs = {}
        for uid, (spec, parts) in layout.items():
            ps = sorted(parts)
            sizes = [rows_in_partition(spec.num_embeddings, spec.num_partitions, p) *
                     spec.row_bytes for p in ps]
            if uid in experts:
                old = self._tables.get(uid)
                used = old.looked_up if old is not None else np.zeros(spec.num_partitions)
                order = sorted(range(len(ps)), key=lambda i: (-int(used[ps[i]]), ps[i]))
                by_use = [(ps[i], sizes[i]) for i in order]
            else:
                by_use = []
            needs[uid] = tiers.TableNeed(sum(sizes), spec.row_bytes, uid in experts, by_use)
        return needs

    def _sized_cache(self, table: HeldTable, rows: int) -> RowCache | None:
        """The table's row cache for ``rows`` slots: the one it has if within 25% of that
        (a cache is not rebuilt, and emptied, for a small change of share), else a new one."""
        if rows < self._cfg.cache_ways:
            return None
        old = table.cache
        if old is not None and abs(old.capacity - rows) <= rows // 4:
            return old
        spec = table.spec
        return RowCache(spec.num_partitions, spec.dim, TORCH_DTYPES[spec.dtype], rows,
                        ways=self._cfg.cache_ways, policy=self._cfg.cache_policy)

    def _shadows(self, splits: dict[int, pb.Split], held) -> dict[int, tuple[pb.TableSpec,
                                                                           list[int]]]:
        """The doubled tables of splits this server builds: new uid -> (spec, the partitions p
        and p + P for every old partition p it holds a replica of)."""
        out = {}
        for uid, sp in splits.items():
            half = sp.new_table.num_partitions // 2
            mine = [p for p, rs in held.get(uid, {}).items() if self.server_id in rs.replicas]
            if mine:
                out[sp.new_table.table_uid] = (sp.new_table,
                                               sorted(mine + [p + half for p in mine]))
        return out

    def _roles(self, num_partitions: int, held: dict[int, pb.ReplicaSet]):
        epochs = np.zeros(num_partitions, np.int64)
        leads = np.zeros(num_partitions, bool)
        serves = np.zeros(num_partitions, bool)
        leader_of, peers, learners = {}, {}, {}
        for p, rs in held.items():
            epochs[p] = rs.epoch
            serves[p] = self.server_id in rs.replicas
            leader_of[p] = rs.replicas[0] if rs.replicas else ""
            if leader_of[p] != self.server_id:
                continue
            leads[p] = True
            for s in rs.replicas[1:]:
                peers.setdefault(s, np.zeros(num_partitions, bool))[p] = True
            for s in rs.learners:
                learners.setdefault(s, np.zeros(num_partitions, bool))[p] = True
        return epochs, leads, serves, leader_of, peers, learners

    def _collect_garbage(self, specs, replication, sets, held) -> None:
        """Delete the copies of partitions this server no longer holds once they are not
        needed: the table is gone, or the partition has its full replica set elsewhere. (A copy
        is kept until then: if this server is asked to rebuild it, it may only need to catch
        up.)"""
        for uid, p in sorted(self._on_disk):
            if p in held.get(uid, {}) or (uid, p) in self._shadow:
                continue
            rs = sets.get((uid, p))
            if uid in specs and (rs is None or len(rs.replicas) < replication[uid]):
                continue
            self._store.drop_partition(uid, p)
            self._on_disk.discard((uid, p))
            self._counters["dropped_partitions"] += 1
            table = self._tables.get(uid)
            if table is not None:
                with table.write_mutex:
                    table.log.reset(p, 0, 0)

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

    def ingest(self, request: pb.IngestRequest) -> pb.IngestReply:
        """Store bulk rows of a loading version's table on this replica (see IngestRequest)."""
        self._enter(request.map_version)
        table = self._table(request.table_uid)
        spec = table.spec
        if not table.loading:
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"table {spec.name!r} (table_uid {spec.table_uid}) is not of a "
                             "loading version; Ingest only fills a version being loaded (use "
                             "WriteRows)")
        if len(request.files):
            return self._ingest_spooled(table, request)
        ids = unpack(request.ids, "ids", "int64", 1)
        rows = request.tensor("rows", spec.dtype, 2) if isinstance(request, WithTensor) else \
            unpack(request.rows, "rows", spec.dtype, 2)
        if rows.shape != (len(ids), spec.dim):
            raise InvalidArgument(f"rows: shape {list(rows.shape)} must be [{len(ids)}, "
                                  f"{spec.dim}]")
        check_ids(ids, spec, "ids")
        if not (ids[1:] > ids[:-1]).all() and len(np.unique(ids)) != len(ids):
            raise InvalidArgument("ids: must be unique within one ingest")   # (sorted: O(n))
        if not len(ids):
            return pb.IngestReply(rows=0)
        lo, hi = (request.lo, request.hi) if request.hi else (int(ids.min()), int(ids.max()) + 1)
        if not 0 <= lo < hi or ids.min() < lo or ids.max() >= hi:
            raise InvalidArgument(f"lo, hi: ids span [{int(ids.min())}, {int(ids.max()) + 1}), "
                                  f"which must lie within [lo, hi) = [{lo}, {hi}), lo >= 0")
        parts = self._check(table, ids, request.routed)
        # The files are written and synced outside the lock: the next chunk's are built while
        # this one's wait for the disk. The routing is checked again under the lock.
        prepared = self._store.prepare_ingest(spec.table_uid, parts, ids, rows, lo, hi)
        return self._commit_ingest(table, ids, parts, rows, request.routed, prepared)

    def _ingest_spooled(self, table: HeldTable, request: pb.IngestRequest) -> pb.IngestReply:
        """Ingest's ``files`` form (``shards.spool``): each file checked and read, then linked
        in; the rows read feed the ingest records and the memory tier."""
        spec = table.spec
        P, lo, hi = spec.num_partitions, int(request.lo), int(request.hi)
        rows_given = request.given if isinstance(request, WithTensor) else \
            request.HasField("rows")
        if rows_given or request.HasField("ids"):
            raise InvalidArgument("files: given with ids or rows; send one or the other")
        if not 0 <= lo < hi <= spec.num_embeddings:
            raise InvalidArgument(f"lo, hi: [{lo}, {hi}) must lie within [0, "
                                  f"{spec.num_embeddings}) of table {spec.name!r}, lo < hi")
        parts = np.array([f.partition for f in request.files], np.int64)
        if parts.min() < 0 or parts.max() >= P or len(np.unique(parts)) != len(parts):
            raise InvalidArgument(f"files: partitions {parts.tolist()} must be distinct, each "
                                  f"in [0, {P})")
        counts = spool.chunk_counts(lo, hi, parts, P)
        if not counts.all():
            raise InvalidArgument(f"files: [{lo}, {hi}) holds no id of partition "
                                  f"{int(parts[np.argmin(counts)])}")
        self._limit(int(counts.sum()))
        per = [spool.chunk_ids(lo, hi, p, P) for p in parts.tolist()]
        ids = np.concatenate(per)
        routed_parts = self._check(table, ids, request.routed)
        rows = np.empty((len(ids), spec.dim), spec.np_dtype)
        raw = rows.view(np.uint8).reshape(len(ids), spec.row_bytes)
        fds, at = [], 0
        try:
            for i, (f, p, n) in enumerate(zip(request.files, parts.tolist(), counts.tolist())):
                fds.append(spool.open_spooled(self._spool_dir, f.path,
                                              key_array(spec.table_uid, p, per[i]),
                                              raw[at: at + n], f"files[{i}]"))
                at += n
            try:
                prepared = self._store.prepare_linked_ingest(spec.table_uid, routed_parts, ids,
                                                             rows, lo, hi, fds)
            except OSError as e:        # another file system (EXDEV), a full disk
                raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"files: cannot link {request.files[0].path!r} into "
                                 f"{self.server_id}'s store: {e.strerror}") from None
        finally:
            for fd in fds:
                os.close(fd)
        return self._commit_ingest(table, ids, routed_parts, rows, request.routed, prepared)

    def _commit_ingest(self, table: HeldTable, ids, parts, rows, routed,
                       prepared) -> pb.IngestReply:
        try:
            self._commit_prepared(table, ids, parts, rows, routed, prepared)
        finally:
            prepared.discard()
        self.last_bulk_write = time.monotonic()
        return pb.IngestReply(rows=len(ids))

    def _commit_prepared(self, table: HeldTable, ids, parts, rows, routed, prepared) -> None:
        spec = table.spec
        with table.write_mutex:         # the map (epochs, learners) cannot change meanwhile
            self._check_routing(table, routed)
            for server, learning in table.learners.items():
                busy = learning[parts]
                if busy.any():
                    p = int(parts[np.flatnonzero(busy)[0]])
                    raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                                     f"partition {p} of table {spec.name!r} has a copy being "
                                     f"built on {server}: its rows must go through the "
                                     "leader's write path (WriteRows), not Ingest")
            mine = np.flatnonzero(np.bincount(parts, minlength=spec.num_partitions))
            new = np.array([p for p in mine.tolist() if (spec.table_uid, p) not in self._on_disk],
                           np.int64)
            positions = (new, table.log.seq[new].copy(), table.log.epoch[new].copy()) \
                if len(new) else None      # the position marks the copy as stored
            try:
                prepared.commit(positions)
            except StorageError as e:
                raise ShoalError(grpc.StatusCode.DATA_LOSS, f"ingest into table {spec.name!r} "
                                 f"on {self.server_id}: {e}") from None
            self._on_disk.update((spec.table_uid, int(p)) for p in new)
            self._to_memory(table, parts, ids, rows)

    def checksums(self, request: pb.ChecksumsRequest) -> pb.ChecksumsReply:
        """Checksums of stored partitions (``embeddings.checksum``): from a partition's ingest
        records if asked (``recorded``) and they account for it, else read from RocksDB."""
        parts = np.asarray(request.partitions, dtype=np.int64)
        if len(parts) > 65536 or (parts.size and parts.min() < 0):
            raise InvalidArgument(f"partitions: {len(parts)} partitions, must be 0..65536 "
                                  "values, each >= 0")
        sums = np.zeros(len(parts), np.uint64)
        counts = np.zeros(len(parts), np.int64)
        scanned = np.zeros(len(parts), np.int32)
        for i, p in enumerate(parts.tolist()):
            if (request.table_uid, p) not in self._on_disk:
                continue
            got = self._recorded(request.table_uid, p) if request.recorded else None
            if got is not None:
                sums[i], counts[i] = got
                continue
            ids, raw = self._store.scan_partition(request.table_uid, p)
            scanned[i] = 1
            if len(ids):
                rows = np.frombuffer(raw, np.uint8).reshape(len(ids), -1)
                sums[i] = row_checksums(ids, rows).sum(dtype=np.uint64)
                counts[i] = len(ids)
        return pb.ChecksumsReply(checksums=pack(sums.view(np.int64)), rows=pack(counts),
                                 scanned=pack(scanned))

    def _recorded(self, table_uid: int, p: int) -> tuple[int, int] | None:
        """(checksum, rows) of a partition from its ingest records, if they account for every
        row it stores: no sequenced write ever touched it (its sequence is 0: a write through
        the leader, a replayed log or an installed snapshot would have moved it or dropped the
        records), and no two records overlap (ingests of different chunkings)."""
        table = self._tables.get(table_uid)
        if table is None or p >= table.spec.num_partitions:
            return None
        with table.write_mutex:
            if int(table.log.seq[p]) != 0:
                return None
            rec = self._store.ingest_records(table_uid, p)
        if not len(rec) or (rec["lo"][1:] < rec["hi"][:-1]).any():
            return None
        with np.errstate(over="ignore"):
            return int(rec["checksum"].sum(dtype=np.uint64)), int(rec["rows"].sum())

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
